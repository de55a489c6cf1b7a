"""Editing metrics against hand computations, and their DDP sync against one process.

The model-side helpers run on a fake causal LM whose next-token logits depend only on the current
token (a hand-written table), with a word-level tokenizer, so every expected NLL, hit and
prediction below is worked out from the table with `math`, not with the code under test.
"""

import math
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nmke_lightning.metrics import (
    Z95,
    FactRetention,
    NGramEntropy,
    Perplexity,
    ProbabilityComparison,
    TokenAccuracy,
    TokenAgreement,
    continuation,
    generate_greedy,
    harmonic_mean_score,
    ngram_entropy,
    perplexity_stats,
    teacher_forced,
    words,
)

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "d": 6, "<unk>": 7}
PAD, BOS, EOS, A, B, C, D, UNK = range(8)
# Next-token logits given the current token (rows: current token, columns: next token).
TABLE = {
    PAD: [0, 0, 0, 0, 0, 0, 0, 0],
    BOS: [0, 0, 0, 2, 1, 0, 0, 0],  # argmax a
    EOS: [0, 0, 0, 0, 0, 0, 0, 0],
    A: [0, 0, 0, 0, 3, 1, 0, 0],  # argmax b
    B: [0, 0, 1, 0, 0, 2, 0, 0],  # argmax c
    C: [0, 0, 3, 1, 0, 0, 0, 0],  # argmax </s>
    D: [0, 0, 0, 0, 0, 0, 1, 0],  # argmax d
    UNK: [0, 0, 0, 0, 0, 0, 0, 0],
}


def log_p(current: int, nxt: int) -> float:
    """log softmax(TABLE[current])[nxt], by hand."""
    row = TABLE[current]
    return row[nxt] - math.log(sum(math.exp(x) for x in row))


class TableLM(torch.nn.Module):
    """Causal LM whose logits at each position are TABLE[current token]."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor([TABLE[i] for i in range(len(TABLE))], dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def word_tokenizer():
    """Whitespace word-level tokenizer over VOCAB that prepends <s> (its special token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="right",
    )


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    from nmke_lightning.models import load_model

    return load_model("tiny-llama")


def ci(values):
    """mean ± 1.96 s / sqrt(n) on literal values (statistics.stdev uses n - 1)."""
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# Model side


def test_continuation():
    assert continuation("The capital is", "Paris") == " Paris"
    assert continuation("The capital is ", "Paris") == "Paris"
    assert continuation("Q: capital?\n", "Paris") == "Paris"
    assert continuation("The capital is", " Paris") == " Paris"


def test_teacher_forced_by_hand(tok):
    prompts = ["a", "a b", "d"]
    targets = [" b c", " c", " a"]
    # batch_size 2: rows of different lengths share a padded batch, and a second batch follows.
    scores = teacher_forced(TableLM(), tok, prompts, targets, batch_size=2)
    # "<s> a | b c": b after a, c after b.
    assert scores[0].nll == pytest.approx(-(log_p(A, B) + log_p(B, C)) / 2, abs=1e-6)
    assert scores[0].predicted.tolist() == [B, C]
    assert scores[0].token_hits.tolist() == [1, 1]
    assert scores[0].target_ids.tolist() == [B, C]
    # "<s> a b | c"
    assert scores[1].nll == pytest.approx(-log_p(B, C), abs=1e-6)
    assert scores[1].predicted.tolist() == [C]
    assert scores[1].token_hits.tolist() == [1]
    # "<s> d | a": d predicts d, so a miss.
    assert scores[2].nll == pytest.approx(-log_p(D, A), abs=1e-6)
    assert scores[2].predicted.tolist() == [D]
    assert scores[2].token_hits.tolist() == [0]
    assert scores[2].token_hits.dtype == torch.long


def test_teacher_forced_rejects_mismatch(tok):
    with pytest.raises(ValueError, match="prompts"):
        teacher_forced(TableLM(), tok, ["a"], [" b", " c"])


class _NoGenerate(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kw):
        return self.inner(*args, **kw)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-gpt-neox"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("keep_logits", [True, False])
def test_teacher_forced_batched_equals_one_by_one(name, batch_size, keep_logits):
    """On a real (random) transformer, length-sorted right-padded batches (with the LM head at the
    target positions only, or on every position for a model without ``logits_to_keep``) score
    like unpadded single rows, returned in the order given."""
    from nmke_lightning.models import load_model

    lm = load_model(name)
    model, t = lm.model, lm.tokenizer
    prompts = ["The city of", "In 1990 the river that runs through", "A", "The city of", "Its name is"]
    targets = [" London", " was named after the", " b", " Paris and the old", " X"]
    scored = model if keep_logits else _NoGenerate(model)
    scores = teacher_forced(scored, t, prompts, targets, batch_size=batch_size)
    for prompt, target, score in zip(prompts, targets, scores):
        p_ids = t(prompt)["input_ids"]
        t_ids = t(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
        rows = log_probs[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)]
        expected_nll = -rows.gather(-1, torch.tensor(t_ids)[:, None]).mean()
        assert score.nll == pytest.approx(float(expected_nll), abs=1e-4)
        assert score.predicted.tolist() == rows.argmax(-1).tolist()
        assert score.target_ids.tolist() == t_ids


def test_generate_greedy_by_hand(tok):
    # <s> a -> b -> c -> </s> (stop); <s> d -> d -> d ... up to max_new_tokens.
    assert generate_greedy(TableLM(), tok, ["a", "d"], max_new_tokens=3) == ["b c", "d d d"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-gpt-neox"])
def test_generate_greedy_batches_left_padded_prompts_like_the_plain_loop(name):
    from nmke_lightning.models import load_model

    lm = load_model(name)
    # Prompts of different lengths, so the batched rows are left-padded; 3 prompts in batches of 2.
    prompts = ["The city of", "In 1990 the river that runs through the old town was", "A"]
    plain = generate_greedy(_NoGenerate(lm.model), lm.tokenizer, prompts, max_new_tokens=8)
    assert len({len(lm.tokenizer(p)["input_ids"]) for p in prompts}) == 3
    assert all(text for text in plain)
    for batch_size in (1, 2, 3):
        assert generate_greedy(lm.model, lm.tokenizer, prompts, max_new_tokens=8, batch_size=batch_size) == plain
    with pytest.raises(ValueError, match="batch_size"):
        generate_greedy(lm.model, lm.tokenizer, prompts, batch_size=0)


def test_perplexity_stats_by_hand(tok):
    # "a b c a" in chunks of 2 tokens, each after <s>: [<s> a b], [<s> c a].
    stats = perplexity_stats(TableLM(), tok, "a b c a", seq_len=2, batch_size=1)
    expected = [-(log_p(BOS, A) + log_p(A, B)), -(log_p(BOS, C) + log_p(C, A))]
    assert stats.total_nll.tolist() == pytest.approx(expected, abs=1e-6)
    assert stats.n_tokens.tolist() == [2, 2]
    # The first 3 tokens only: [<s> a b], [<s> c].
    stats = perplexity_stats(TableLM(), tok, "a b c a", seq_len=2, max_tokens=3)
    assert stats.total_nll.tolist() == pytest.approx([expected[0], -log_p(BOS, C)], abs=1e-6)
    assert stats.n_tokens.tolist() == [2, 1]
    metric = Perplexity()
    metric.update(*stats)
    out = metric.compute()
    total = expected[0] - log_p(BOS, C)
    assert float(out["perplexity"]) == pytest.approx(math.exp(total / 3), rel=1e-6)
    assert int(out["n"]) == 3 and int(out["chunks"]) == 2


# ---------------------------------------------------------------------------------------------
# Metrics on literal values


def test_probability_comparison_literal():
    nll_new = torch.tensor([0.5, 2.0, 1.0])
    nll_true = torch.tensor([1.0, 1.0, 3.0])
    eff = ProbabilityComparison("efficacy")
    eff.update(nll_new, nll_true)
    out = eff.compute()
    # new beats true on items 0 and 2.
    assert float(out["score"]) == pytest.approx(2 / 3)
    magnitudes = [math.exp(-0.5) - math.exp(-1.0), math.exp(-2.0) - math.exp(-1.0), math.exp(-1.0) - math.exp(-3.0)]
    assert float(out["magnitude"]) == pytest.approx(sum(magnitudes) / 3)
    assert int(out["n"]) == 3
    # success values 1, 0, 1: mean 2/3, s^2 = 1/3, half width 1.96 * sqrt(1/9).
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx(ci([1, 0, 1]))
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx((2 / 3 - Z95 / 3, 2 / 3 + Z95 / 3))
    assert (float(out["magnitude_ci_low"]), float(out["magnitude_ci_high"])) == pytest.approx(ci(magnitudes))

    spec = ProbabilityComparison("specificity")
    spec.update(nll_new, nll_true)
    out = spec.compute()
    assert float(out["score"]) == pytest.approx(1 / 3)  # only item 1 keeps true ahead
    assert float(out["magnitude"]) == pytest.approx(-sum(magnitudes) / 3)

    gen = ProbabilityComparison("generalization")
    gen.update(torch.tensor([1.0]), torch.tensor([1.0]))  # a tie is not a success
    out = gen.compute()
    assert float(out["score"]) == 0.0 and int(out["n"]) == 1
    assert math.isnan(float(out["ci_low"])) and math.isnan(float(out["ci_high"]))  # n < 2

    with pytest.raises(ValueError, match="kind"):
        ProbabilityComparison("accuracy")


def test_harmonic_mean_literal():
    assert harmonic_mean_score(0.5, 1.0, 0.25) == pytest.approx(3 / (2 + 1 + 4))
    assert harmonic_mean_score(0.8, 0.8, 0.8) == pytest.approx(0.8)
    assert harmonic_mean_score(torch.tensor(0.5), 0.0, 1.0) == 0.0


def test_token_accuracy_and_agreement_literal():
    acc = TokenAccuracy()
    acc.update([torch.tensor([1, 0]), torch.tensor([1, 1, 1])])
    acc.update([torch.tensor([0])])
    out = acc.compute()
    # per item 0.5, 1, 0
    assert float(out["score"]) == pytest.approx(0.5)
    assert int(out["n"]) == 3
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx(ci([0.5, 1.0, 0.0]))

    agree = TokenAgreement()
    agree.update([torch.tensor([3, 4]), torch.tensor([5])], [torch.tensor([3, 5]), torch.tensor([5])])
    out = agree.compute()
    assert float(out["score"]) == pytest.approx(0.75)  # items 1/2 and 1/1
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx(ci([0.5, 1.0]))
    with pytest.raises(ValueError, match="predicted tokens"):
        agree.update([torch.tensor([1, 2])], [torch.tensor([1])])


def test_locality_agreement_from_teacher_forced(tok):
    """Locality against the unedited model: the same model agrees with itself everywhere."""
    model = TableLM()
    before = teacher_forced(model, tok, ["a", "d"], [" b c", " a"])
    with torch.no_grad():
        model.table[D, A] = 5.0  # "edit": d now predicts a
    now = teacher_forced(model, tok, ["a", "d"], [" b c", " a"])
    agree = TokenAgreement()
    agree.update([s.predicted for s in now], [s.predicted for s in before])
    assert float(agree.compute()["score"]) == pytest.approx((1.0 + 0.0) / 2)


def test_words_and_ngram_entropy_literal():
    assert words("The cat, sat.") == ["the", "cat", ",", "sat", "."]
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3; trigrams aba, bab -> p = 1/2, 1/2.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # 0.918...
    h3 = 1.0
    first = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(first)
    # "The cat. The cat." -> the cat . the cat .
    # bigrams (the cat) x2, (cat .) x2, (. the) x1 -> p = .4, .4, .2
    # trigrams (the cat .) x2, (cat . the), (. the cat) -> p = .5, .25, .25 -> 1.5 bits
    h2 = -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    second = (2 / 3 * h2 + 4 / 3 * 1.5) / 2
    assert ngram_entropy("The cat. The cat.") == pytest.approx(second)
    assert ngram_entropy("hi") == 0.0  # no bigram, no trigram

    metric = NGramEntropy()
    metric.update(["a b a b", "The cat. The cat."])
    metric.update(["hi"])
    out = metric.compute()
    assert float(out["score"]) == pytest.approx(100 * (first + second) / 3)
    low, high = ci([first, second, 0.0])
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx((100 * low, 100 * high))
    assert int(out["n"]) == 3


def test_perplexity_literal():
    metric = Perplexity()
    metric.update(torch.tensor([2.0, 6.0]), torch.tensor([2, 3]))
    metric.update(torch.tensor(1.0), torch.tensor(1))  # a scalar total counts as one chunk
    out = metric.compute()
    # 9 nats over 6 tokens; chunk means 1, 2, 1 (mean 4/3, s^2 = 1/3, half width 1.96 / 3).
    assert float(out["perplexity"]) == pytest.approx(math.exp(1.5))
    assert float(out["nll"]) == pytest.approx(1.5)
    assert int(out["n"]) == 6 and int(out["chunks"]) == 3
    half = Z95 * statistics.stdev([1.0, 2.0, 1.0]) / math.sqrt(3)
    assert half == pytest.approx(Z95 / 3)
    assert float(out["ci_low"]) == pytest.approx(math.exp(1.5 - half))
    assert float(out["ci_high"]) == pytest.approx(math.exp(1.5 + half))


def test_fact_retention_literal():
    metric = FactRetention()
    metric.update(torch.tensor([True, True, False, True, False]), torch.tensor([True, False, True, True, False]))
    out = metric.compute()
    # correct before: facts 0, 1, 3; still correct: 0, 3 (fact 2 became right: not counted).
    assert float(out["score"]) == pytest.approx(2 / 3)
    assert int(out["n"]) == 3
    assert (float(out["ci_low"]), float(out["ci_high"])) == pytest.approx(ci([1, 0, 1]))


def test_metric_reset():
    metric = TokenAccuracy()
    metric.update([torch.tensor([1])])
    metric.reset()
    metric.update([torch.tensor([0, 0])])
    assert float(metric.compute()["score"]) == 0.0 and int(metric.compute()["n"]) == 1


# ---------------------------------------------------------------------------------------------
# DDP: each of 2 CPU ranks sees part of the items; compute() must equal one process seeing all.

NLL_NEW = [0.5, 2.0, 1.0, 0.1, 3.0]
NLL_TRUE = [1.0, 1.0, 3.0, 0.2, 0.5]
HITS = [[1, 0], [1, 1, 1], [0], [1, 1], [0, 1, 1]]
NOW = [[3, 4], [5], [6, 6, 1], [2], [1, 2]]
BEFORE = [[3, 5], [5], [6, 1, 1], [3], [1, 2]]
TEXTS = ["a b a b", "The cat. The cat.", "hi", "one two three four", "x y x y x"]
CHUNK_NLL = [2.0, 6.0, 1.0, 4.5, 0.5]
CHUNK_TOKENS = [2, 3, 1, 4, 1]
FACTS_BEFORE = [True, True, False, True, False]
FACTS_NOW = [True, False, True, True, False]


def _all_metrics(items):
    """Every metric, updated with the items at indices `items` (in one or two updates)."""
    pick = lambda xs: [xs[i] for i in items]  # noqa: E731
    metrics = {
        "efficacy": ProbabilityComparison("efficacy"),
        "specificity": ProbabilityComparison("specificity"),
        "accuracy": TokenAccuracy(),
        "agreement": TokenAgreement(),
        "fluency": NGramEntropy(),
        "perplexity": Perplexity(),
        "retention": FactRetention(),
    }
    for kind in ("efficacy", "specificity"):
        metrics[kind].update(torch.tensor(pick(NLL_NEW)), torch.tensor(pick(NLL_TRUE)))
    metrics["accuracy"].update([torch.tensor(h) for h in pick(HITS)])
    metrics["agreement"].update([torch.tensor(x) for x in pick(NOW)], [torch.tensor(x) for x in pick(BEFORE)])
    metrics["fluency"].update(pick(TEXTS))
    metrics["perplexity"].update(torch.tensor(pick(CHUNK_NLL)), torch.tensor(pick(CHUNK_TOKENS)))
    metrics["retention"].update(torch.tensor(pick(FACTS_BEFORE)), torch.tensor(pick(FACTS_NOW)))
    return {name: {k: v.double() for k, v in m.compute().items()} for name, m in metrics.items()}


RANK_ITEMS = ([0, 1, 2], [3, 4])  # uneven halves


def _ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        torch.save(_all_metrics(RANK_ITEMS[rank]), Path(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_cpu_ranks():
    expected = _all_metrics(range(len(NLL_NEW)))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, tmp), nprocs=2, join=True)
        results = [torch.load(Path(tmp, f"rank{r}.pt")) for r in range(2)]
    for result in results:
        assert result.keys() == expected.keys()
        for name, values in expected.items():
            assert result[name].keys() == values.keys(), name
            for key, value in values.items():
                torch.testing.assert_close(result[name][key], value, equal_nan=True, msg=f"{name}.{key}")
    # The synced values are not the per-rank ones.
    assert int(results[0]["accuracy"]["n"]) == len(HITS)
