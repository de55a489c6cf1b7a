"""Edit requests: the case schema, dataset readers, validation and the edit-stream DataModule.

Reading path: a local file (or a hub dataset id) -> `datasets.load_dataset` -> plain records ->
one converter per format -> `EditCase`s, every record validated before the first edit -> drop or
reject invalid records -> shuffle (optional) -> offset -> limit -> the ordered edit stream.

The stream is cut into steps of `batch_size` requests. `EditDataModule` keeps a global cursor
(requests already edited) that advances only when the LightningModule reports a completed step,
so a checkpoint always resumes at the first unedited request.
"""

from __future__ import annotations

import os

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from nmke_lightning.editing.requests import EditRequest

FORMATS = ("counterfact_easyedit", "counterfact_rome", "zsre_mend", "jsonl", "csv")
"""Record layouts `load_cases` understands (the converters below list the fields of each).
"jsonl" and "csv" are the same plain layout, read from JSON (array or lines) or from CSV."""

ON_INVALID = ("error", "skip")

SAMPLE_PREFIX = "sample:"
"""`path` values starting with this name a file shipped in `nmke_lightning/data/`."""

DEFAULT_PATH = SAMPLE_PREFIX + "counterfact_sample.json"

_SAMPLE_DIR = Path(__file__).with_name("data")
_MAX_LISTED = 5  # problems quoted in an error message or warning


def sample_path(name: str) -> Path:
    """Path of a file shipped in `nmke_lightning/data/`, e.g. `sample_path("wikitext_cov.txt")`.

    Shipped files: counterfact_sample.json, counterfact_train_sample.json, zsre_sample.json,
    wikitext_cov.txt, wikitext_heldout.txt (origin and licences in `nmke_lightning/data/README.md`).
    """
    if name.startswith(SAMPLE_PREFIX):
        name = name[len(SAMPLE_PREFIX) :]
    path = _SAMPLE_DIR / name
    if not name or "/" in name or "\\" in name or not path.is_file():
        available = sorted(p.name for p in _SAMPLE_DIR.iterdir() if p.is_file())
        raise ValueError(f"no shipped sample {name!r}; available: {', '.join(available)}")
    return path


def read_text_file(path: str, option: str) -> str:
    """The text of `path` ("sample:<file>" = shipped); a missing file names the `option`."""
    local = sample_path(path) if path.startswith(SAMPLE_PREFIX) else Path(path).expanduser()
    if not local.is_file():
        raise FileNotFoundError(f"{option} {path!r}: no such file ({local})")
    return local.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Schema


@dataclass
class EditCase:
    """One benchmark case: the edit request plus what evaluation needs.

    Not frozen: Lightning's batch transfer rebuilds dataclasses field by field.
    """

    case_id: int
    """Stable id of the case (the dataset's own id, else the record's index in the file)."""
    prompt: str
    """Full prompt text containing `subject`, e.g. "The mother tongue of Danielle Darrieux is"."""
    subject: str
    """Entity whose last token carries the edit, e.g. "Danielle Darrieux"."""
    target_new: str
    """The new answer, e.g. "English"."""
    target_true: str | None = None
    """The answer being replaced, if known, e.g. "French"."""
    paraphrases: list[str] = field(default_factory=list)
    """Other phrasings of the prompt (efficacy should generalise to these)."""
    neighbourhood: list[tuple[str, str | None]] = field(default_factory=list)
    """Unrelated prompts with their expected (unchanged) answer, the answer None if unknown."""

    def __post_init__(self) -> None:
        if isinstance(self.case_id, bool) or not isinstance(self.case_id, int):
            raise ValueError(f"EditCase.case_id must be an int, got {self.case_id!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise ValueError(f"EditCase.target_true must be a string or None, got {self.target_true!r}")
        if not all(isinstance(p, str) for p in self.paraphrases):
            raise ValueError(f"EditCase.paraphrases must be strings, got {self.paraphrases!r}")
        for item in self.neighbourhood:
            if (
                len(item) != 2
                or not isinstance(item[0], str)
                or not (item[1] is None or isinstance(item[1], str))
            ):
                raise ValueError(
                    f"EditCase.neighbourhood items must be (prompt, answer or None), got {item!r}"
                )
        self.neighbourhood = [tuple(item) for item in self.neighbourhood]
        EditRequest(self.prompt, self.subject, self.target_new, self.target_true)  # checks the rest

    @property
    def request(self) -> EditRequest:
        """The edit itself, as the editor consumes it."""
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true)


@dataclass
class InvalidRecord:
    """A record that failed validation; `index` is its 0-based position in the source."""

    index: int
    case_id: int | None
    problems: list[str]

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (case_id {self.case_id})" if self.case_id is not None else "")
        return f"{where}: " + "; ".join(self.problems)


@dataclass
class LoadResult:
    """What `load_cases` returns."""

    cases: list[EditCase]
    """Valid cases after shuffle, offset and limit, in edit order."""
    skipped: list[InvalidRecord]
    """Invalid records dropped (only with on_invalid="skip"; all of them, not just selected ones)."""
    format: str
    """The format used (as given, or guessed)."""
    num_records: int
    """Records in the source, valid or not."""


# ----------------------------------------------------------------------------------------------
# Reading


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _resolve_local(path: str | os.PathLike) -> Path | None:
    """The local file or folder `path` names, None for a hub dataset id."""
    path = os.fspath(path)
    if path.startswith(SAMPLE_PREFIX):
        return sample_path(path)
    local = Path(path).expanduser()
    if local.exists():
        return local
    looks_local = (
        local.suffix.lower() in {".json", ".jsonl", ".csv", ".gz"}
        or path.startswith((".", "/", "~", "\\"))
        or local.is_absolute()
    )
    if looks_local:
        raise FileNotFoundError(f"data.path: no such file {path!r}")
    return None


def _csv_header(path: Path) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError(f"data.path {str(path)!r}: the CSV file has no header row")
    return header


def read_records(path: str, format: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """All records of a local JSON/JSON Lines/CSV file or hub dataset, via `datasets.load_dataset`.

    Local files are read with a throwaway cache folder (nothing lands in ~/.cache, and DDP ranks
    do not contend for one lock); hub ids use the normal cache. CSV cells are read as strings,
    so "1984" or "007" stay text.
    """
    import datasets

    local = _resolve_local(path)
    progress_was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if local is None:
            dataset = datasets.load_dataset(path, split=split)
            return dataset.to_list()
        if local.is_dir():
            with tempfile.TemporaryDirectory(prefix="nmke_data_") as cache:
                return datasets.load_dataset(str(local), split=split, cache_dir=cache).to_list()
        is_csv = format == "csv" or local.suffix.lower() == ".csv"
        with tempfile.TemporaryDirectory(prefix="nmke_data_") as cache:
            if is_csv:
                columns = _csv_header(local)
                features = datasets.Features({name: datasets.Value("string") for name in columns})
                dataset = datasets.load_dataset(
                    "csv",
                    data_files=str(local),
                    split="train",
                    cache_dir=cache,
                    features=features,
                    keep_default_na=False,
                    na_values=[""],
                )
            else:
                dataset = datasets.load_dataset("json", data_files=str(local), split="train", cache_dir=cache)
            return dataset.to_list()
    finally:
        if progress_was_on:
            datasets.enable_progress_bars()


def guess_format(record: Mapping[str, Any], is_csv: bool = False) -> str:
    """The format whose keys the (first) record has; ValueError listing the formats if none."""
    keys = {key for key, value in record.items() if value is not None}
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if {"src", "alt"} <= keys:
        return "zsre_mend"
    if {"prompt", "subject", "target_new"} <= keys:
        if keys & {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
            return "counterfact_easyedit"
        return "csv" if is_csv else "jsonl"
    raise ValueError(
        f"cannot guess the data format from the first record's keys {sorted(record)}; "
        f"set data.format to one of: {', '.join(FORMATS)}"
    )


# ----------------------------------------------------------------------------------------------
# Converters: one per format, each `(record, index) -> EditCase fields`, collecting problems


class _Fields:
    """Typed access to one record's fields that collects problems instead of raising."""

    def __init__(self, record: Mapping[str, Any]):
        self.record = record
        self.problems: list[str] = []
        self.subject_case_fixed = False

    def raw(self, key: str) -> Any:
        value: Any = self.record
        walked = []
        for part in key.split("."):
            if value is None:
                return None
            if not isinstance(value, Mapping):
                self.problems.append(f"field {'.'.join(walked)!r} must be an object, got {_short(value)}")
                return None
            walked.append(part)
            value = value.get(part)
        return value

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problems.append(f"field {key!r} is missing")
            return None
        if not isinstance(value, str):
            self.problems.append(
                f"field {key!r} must be a string, got {type(value).__name__} {_short(value)}"
            )
            return None
        if not value.strip():
            if required:
                self.problems.append(f"field {key!r} is empty")
            return None
        return value

    def texts(self, key: str, sep: str | None = None, allow_none: bool = False) -> list[Any] | None:
        """A list of strings from a list, a single string, or (with `sep`) a separated string.

        Missing -> None. With `allow_none`, items may be null/empty (-> None).
        """
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = value.split(sep) if sep is not None else [value]
        if not isinstance(value, list):
            self.problems.append(
                f"field {key!r} must be a list of strings, got {type(value).__name__} {_short(value)}"
            )
            return None
        items = []
        for position, item in enumerate(value):
            if item is None or (isinstance(item, str) and not item.strip()):
                if not allow_none:
                    self.problems.append(f"field {key!r} item {position} is empty")
                    return None
                items.append(None)
            elif isinstance(item, str):
                items.append(item)
            else:
                self.problems.append(f"field {key!r} item {position} must be a string, got {_short(item)}")
                return None
        return items

    def case_id(self, key: str, default: int) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"field {key!r} must be an integer, got {_short(value)}")
            return None
        return value

    def subject_in_prompt(
        self, subject: str | None, prompt: str | None, subject_key: str, prompt_key: str
    ) -> None:
        if subject is not None and prompt is not None and subject not in prompt:
            self.problems.append(
                f"field {subject_key!r} {_short(subject)} does not occur in {prompt_key} {_short(prompt)}"
            )


def _pairs(
    fields: _Fields, prompts: list[Any] | None, answers: list[Any] | None, prompts_key: str, answers_key: str
) -> list[tuple[str, str | None]]:
    if not prompts:
        if answers:
            fields.problems.append(f"field {answers_key!r} is given without {prompts_key!r}")
        return []
    if answers is None:
        answers = [None] * len(prompts)
    if len(answers) != len(prompts):
        fields.problems.append(
            f"field {answers_key!r} has {len(answers)} items but {prompts_key!r} has {len(prompts)}"
        )
        return []
    return list(zip(prompts, answers, strict=True))


def _from_easyedit(f: _Fields, index: int) -> dict[str, Any]:
    """EasyEdit CounterFact: case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth (the last three a string or a list of strings)."""
    prompt, subject = f.text("prompt"), f.text("subject")
    f.subject_in_prompt(subject, prompt, "subject", "field 'prompt'")
    locality = _pairs(
        f,
        f.texts("locality_prompt"),
        f.texts("locality_ground_truth", allow_none=True),
        "locality_prompt",
        "locality_ground_truth",
    )
    return dict(
        case_id=f.case_id("case_id", index),
        prompt=prompt,
        subject=subject,
        target_new=f.text("target_new"),
        target_true=f.text("ground_truth", required=False),
        paraphrases=f.texts("rephrase_prompt") or [],
        neighbourhood=locality,
    )


def _from_rome(f: _Fields, index: int) -> dict[str, Any]:
    """ROME CounterFact: case_id, requested_rewrite {prompt with "{}", subject, target_new {str},
    target_true {str}}, paraphrase_prompts, neighborhood_prompts (answer: target_true; items may
    also be {"prompt", "target"} objects)."""
    template = f.text("requested_rewrite.prompt")
    subject = f.text("requested_rewrite.subject")
    target_true = f.text("requested_rewrite.target_true.str", required=False)
    prompt = None
    if template is not None:
        if "{}" not in template:
            f.problems.append(
                f"field 'requested_rewrite.prompt' {_short(template)} has no '{{}}' for the subject"
            )
        elif subject is not None:
            prompt = template.replace("{}", subject)
    neighbourhood: list[tuple[str, str | None]] = []
    raw_neighbours = f.raw("neighborhood_prompts")
    if isinstance(raw_neighbours, list) and any(isinstance(item, Mapping) for item in raw_neighbours):
        for position, item in enumerate(raw_neighbours):
            text = item.get("prompt") if isinstance(item, Mapping) else None
            answer = item.get("target") if isinstance(item, Mapping) else None
            if (
                not isinstance(text, str)
                or not text.strip()
                or not (answer is None or isinstance(answer, str))
            ):
                f.problems.append(
                    f"field 'neighborhood_prompts' item {position} must be a string or "
                    f"{{'prompt': str, 'target': str}}, got {_short(item)}"
                )
                continue
            neighbourhood.append((text, answer))
    else:
        neighbourhood = [(text, target_true) for text in f.texts("neighborhood_prompts") or []]
    return dict(
        case_id=f.case_id("case_id", index),
        prompt=prompt,
        subject=subject,
        target_new=f.text("requested_rewrite.target_new.str"),
        target_true=target_true,
        paraphrases=f.texts("paraphrase_prompts") or [],
        neighbourhood=neighbourhood,
    )


def _from_zsre(f: _Fields, index: int) -> dict[str, Any]:
    """MEND/EasyEdit zsRE: subject, src (question, the prompt), rephrase, alt (new answer),
    answers (true answers, the first is used), loc, loc_ans; case_id optional (else the index).

    A subject that occurs in `src` only up to letter case takes the question's spelling (the
    editor locates the subject's tokens in the prompt); `validate_records` reports these.
    """
    prompt, subject = f.text("src"), f.text("subject")
    if subject is not None and prompt is not None and subject not in prompt:
        match = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
        if match is not None:
            subject = prompt[match.start() : match.end()]
            f.subject_case_fixed = True
    f.subject_in_prompt(subject, prompt, "subject", "field 'src'")
    answers = f.texts("answers")
    loc = f.text("loc", required=False)
    loc_ans = f.text("loc_ans", required=False)
    if loc_ans is not None and loc is None:
        f.problems.append("field 'loc_ans' is given without 'loc'")
    return dict(
        case_id=f.case_id("case_id", index),
        prompt=prompt,
        subject=subject,
        target_new=f.text("alt"),
        target_true=answers[0] if answers else None,
        paraphrases=f.texts("rephrase") or [],
        neighbourhood=[(loc, loc_ans)] if loc is not None else [],
    )


def _plain(sep: str | None):
    def convert(f: _Fields, index: int) -> dict[str, Any]:
        """Plain form: prompt, subject, target_new, optional target_true, paraphrases,
        neighbourhood_prompts, neighbourhood_answers (lists; "|"-separated strings in CSV;
        "neighborhood_*" spellings accepted), optional case_id (else the index)."""
        prompt, subject = f.text("prompt"), f.text("subject")
        f.subject_in_prompt(subject, prompt, "subject", "field 'prompt'")
        prompts_key = (
            "neighbourhood_prompts" if f.raw("neighbourhood_prompts") is not None else "neighborhood_prompts"
        )
        answers_key = (
            "neighbourhood_answers" if f.raw("neighbourhood_answers") is not None else "neighborhood_answers"
        )
        return dict(
            case_id=f.case_id("case_id", index),
            prompt=prompt,
            subject=subject,
            target_new=f.text("target_new"),
            target_true=f.text("target_true", required=False),
            paraphrases=f.texts("paraphrases", sep=sep) or [],
            neighbourhood=_pairs(
                f,
                f.texts(prompts_key, sep=sep),
                f.texts(answers_key, sep=sep, allow_none=True),
                prompts_key,
                answers_key,
            ),
        )

    return convert


_CONVERTERS = {
    "counterfact_easyedit": _from_easyedit,
    "counterfact_rome": _from_rome,
    "zsre_mend": _from_zsre,
    "jsonl": _plain(sep=None),
    "csv": _plain(sep="|"),
}


def validate_records(
    records: Sequence[Mapping[str, Any]], format: str
) -> tuple[list[EditCase], list[InvalidRecord]]:
    """Convert and check every record; returns the valid cases (file order) and the invalid ones."""
    convert = _CONVERTERS[format]
    cases: list[EditCase] = []
    invalid: list[InvalidRecord] = []
    first_index_of: dict[int, int] = {}
    case_fixed: list[int] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            invalid.append(InvalidRecord(index, None, [f"must be an object, got {_short(record)}"]))
            continue
        fields = _Fields(record)
        values = convert(fields, index)
        case_id = values["case_id"]
        if case_id is not None and case_id in first_index_of:
            fields.problems.append(f"field 'case_id' {case_id} repeats record {first_index_of[case_id]}")
        if not fields.problems:
            try:
                case = EditCase(**values)
            except ValueError as error:  # a check the field accessors missed
                fields.problems.append(str(error))
        if fields.problems:
            invalid.append(InvalidRecord(index, case_id, fields.problems))
            continue
        first_index_of[case_id] = index
        cases.append(case)
        if fields.subject_case_fixed:
            case_fixed.append(index)
    if case_fixed:
        rank_zero_info(
            f"data: {len(case_fixed)} subjects occur in their prompt only up to letter case "
            f"(records {case_fixed[:_MAX_LISTED]}); the prompt's spelling is used"
        )
    return cases, invalid


def select_cases(
    cases: Sequence[EditCase], seed: int | None = None, offset: int = 0, limit: int | None = None
) -> list[EditCase]:
    """Shuffle (if `seed` is set, with a seeded torch.Generator), then drop `offset`, then keep
    at most `limit`. So a larger `limit` extends a run without reordering what came before."""
    selected = list(cases)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(selected), generator=generator).tolist()
        selected = [selected[i] for i in order]
    selected = selected[offset:]
    return selected if limit is None else selected[:limit]


def _check_options(
    format: str | None, on_invalid: str, limit: int | None, offset: int, seed: int | None
) -> None:
    if format is not None and format not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)} or None (guess), got {format!r}")
    if on_invalid not in ON_INVALID:
        raise ValueError(f"data.on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"data.limit must be a positive integer or None, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"data.offset must be a non-negative integer, got {offset!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"data.seed must be None (file order) or an integer in [0, 2**63), got {seed!r}")


def load_cases(
    path: str = DEFAULT_PATH,
    format: str | None = None,
    on_invalid: str = "error",
    limit: int | None = None,
    offset: int = 0,
    seed: int | None = None,
    split: str = "train",
) -> LoadResult:
    """Read, validate and select edit cases; usable without Lightning.

    Every record of the source is validated (not only the selected ones), so a bad record is
    found before the first edit. `on_invalid="error"` raises listing the first problems and the
    count; `"skip"` drops invalid records before shuffle/offset/limit and reports them in
    `LoadResult.skipped`. Then: shuffle (seed), offset, limit; see `select_cases`.
    """
    _check_options(format, on_invalid, limit, offset, seed)
    records = read_records(path, format, split)
    if not records:
        raise ValueError(f"data.path {path!r} holds no records")
    local = _resolve_local(path)
    is_csv = local is not None and local.suffix.lower() == ".csv"
    if format is None:
        format = guess_format(records[0], is_csv=is_csv)
    cases, invalid = validate_records(records, format)
    if invalid:
        listed = "\n  ".join(str(record) for record in invalid[:_MAX_LISTED])
        more = f"\n  ... and {len(invalid) - _MAX_LISTED} more" if len(invalid) > _MAX_LISTED else ""
        summary = f"{len(invalid)} of {len(records)} records in {path!r} (format {format})"
        if on_invalid == "error":
            raise ValueError(
                f"{summary} are invalid:\n  {listed}{more}\n(set data.on_invalid='skip' to drop them)"
            )
        rank_zero_warn(f"data: skipping {summary} that are invalid:\n  {listed}{more}")
        for record in invalid:
            rank_zero_info(f"data: skipped {record}")
    if not cases:
        raise ValueError(f"data.path {path!r} (format {format}) has no valid records")
    selected = select_cases(cases, seed=seed, offset=offset, limit=limit)
    if not selected:
        raise ValueError(f"data.offset {offset} leaves no cases: {path!r} has {len(cases)} valid records")
    return LoadResult(cases=selected, skipped=invalid, format=format, num_records=len(records))


# ----------------------------------------------------------------------------------------------
# The edit stream


def share_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of a step's `n` requests.

    Shares are ceil(n / world_size) long, the last ones shorter or empty:
    n=5, world_size=3 -> [0, 2), [2, 4), [4, 5).
    """
    chunk = math.ceil(n / world_size)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


@dataclass
class StepBatch:
    """What one rank gets for one edit step. Every rank sees the same `step` and `all_cases`."""

    step: int
    """Global step index (0-based over the whole run, resumes included)."""
    start: int
    """Position of `all_cases[0]` in the edit stream (the cursor when this step began)."""
    cases: list[EditCase]
    """This rank's share: `all_cases[share_start : share_start + len(cases)]`; may be empty."""
    all_cases: list[EditCase]
    """The whole step, all ranks' requests in order."""
    share_start: int = 0
    """Index in `all_cases` of this rank's first case."""


def _identity(item: Any) -> Any:
    return item


def _as_list(items: Sequence[Any]) -> list[Any]:
    return list(items)


class _StepStream(IterableDataset):
    """Yields the remaining steps as `StepBatch`es, from the module's cursor at `iter()` time.

    Deliberately without `__len__`: Lightning then ends the epoch when the stream ends instead
    of counting batches, which keeps a mid-epoch resume (a shorter remaining stream, restored
    loop counters) correct and keeps Lightning from adding a DistributedSampler.
    """

    def __init__(self, owner: EditDataModule):
        self.owner = owner

    def __iter__(self) -> Iterator[StepBatch]:
        owner = self.owner
        cases, batch_size = owner.cases, owner.batch_size
        world_size, rank = owner.distributed()
        start, step = owner.cursor, owner.steps_done
        while start < len(cases):
            all_cases = cases[start : start + batch_size]
            lo, hi = share_bounds(len(all_cases), world_size, rank)
            yield StepBatch(
                step=step, start=start, cases=all_cases[lo:hi], all_cases=all_cases, share_start=lo
            )
            start += len(all_cases)
            step += 1


class _CaseShard(IterableDataset):
    """This rank's share of the edited cases, in batches of `eval_batch_size`."""

    def __init__(self, owner: EditDataModule):
        self.owner = owner

    def __iter__(self) -> Iterator[list[EditCase]]:
        world_size, rank = self.owner.distributed()
        mine = self.owner.edited_cases()[rank::world_size]
        size = self.owner.eval_batch_size
        for start in range(0, len(mine), size):
            yield mine[start : start + size]


def _fingerprint(cases: Sequence[EditCase]) -> str:
    ids = json.dumps([case.case_id for case in cases]).encode()
    return hashlib.sha256(ids).hexdigest()


class EditDataModule(LightningDataModule):
    """The edit stream: validated cases in a fixed order, `batch_size` requests per step.

    The cursor (requests edited so far) counts COMPLETED steps only: the LightningModule calls
    `advance(batch)` at the end of a successful `training_step`. That is before ModelCheckpoint
    saves in `on_train_batch_end`, and it is never ahead of the work, although Lightning fetches
    the next batch before the current step runs. `state_dict()` holds the cursor, so a resumed
    run starts at the first unedited request. Use `Trainer(max_epochs=1)`: one epoch is the rest
    of the stream.

    Under DDP every rank iterates the same steps and gets a contiguous share of each step
    (`share_bounds`); ranks with nothing to do get an empty share but still run the step.
    """

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        format: str | None = None,
        batch_size: int = 1,
        limit: int | None = None,
        offset: int = 0,
        seed: int | None = None,
        on_invalid: str = "error",
        split: str = "train",
        world_size: int | None = None,
        rank: int | None = None,
        eval_batch_size: int = 16,
        predict_prompts: list[str] | None = None,
    ):
        """
        Args:
            path: Local JSON / JSON Lines / CSV file, "sample:<file>" for a file shipped in
                nmke_lightning/data (default: the 1000-case CounterFact sample), or a hub dataset id.
            format: One of counterfact_easyedit, counterfact_rome, zsre_mend, jsonl, csv;
                None guesses it from the first record's keys.
            batch_size: Edit requests per step (all ranks together).
            limit: Keep at most this many cases (after shuffle and offset); None keeps all.
            offset: Skip this many cases (after the shuffle).
            seed: None keeps file order; an integer shuffles with torch.Generator(seed) first.
            on_invalid: "error" rejects a source with any invalid record; "skip" drops them.
            split: Split to read from a hub dataset or a local folder.
            world_size: Number of ranks when no Trainer is attached (tests); else the Trainer's.
            rank: This rank when no Trainer is attached (tests); else the Trainer's global rank.
            eval_batch_size: Cases per batch in validate/test (the cases edited so far; all
                selected cases when nothing has been edited yet).
            predict_prompts: Prompts answered by `predict` (default: the edited cases' prompts).
        """
        super().__init__()
        _check_options(format, on_invalid, limit, offset, seed)
        if not isinstance(path, str) or not path:
            raise ValueError(f"data.path must be a non-empty string, got {path!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"data.split must be a non-empty string, got {split!r}")
        if world_size is not None and (
            isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1
        ):
            raise ValueError(f"data.world_size must be a positive integer or None, got {world_size!r}")
        if rank is not None and (
            isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < (world_size or 1)
        ):
            raise ValueError(
                f"data.rank must be in [0, data.world_size), got {rank!r} (world_size {world_size})"
            )
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be a positive integer, got {eval_batch_size!r}")
        if predict_prompts is not None and (
            not isinstance(predict_prompts, (list, tuple))
            or not all(isinstance(p, str) and p.strip() for p in predict_prompts)
        ):
            raise ValueError(f"data.predict_prompts must be a list of non-empty strings, got {predict_prompts!r}")
        self.eval_batch_size = eval_batch_size
        self.predict_prompts = list(predict_prompts) if predict_prompts is not None else None
        self.path, self.format, self.batch_size = path, format, batch_size
        self.limit, self.offset, self.seed = limit, offset, seed
        self.on_invalid, self.split = on_invalid, split
        self.resolved_format: str | None = format
        """`format`, or the guessed one after `setup`."""
        self._world_size, self._rank = world_size or 1, rank or 0
        self._cases: list[EditCase] | None = None
        self.skipped: list[InvalidRecord] = []
        """Invalid records dropped with on_invalid="skip" (after `setup`)."""
        self.cursor = 0
        """Requests already edited (all ranks together): the stream position of the next step."""
        self.steps_done = 0
        """Completed edit steps."""
        self._pending_state: dict[str, Any] | None = None

    # -- loading -------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download a hub dataset once per node before the ranks read it."""
        if _resolve_local(self.path) is None:
            import datasets

            datasets.load_dataset(self.path, split=self.split)

    def setup(self, stage: str | None = None) -> None:
        if self._cases is not None:
            return
        result = load_cases(
            self.path,
            format=self.format,
            on_invalid=self.on_invalid,
            limit=self.limit,
            offset=self.offset,
            seed=self.seed,
            split=self.split,
        )
        self._cases, self.skipped, self.resolved_format = result.cases, result.skipped, result.format
        rank_zero_info(
            f"data: {len(result.cases)} edit cases from {self.path!r} (format {result.format}, "
            f"{result.num_records} records, {len(result.skipped)} skipped, seed {self.seed}, "
            f"offset {self.offset}, limit {self.limit}), {self.batch_size} per step"
        )
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    @property
    def cases(self) -> list[EditCase]:
        """All selected cases in edit order (after `setup`)."""
        if self._cases is None:
            raise RuntimeError("EditDataModule.cases is available after setup()")
        return self._cases

    @property
    def remaining_steps(self) -> int:
        """Steps left from the cursor (for progress reporting; the loader itself has no length)."""
        return math.ceil((len(self.cases) - self.cursor) / self.batch_size)

    def distributed(self) -> tuple[int, int]:
        """(world_size, rank): the attached Trainer's, else the constructor's."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        return self._world_size, self._rank

    def train_dataloader(self) -> DataLoader:
        """Yields one `StepBatch` per step, from the cursor on, in a fixed order."""
        return DataLoader(_StepStream(self), batch_size=None, num_workers=0, collate_fn=_identity)

    def edited_cases(self) -> list[EditCase]:
        """The cases edited so far; all selected cases before the first edit (a baseline)."""
        return self.cases[: self.cursor] if self.cursor else list(self.cases)

    def val_dataloader(self) -> DataLoader:
        """Batches of edited cases (lists of `EditCase`) for evaluation; under DDP each rank gets
        every W-th case. An iterable, so Lightning adds no DistributedSampler, which would pad
        the ranks with repeated cases and count them twice."""
        return DataLoader(_CaseShard(self), batch_size=None, num_workers=0, collate_fn=_identity)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Batches of prompts (lists of str): `predict_prompts`, else the edited cases' prompts."""
        prompts = self.predict_prompts or [case.prompt for case in self.edited_cases()]
        return DataLoader(prompts, batch_size=self.eval_batch_size, collate_fn=_as_list)

    # -- progress ------------------------------------------------------------------------------

    def advance(self, done: StepBatch | int) -> None:
        """Record a completed step; call once per step on every rank, after the edit succeeded.

        Pass the `StepBatch` (checked to be the next unedited step) or the number of requests in
        the whole step (`len(batch.all_cases)`, the same on every rank).
        """
        cases = self.cases
        if isinstance(done, StepBatch):
            if done.step != self.steps_done or done.start != self.cursor:
                raise RuntimeError(
                    f"data: advance() got step {done.step} (stream position {done.start}) but the next "
                    f"unedited step is {self.steps_done} (position {self.cursor}); call advance once "
                    "per completed step, in order"
                )
            count = len(done.all_cases)
        else:
            count = done
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"data: advance() needs a positive number of requests, got {count!r}")
        if self.cursor + count > len(cases):
            raise ValueError(f"data: advance({count}) passes the end of the {len(cases)}-case stream")
        self.cursor += count
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        """The cursor, plus a fingerprint of the edited cases' ids to catch a changed stream."""
        if self._cases is None and self._pending_state is not None:
            return dict(self._pending_state)
        edited = self._cases[: self.cursor] if self._cases is not None else []
        return {
            "cursor": self.cursor,
            "steps_done": self.steps_done,
            "edited_fingerprint": _fingerprint(edited),
            "num_cases": len(self._cases) if self._cases is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cursor; checked against the cases once they are loaded (now or at setup)."""
        for key in ("cursor", "steps_done", "edited_fingerprint"):
            if key not in state_dict:
                raise ValueError(f"data: checkpoint state lacks {key!r}: {sorted(state_dict)}")
        cursor, steps = state_dict["cursor"], state_dict["steps_done"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (cursor, steps)):
            raise ValueError(f"data: bad checkpoint cursor {cursor!r} / steps_done {steps!r}")
        if self._cases is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        cursor = state["cursor"]
        if cursor > len(self.cases) or _fingerprint(self.cases[:cursor]) != state["edited_fingerprint"]:
            raise ValueError(
                f"data: the checkpoint edited {cursor} requests of a different stream than this one "
                f"({len(self.cases)} cases); resume with the same data.path, format, seed and offset "
                "(data.limit and data.batch_size may change)"
            )
        self.cursor, self.steps_done = cursor, state["steps_done"]
