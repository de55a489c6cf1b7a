"""Edit-request readers, validation, selection, the cursor and DDP shares (fast, offline)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from nmke_lightning.data import (
    FORMATS,
    EditCase,
    EditDataModule,
    StepBatch,
    guess_format,
    load_cases,
    sample_path,
    share_bounds,
)
from nmke_lightning.editing.requests import EditRequest

EASYEDIT = [
    {
        "case_id": 10,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    },
    {
        "case_id": 11,
        "prompt": "What is the twin city of Lyon? It is",
        "target_new": "Manila",
        "subject": "Lyon",
        "ground_truth": "Beirut",
        "rephrase_prompt": "People in Lyon's twin city speak the language of",
        "locality_prompt": "The twin city of Trieste is",
        "locality_ground_truth": "Beirut",
    },
]

ROME = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded but never released. Danielle Darrieux spoke the language",
        ],
        "neighborhood_prompts": [
            "The mother tongue of Léon Blum is",
            "The native language of Montesquieu is",
        ],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
]

ZSRE = [
    {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    },
    {
        "subject": "delta serpentis",  # differs from the question only in letter case
        "src": "What is the name of the constellation which Delta Serpentis belongs?",
        "pred": "Serpens",
        "rephrase": "What's the name of the constellation that Delta Serpentis belongs to?",
        "alt": "Virgo",
        "answers": ["Serpens", "Serpens Cauda"],
        "loc": "nq question: subjects transferred from state list to concurrent list",
        "loc_ans": "Education",
        "cond": "Serpens >> Virgo || What is the name of the constellation which Delta Serpentis belongs?",
    },
    {
        "subject": "Michaela Staniford",  # as records 534 and 723 of zsre_mend_train-1k.json
        "src": "What gender is Michaela Staniford?",
        "pred": "female",
        "rephrase": "Which sex is Michaela Staniford?",
        "alt": "",
        "answers": ["female"],
        "loc": "nq question: who plays the cat in the hat movie",
        "loc_ans": "Mike Myers",
        "cond": "female >>  || What gender is Michaela Staniford?",
    },
]

PLAIN = [
    {
        "prompt": "The Eiffel Tower is located in",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrases": ["Where is the Eiffel Tower? It is in"],
        "neighbourhood_prompts": ["The Louvre is located in", "Big Ben is in"],
        "neighbourhood_answers": ["Paris", None],
    },
    {
        "case_id": 7,
        "prompt": "1984 was written by",
        "subject": "1984",
        "target_new": "Aldous Huxley",
    },
]

CSV = (
    "case_id,prompt,subject,target_new,target_true,paraphrases,neighbourhood_prompts,neighbourhood_answers\n"
    '3,The Eiffel Tower is located in,The Eiffel Tower,Rome,Paris,"Where is the Eiffel Tower? It is in|'
    'The Eiffel Tower stands in",The Louvre is located in|Big Ben is in,Paris|\n'
    "4,007 is a character created by,007,NA,,,,\n"
)


def write_json(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def write_jsonl(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def counterfact_records(n):
    """n valid plain records with case ids 100.. (prompts all contain their subject)."""
    return [
        {
            "case_id": 100 + i,
            "prompt": f"Entity {i} speaks",
            "subject": f"Entity {i}",
            "target_new": f"language {i}",
        }
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# Formats


def test_counterfact_easyedit(tmp_path):
    result = load_cases(write_json(tmp_path, "cf.json", EASYEDIT), format="counterfact_easyedit")
    assert result.format == "counterfact_easyedit" and result.num_records == 2 and result.skipped == []
    case = result.cases[0]
    assert case == EditCase(
        case_id=10,
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrases=["Where Danielle Darrieux is from, people speak the language of"],
        neighbourhood=[("Michel Rocard is a native speaker of", "French")],
    )
    assert case.request == EditRequest(
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"
    )
    assert [c.case_id for c in result.cases] == [10, 11]


def test_counterfact_rome(tmp_path):
    result = load_cases(write_json(tmp_path, "rome.json", ROME), format="counterfact_rome")
    (case,) = result.cases
    assert case.case_id == 0
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert case.subject == "Danielle Darrieux"
    assert (case.target_new, case.target_true) == ("English", "French")
    assert case.paraphrases == ROME[0]["paraphrase_prompts"]
    assert case.neighbourhood == [
        ("The mother tongue of Léon Blum is", "French"),
        ("The native language of Montesquieu is", "French"),
    ]


def test_zsre_mend(tmp_path):
    with pytest.warns(UserWarning, match=r"skipping 1 of 3 records"):
        result = load_cases(write_json(tmp_path, "zsre.json", ZSRE), format="zsre_mend", on_invalid="skip")
    first, second = result.cases
    assert first == EditCase(
        case_id=0,
        prompt="What is the product made by UniFirst?",
        subject="UniFirst",
        target_new="unmanned aircraft",
        target_true="uniform",
        paraphrases=["What will be the product of UniFirst?"],
        neighbourhood=[("nq question: john goodman's character in the big lebowski", "Walter Sobchak")],
    )
    # letter case only: the question's spelling is used, so the subject's tokens can be located
    assert second.subject == "Delta Serpentis" and second.target_true == "Serpens"
    assert second.request.subject_end == second.prompt.index("Delta Serpentis") + len("Delta Serpentis")
    assert [(r.index, r.problems) for r in result.skipped] == [(2, ["field 'alt' is empty"])]


def test_zsre_subject_absent_is_invalid(tmp_path):
    record = dict(ZSRE[0], subject="Acme Corp")
    with pytest.raises(
        ValueError, match=r"record 0 \(case_id 0\): field 'subject' 'Acme Corp' does not occur in field 'src'"
    ):
        load_cases(write_json(tmp_path, "zsre.json", [record]), format="zsre_mend")


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_plain_json_and_jsonl(tmp_path, writer):
    result = load_cases(writer(tmp_path, "plain.jsonl", PLAIN), format="jsonl")
    first, second = result.cases
    assert first == EditCase(
        case_id=0,
        prompt="The Eiffel Tower is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrases=["Where is the Eiffel Tower? It is in"],
        neighbourhood=[("The Louvre is located in", "Paris"), ("Big Ben is in", None)],
    )
    assert second == EditCase(
        case_id=7, prompt="1984 was written by", subject="1984", target_new="Aldous Huxley"
    )


def test_plain_csv(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text(CSV, encoding="utf-8")
    result = load_cases(str(path), format="csv")
    first, second = result.cases
    assert first == EditCase(
        case_id=3,
        prompt="The Eiffel Tower is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrases=["Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"],
        neighbourhood=[("The Louvre is located in", "Paris"), ("Big Ben is in", None)],
    )
    # cells stay text: "007" is not the number 7 and "NA" is not a missing value
    assert second == EditCase(
        case_id=4, prompt="007 is a character created by", subject="007", target_new="NA"
    )


def test_shipped_samples():
    cf = load_cases(str(sample_path("counterfact_sample.json")))
    assert cf.format == "counterfact_easyedit" and len(cf.cases) == 2000 and cf.skipped == []
    assert cf.cases[0] == EditCase(
        case_id=0,
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrases=["Where Danielle Darrieux is from, people speak the language of"],
        neighbourhood=[("Michel Rocard is a native speaker of", "French")],
    )
    assert [c.case_id for c in cf.cases[:4]] == [0, 1, 4, 5]
    # the first 1000 are the sample shipped before it grew to 2000 (the results of T <= 1000 used them)
    assert cf.cases[999].case_id == 2169 and cf.cases[-1].case_id == 4353

    train = load_cases("sample:counterfact_train_sample.json")
    assert len(train.cases) == 300
    assert train.cases[0] == EditCase(
        case_id=2,
        prompt="Toko Yasuda, the",
        subject="Toko Yasuda",
        target_new="piano",
        target_true="guitar",
        paraphrases=["Toko Yasuda is incredible at"],
        neighbourhood=[("John Lennon performs on the", "guitar")],
    )
    assert not {c.case_id for c in train.cases} & {c.case_id for c in cf.cases}

    zsre = load_cases("sample:zsre_sample.json")
    assert zsre.format == "zsre_mend" and len(zsre.cases) == 500
    assert zsre.cases[0] == EditCase(
        case_id=0,
        prompt="What is the product made by UniFirst?",
        subject="UniFirst",
        target_new="unmanned aircraft",
        target_true="uniform",
        paraphrases=["What will be the product of UniFirst?"],
        neighbourhood=[("nq question: john goodman's character in the big lebowski", "Walter Sobchak")],
    )

    cov = sample_path("wikitext_cov.txt").read_text(encoding="utf-8")
    heldout = sample_path("wikitext_heldout.txt").read_text(encoding="utf-8")
    assert cov.startswith(" \n = Homarus gammarus = \n") and cov.endswith("\n")
    assert 500_000 < len(cov.encode()) <= 600_000 and 100_000 < len(heldout.encode()) <= 150_000
    assert heldout.endswith("\n") and cov[:2000] not in heldout


def test_shipped_checksums_match_readme():
    readme = sample_path("README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"`([\w.]+\.(?:json|txt))`[^\n]*?`([0-9a-f]{64})`", readme))
    assert set(listed) == {
        "counterfact_sample.json",
        "counterfact_train_sample.json",
        "zsre_sample.json",
        "wikitext_cov.txt",
        "wikitext_heldout.txt",
    }
    for name, digest in listed.items():
        assert hashlib.sha256(sample_path(name).read_bytes()).hexdigest() == digest, name


def test_sample_path_unknown():
    with pytest.raises(ValueError, match="counterfact_sample.json"):
        sample_path("nope.json")


# ----------------------------------------------------------------------------------------------
# Format guessing


def test_guess_format(tmp_path):
    assert guess_format(EASYEDIT[0]) == "counterfact_easyedit"
    assert guess_format(ROME[0]) == "counterfact_rome"
    assert guess_format(ZSRE[0]) == "zsre_mend"
    assert guess_format(PLAIN[0]) == "jsonl"
    assert guess_format(PLAIN[0], is_csv=True) == "csv"
    assert load_cases(write_json(tmp_path, "a.json", ROME)).format == "counterfact_rome"
    assert load_cases(write_jsonl(tmp_path, "b.jsonl", PLAIN)).format == "jsonl"
    (tmp_path / "c.csv").write_text(CSV, encoding="utf-8")
    assert load_cases(str(tmp_path / "c.csv")).format == "csv"


def test_guess_format_fails_clearly(tmp_path):
    path = write_json(tmp_path, "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"cannot guess.*\['answer', 'question'\].*" + ", ".join(FORMATS)):
        load_cases(path)


def test_bad_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"data\.format must be one of"):
        load_cases(format="rome")
    with pytest.raises(ValueError, match=r"data\.batch_size must be a positive integer, got 0"):
        EditDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"data\.on_invalid"):
        EditDataModule(on_invalid="ignore")
    with pytest.raises(ValueError, match=r"data\.limit"):
        EditDataModule(limit=0)
    with pytest.raises(ValueError, match=r"data\.offset"):
        EditDataModule(offset=-1)
    with pytest.raises(ValueError, match=r"data\.seed"):
        EditDataModule(seed=True)
    with pytest.raises(ValueError, match=r"data\.rank"):
        EditDataModule(world_size=2, rank=2)
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        load_cases(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"data\.offset 2000 leaves no cases"):
        load_cases(offset=2000)


# ----------------------------------------------------------------------------------------------
# Validation


def broken_records():
    records = counterfact_records(30)
    records[3]["subject"] = "Foo"
    records[17]["target_new"] = "  "
    del records[20]["prompt"]
    records[22]["subject"] = 5
    records[25]["case_id"] = 101  # repeats record 1
    return records


def test_validation_names_record_and_field(tmp_path):
    path = write_json(tmp_path, "bad.json", broken_records())
    with pytest.raises(ValueError) as info:
        load_cases(path, format="jsonl")
    message = str(info.value)
    assert "5 of 30 records" in message and "on_invalid='skip'" in message
    assert (
        "record 3 (case_id 103): field 'subject' 'Foo' does not occur in field 'prompt' 'Entity 3 speaks'"
        in message
    )
    assert "record 17 (case_id 117): field 'target_new' is empty" in message
    assert "record 20 (case_id 120): field 'prompt' is missing" in message
    assert "record 22 (case_id 122): field 'subject' must be a string, got int 5" in message
    assert "record 25 (case_id 101): field 'case_id' 101 repeats record 1" in message


def test_validation_lists_first_problems_and_count(tmp_path):
    records = counterfact_records(12)
    for record in records:
        record["subject"] = "Nobody"
    with pytest.raises(ValueError, match=r"12 of 12 records.*\n(  record.*\n){5}  \.\.\. and 7 more"):
        load_cases(write_jsonl(tmp_path, "bad.jsonl", records))


def test_validation_wrong_list_types(tmp_path):
    rome = json.loads(json.dumps(ROME))
    rome[0]["paraphrase_prompts"] = "not a list"  # a single string is accepted as one paraphrase
    rome[0]["neighborhood_prompts"] = [1, 2]
    rome[0]["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    with pytest.raises(ValueError) as info:
        load_cases(write_json(tmp_path, "rome.json", rome))
    assert "record 0 (case_id 0): field 'requested_rewrite.prompt'" in str(info.value)
    assert "has no '{}' for the subject" in str(info.value)
    assert "field 'neighborhood_prompts' item 0 must be a string" in str(info.value)


def test_skip_mode_counts_and_lists(tmp_path, caplog):
    path = write_json(tmp_path, "bad.json", broken_records())
    with pytest.warns(UserWarning, match="skipping 5 of 30 records"):
        result = load_cases(path, on_invalid="skip")
    assert [r.index for r in result.skipped] == [3, 17, 20, 22, 25]
    assert result.skipped[0].problems == [
        "field 'subject' 'Foo' does not occur in field 'prompt' 'Entity 3 speaks'"
    ]
    assert len(result.cases) == 25 and result.num_records == 30
    assert 103 not in [c.case_id for c in result.cases]

    module = EditDataModule(path=path, on_invalid="skip")
    with pytest.warns(UserWarning):
        module.setup("fit")
    assert [r.index for r in module.skipped] == [3, 17, 20, 22, 25] and len(module.cases) == 25


def test_edit_case_checks_itself():
    with pytest.raises(ValueError, match="subject"):
        EditCase(case_id=1, prompt="Paris is", subject="Rome", target_new="x")
    with pytest.raises(ValueError, match="neighbourhood"):
        EditCase(case_id=1, prompt="Paris is", subject="Paris", target_new="x", neighbourhood=[("a",)])


# ----------------------------------------------------------------------------------------------
# Selection


def test_shuffle_is_deterministic_and_offset_limit_apply_after_it():
    ids = lambda **kw: [c.case_id for c in load_cases(**kw).cases]  # noqa: E731
    file_order = ids()
    shuffled = ids(seed=3)
    assert shuffled == ids(seed=3)
    assert shuffled != file_order and sorted(shuffled) == sorted(file_order)
    assert shuffled != ids(seed=4)
    expected = [
        file_order[i] for i in torch.randperm(2000, generator=torch.Generator().manual_seed(3)).tolist()
    ]
    assert shuffled == expected
    assert ids(seed=3, offset=10, limit=5) == shuffled[10:15]
    assert ids(offset=1990) == file_order[1990:]
    assert ids(limit=3) == file_order[:3]


# ----------------------------------------------------------------------------------------------
# The stream: cursor, resume, DDP shares


def make_module(path, **kwargs):
    module = EditDataModule(path=path, **kwargs)
    module.setup("fit")
    return module


def run(module, steps=None):
    """Edit `steps` steps (all if None), advancing after each, as the LightningModule does."""
    seen = []
    for batch in module.train_dataloader():
        if steps is not None and len(seen) == steps:
            break
        seen.append(batch)
        module.advance(batch)
    return seen


def test_loader_yields_step_batches_in_order(tmp_path):
    path = write_json(tmp_path, "cf.json", counterfact_records(11))
    module = make_module(path, batch_size=4)
    assert module.remaining_steps == 3
    batches = run(module)
    assert [b.step for b in batches] == [0, 1, 2]
    assert [b.start for b in batches] == [0, 4, 8]
    assert [[c.case_id for c in b.all_cases] for b in batches] == [
        [100, 101, 102, 103],
        [104, 105, 106, 107],
        [108, 109, 110],
    ]
    assert all(b.cases == b.all_cases for b in batches)
    assert module.cursor == 11 and module.steps_done == 3 and module.remaining_steps == 0
    assert list(module.train_dataloader()) == []  # nothing left to edit


def test_cursor_counts_completed_steps_only(tmp_path):
    module = make_module(write_json(tmp_path, "cf.json", counterfact_records(10)), batch_size=3)
    iterator = iter(module.train_dataloader())
    first, second = next(iterator), next(iterator)  # fetched ahead, as Lightning prefetches
    assert module.cursor == 0
    module.advance(first)
    assert (module.cursor, module.steps_done) == (3, 1)
    with pytest.raises(RuntimeError, match="next unedited step is 1"):
        module.advance(first)  # twice
    module.advance(len(second.all_cases))
    assert module.state_dict()["cursor"] == 6


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_resume_continues_at_first_unedited_request(tmp_path, k):
    path = write_json(tmp_path, "cf.json", counterfact_records(23))
    options = dict(batch_size=4, seed=7)
    uninterrupted = [[c.case_id for c in b.all_cases] for b in run(make_module(path, **options))]

    first = make_module(path, **options)
    before = [[c.case_id for c in b.all_cases] for b in run(first, steps=k)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint

    resumed = EditDataModule(path=path, **options)
    resumed.load_state_dict(state)  # before setup: checked once the cases are loaded
    resumed.setup("fit")
    after = run(resumed)
    assert [b.step for b in after] == list(range(k, 6))
    assert before + [[c.case_id for c in b.all_cases] for b in after] == uninterrupted

    late = make_module(path, **options)
    late.load_state_dict(state)  # after setup: Lightning's order
    assert [b.step for b in run(late)] == list(range(k, 6))


def test_resume_rejects_a_different_stream(tmp_path):
    path = write_json(tmp_path, "cf.json", counterfact_records(20))
    module = make_module(path, batch_size=2, seed=1)
    run(module, steps=2)
    state = module.state_dict()
    other = make_module(path, batch_size=2, seed=2)
    with pytest.raises(ValueError, match="different stream"):
        other.load_state_dict(state)
    longer = make_module(path, batch_size=5, seed=1, limit=20)  # limit and batch size may change
    longer.load_state_dict(state)
    assert longer.cursor == 4


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shares(tmp_path, world_size):
    path = write_json(tmp_path, "cf.json", counterfact_records(13))
    per_rank = [
        run(make_module(path, batch_size=5, world_size=world_size, rank=r)) for r in range(world_size)
    ]
    assert {len(batches) for batches in per_rank} == {3}  # every rank runs every step
    for step, rank_batches in enumerate(zip(*per_rank, strict=True)):
        whole = [c.case_id for c in rank_batches[0].all_cases]
        assert all([c.case_id for c in b.all_cases] == whole for b in rank_batches)
        assert {b.step for b in rank_batches} == {step}
        shares = [[c.case_id for c in b.cases] for b in rank_batches]
        assert sum(shares, []) == whole  # contiguous, disjoint, in order, covering the step
        for rank, b in enumerate(rank_batches):
            assert b.all_cases[b.share_start : b.share_start + len(b.cases)] == b.cases
            assert (b.share_start, b.share_start + len(b.cases)) == share_bounds(len(whole), world_size, rank)
    sizes = [[len(b.cases) for b in batches] for batches in per_rank]
    if world_size == 2:
        assert sizes == [[3, 3, 2], [2, 2, 1]]
    else:  # ceil(5/3) = 2: [0,2) [2,4) [4,5); the last step has 3 requests: [0,1) [1,2) [2,3)
        assert sizes == [[2, 2, 1], [2, 2, 1], [1, 1, 1]]


def test_empty_share_still_gets_the_step(tmp_path):
    path = write_json(tmp_path, "cf.json", counterfact_records(6))
    batches = run(make_module(path, batch_size=5, world_size=3, rank=2))
    assert [len(b.cases) for b in batches] == [1, 0]
    assert [len(b.all_cases) for b in batches] == [5, 1]


def test_share_bounds():
    assert [share_bounds(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [share_bounds(1, 3, r) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert [share_bounds(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]


def test_step_batch_survives_lightning_batch_transfer():
    module = make_module("sample:counterfact_sample.json", batch_size=3, limit=6)
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, StepBatch)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert moved == batch
    module.advance(moved)
    assert module.cursor == 3


# ----------------------------------------------------------------------------------------------
# With a Trainer: crash, resume from the last checkpoint, compare with an uninterrupted run


class Recorder:
    """A LightningModule that "edits" by recording the step's case ids."""

    @staticmethod
    def make(crash_at=None):
        from lightning.pytorch import LightningModule

        class Editor(LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                self.seen = []

            def training_step(self, batch, batch_idx):
                if crash_at is not None and batch.step == crash_at:
                    raise RuntimeError("simulated crash")
                self.seen.append([c.case_id for c in batch.all_cases])
                self.trainer.datamodule.advance(batch)

            def configure_optimizers(self):
                return None

        return Editor()


def fit(module, datamodule, ckpt_dir, ckpt_path=None):
    from lightning.pytorch import Callback, Trainer

    class SaveEveryStep(Callback):
        # ModelCheckpoint(every_n_train_steps) keys on trainer.global_step, which stays 0 without
        # an optimizer; save at the same point it would (callbacks' on_train_batch_end)
        def on_train_batch_end(self, trainer, *args):
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveEveryStep()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("crash_at", [1, 3])
def test_trainer_crash_then_resume_equals_uninterrupted(tmp_path, crash_at):
    path = write_json(tmp_path, "cf.json", counterfact_records(14))
    options = dict(path=path, batch_size=3, seed=5)

    full = Recorder.make()
    fit(full, EditDataModule(**options), tmp_path / "full")
    assert len(full.seen) == 5

    crashed = Recorder.make(crash_at=crash_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, EditDataModule(**options), tmp_path / "run")
    assert crashed.seen == full.seen[:crash_at]
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["EditDataModule"]
    assert (state["cursor"], state["steps_done"]) == (3 * crash_at, crash_at)

    resumed = Recorder.make()
    datamodule = EditDataModule(**options)
    fit(resumed, datamodule, tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert crashed.seen + resumed.seen == full.seen
    assert datamodule.cursor == 14 and datamodule.steps_done == 5
