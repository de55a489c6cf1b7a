"""Editing scores: model-side helpers that score text, and torchmetrics Metrics that average them.

Two evaluation protocols (METHOD.md, "Evaluation"):

- probability comparison (ROME/MEMIT/AlphaEdit): `teacher_forced` gives the mean per-token NLL of
  " target_new" and " target_true" after a prompt; `ProbabilityComparison` turns the pairs into
  efficacy / generalization / specificity, `harmonic_mean_score` into their harmonic mean, and
  `NGramEntropy` scores the fluency of `generate_greedy` continuations;
- token accuracy (EasyEdit, ZsRE): `teacher_forced` also gives the top-1 hits and predictions per
  target token; `TokenAccuracy` averages hits (reliability, generalization, locality against the
  dataset's answer), `TokenAgreement` compares predictions with the unedited model's (locality).

General capability: `perplexity_stats` + `Perplexity` on held-out text, `FactRetention` on
held-out facts.

Every Metric keeps only sums (of per-item values, of their squares, and counts), registered with
``dist_reduce_fx="sum"``, so `compute()` after DDP sync equals a single process that saw all items.
Each `compute()` returns a dict with the value, ``n`` and a 95% normal-approximation confidence
interval ``mean ± 1.96 · s / sqrt(n)`` (``s`` the sample standard deviation of the per-item
values, from their sum and sum of squares); with fewer than 2 items the interval is NaN.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torchmetrics import Metric

from nmke_lightning.editing.tokens import pad_right, target_ids

__all__ = [
    "FactRetention",
    "NGramEntropy",
    "Perplexity",
    "PerplexityStats",
    "ProbabilityComparison",
    "TargetScore",
    "TokenAccuracy",
    "TokenAgreement",
    "Z95",
    "continuation",
    "generate_greedy",
    "harmonic_mean_score",
    "mean_ci",
    "ngram_entropy",
    "perplexity_stats",
    "teacher_forced",
    "words",
]

Z95 = 1.96
"""Two-sided 95% quantile of the standard normal, for the confidence intervals."""


# ----------------------------------------------------------------------------------------------
# Model side


@dataclass
class TargetScore:
    """How a model scores one target continuation under teacher forcing."""

    nll: float
    """Mean over the target tokens of -log p(token | prompt, earlier target tokens), in nats."""
    token_hits: torch.Tensor
    """[n_target_tokens] long, 1 where the argmax prediction is the target token."""
    predicted: torch.Tensor
    """[n_target_tokens] long, the argmax token ids at the target positions."""
    target_ids: torch.Tensor
    """[n_target_tokens] long, the target's token ids."""


def continuation(prompt: str, answer: str) -> str:
    """`answer` as it continues `prompt`: with a leading space unless the prompt ends with
    whitespace or the answer starts with it (the rule of `EditRequest.target_text`)."""
    if prompt[-1:].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[TargetScore]:
    """Score each ``targets[i]`` after ``prompts[i]`` with teacher forcing.

    The prompt is tokenised with the tokenizer's special tokens and the target without, appended
    to the prompt's ids; give targets already spaced (see `continuation`). Rows are right-padded,
    so each row sees the positions it would see alone. Rows are batched in order of length (less
    padding) and the LM head runs only at the positions that predict a target token, when the
    model takes ``logits_to_keep``; the scores come back in the order of `prompts`.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"teacher_forced got {len(prompts)} prompts but {len(targets)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    rows, n_target = [], []
    for prompt, ids, target in zip(prompts, prompt_ids, targets):
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenises to nothing: the target has no context")
        suffix = target_ids(tokenizer, target)
        rows.append(list(ids) + suffix)
        n_target.append(len(suffix))
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), n_target[i]))
    scores: list[TargetScore | None] = [None] * len(rows)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        input_ids, attention_mask = pad_right([rows[i] for i in chunk], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        end = attention_mask.sum(1)  # [B] one past the last target token
        start = end - torch.tensor([n_target[i] for i in chunk], device=device)  # [B] first target token
        # Position p predicts token p + 1: the positions [first, last) predict every target token.
        first, last = int(start.min()) - 1, int(end.max()) - 1
        kwargs = {"logits_to_keep": torch.arange(first, last, device=device)} if keep_logits else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        if not keep_logits:
            logits = logits[:, first:last]
        nxt = torch.arange(first + 1, last + 1, device=device)  # [K] the token each kept position predicts
        is_target = (nxt[None] >= start[:, None]) & (nxt[None] < end[:, None])  # [B, K]
        chosen = logits[is_target].float()  # [N, V], N = sum of target lengths, row-major
        labels = input_ids[:, first + 1 : last + 1][is_target]  # [N]
        token_nll = -chosen.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)  # [N]
        predicted = chosen.argmax(-1)  # [N]
        counts = [n_target[i] for i in chunk]
        for i, nll, pred, label in zip(
            chunk, token_nll.cpu().split(counts), predicted.cpu().split(counts), labels.cpu().split(counts)
        ):
            scores[i] = TargetScore(
                nll=float(nll.double().mean()),
                token_hits=(pred == label).long(),
                predicted=pred.long(),
                target_ids=label.long(),
            )
    return scores


@torch.no_grad()
def _greedy_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache): for models without
    ``generate``, and as a reference for it."""
    ids = torch.tensor([prompt_ids], device=_device(model))
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        if eos_id is not None and token == eos_id:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100, batch_size: int = 32
) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens and without the prompt;
    stops at the tokenizer's eos token. 100 new tokens is ROME's fluency setting (its generations
    are longer in total; shorter texts give lower n-gram entropies).

    Models with ``generate`` decode `batch_size` prompts at a time, left-padded (the pads are
    masked and the positions start at each prompt's first token, so a row continues as it would
    alone); others run `_greedy_ids` prompt by prompt.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device = _device(model)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenises to nothing")
        rows.append(list(ids))
    if not hasattr(model, "generate"):
        return [tokenizer.decode(_greedy_ids(model, ids, max_new_tokens, eos_id), skip_special_tokens=True)
                for ids in rows]
    fill = pad_id if pad_id is not None else 0  # left padding, masked
    texts = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[fill] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
        )
        for new in out[:, width:].tolist():
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


class PerplexityStats(NamedTuple):
    """Per-chunk sums for `Perplexity.update`; ``total_nll.sum() / n_tokens.sum()`` is the mean
    NLL of the whole text."""

    total_nll: torch.Tensor
    """[n_chunks] float64, summed NLL (nats) of the scored tokens of each chunk."""
    n_tokens: torch.Tensor
    """[n_chunks] long, scored tokens in each chunk."""


@torch.no_grad()
def perplexity_stats(
    model,
    tokenizer,
    text: str,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> PerplexityStats:
    """Summed NLL and token counts of `text` over consecutive, non-overlapping chunks.

    The text is tokenised without special tokens and cut to its first `max_tokens` tokens (all
    when None), then into chunks of `seq_len` tokens (the last may be shorter). Each chunk is
    scored on its own, after the tokenizer's bos token (else its eos token) as context, so every
    text token is scored once; with neither token, a chunk's first token is context only.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [prefix_id] if prefix_id is not None else []
    rows = [prefix + ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("perplexity_stats: the text has no token to score")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    total_nll, n_tokens = [], []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        input_ids, attention_mask = pad_right(chunk, pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        scored = attention_mask[:, 1:].bool()  # [B, T-1] position p predicts real token p + 1
        row = torch.arange(len(chunk), device=device)[:, None].expand_as(scored)[scored]  # [N]
        labels = input_ids[:, 1:][scored]  # [N]
        token_nll = -logits[:, :-1][scored].float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        total_nll.append(torch.zeros(len(chunk), dtype=torch.float64, device=device)
                         .index_add_(0, row, token_nll.double()).cpu())
        n_tokens.append(scored.sum(1).cpu())
    return PerplexityStats(torch.cat(total_nll), torch.cat(n_tokens).long())


# ----------------------------------------------------------------------------------------------
# Metrics


def mean_ci(total: torch.Tensor, total_sq: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, ci_low, ci_high) of items from their sum, sum of squares and count:
    ``mean ± Z95 · s / sqrt(n)`` with ``s² = (Σx² − n·mean²) / (n − 1)``. NaN where undefined."""
    total, total_sq, n = (torch.as_tensor(t, dtype=torch.float64) for t in (total, total_sq, n))
    nan = torch.full_like(total, float("nan"))
    mean = torch.where(n > 0, total / n.clamp(min=1), nan)
    var = ((total_sq - n * mean**2) / (n - 1).clamp(min=1)).clamp(min=0)  # rounding can go below 0
    half = torch.where(n > 1, Z95 * (var / n.clamp(min=1)).sqrt(), nan)
    return mean, mean - half, mean + half


class _ItemMean(Metric):
    """Means of per-item quantities, each with a normal-approximation 95% CI; `_add` takes
    same-length 1-D tensors, one per name in `quantities`."""

    quantities: tuple[str, ...] = ("score",)
    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for q in self.quantities:
            self.add_state(f"{q}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{q}_sumsq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, **values: torch.Tensor) -> None:
        sizes = {v.numel() for v in values.values()}
        if len(sizes) != 1:
            raise ValueError(f"{type(self).__name__}: per-item tensors differ in length")
        for q, v in values.items():
            v = torch.as_tensor(v).reshape(-1).to(device=self.n.device, dtype=torch.float64)
            setattr(self, f"{q}_sum", getattr(self, f"{q}_sum") + v.sum())
            setattr(self, f"{q}_sumsq", getattr(self, f"{q}_sumsq") + (v * v).sum())
        self.n = self.n + sizes.pop()

    def _summary(self, q: str, scale: float = 1.0, prefix: str = "") -> dict[str, torch.Tensor]:
        mean, low, high = mean_ci(getattr(self, f"{q}_sum"), getattr(self, f"{q}_sumsq"), self.n)
        return {q: mean * scale, f"{prefix}ci_low": low * scale, f"{prefix}ci_high": high * scale}

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self._summary(self.quantities[0]), "n": self.n.clone()}


def _to_1d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a 1-D tensor of per-item values, got shape {tuple(t.shape)}")
    return t.reshape(-1)


class ProbabilityComparison(_ItemMean):
    """Probability-comparison score of ROME/MEMIT/AlphaEdit over items (prompt, new, true).

    For each item, with ``nll_new`` / ``nll_true`` the mean per-token NLL of the new / true target:

    - ``kind="efficacy"`` or ``"generalization"``: success = [nll_new < nll_true],
      magnitude = exp(-nll_new) - exp(-nll_true);
    - ``kind="specificity"``: success = [nll_true < nll_new],
      magnitude = exp(-nll_true) - exp(-nll_new).

    ``score`` = mean success, ``magnitude`` = mean magnitude over items (each item counts once:
    average per case beforehand to weight cases equally). ``ci_low``/``ci_high`` belong to the
    score, ``magnitude_ci_low``/``magnitude_ci_high`` to the magnitude.
    """

    KINDS = ("efficacy", "generalization", "specificity")
    quantities = ("score", "magnitude")

    def __init__(self, kind: str = "efficacy", **kwargs) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"ProbabilityComparison.kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        super().__init__(**kwargs)
        self.kind = kind

    def update(self, nll_new: torch.Tensor, nll_true: torch.Tensor) -> None:
        nll_new = _to_1d(nll_new, "nll_new").double()
        nll_true = _to_1d(nll_true, "nll_true").double()
        if nll_new.shape != nll_true.shape:
            raise ValueError(f"nll_new has {nll_new.numel()} items but nll_true {nll_true.numel()}")
        wanted, other = (nll_true, nll_new) if self.kind == "specificity" else (nll_new, nll_true)
        self._add(score=(wanted < other).double(), magnitude=(-wanted).exp() - (-other).exp())

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self._summary("score"), **self._summary("magnitude", prefix="magnitude_"),
                "n": self.n.clone()}


def harmonic_mean_score(efficacy, generalization, specificity) -> float:
    """ROME's overall score: 3 / (1/efficacy + 1/generalization + 1/specificity) of the three
    success rates; 0 when any of them is 0."""
    rates = [float(r) for r in (efficacy, generalization, specificity)]
    if any(r <= 0 for r in rates):
        return 0.0
    return len(rates) / sum(1.0 / r for r in rates)


def _item_means(items: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    means = []
    for i, t in enumerate(items):
        t = torch.as_tensor(t)
        if t.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty")
        means.append(t.double().mean())
    return torch.stack(means) if means else torch.zeros(0, dtype=torch.float64)


class TokenAccuracy(_ItemMean):
    """Teacher-forced top-1 token accuracy (EasyEdit, ZsRE).

    Per item: acc_i = (1 / L_i) Σ_t hit_{i,t}, with hit = [argmax prediction == target token]
    (`TargetScore.token_hits`). score = mean over items of acc_i. Reliability (edit prompt,
    target_new), generalization (paraphrases, target_new), ZsRE accuracy, and locality against
    the dataset's answer.
    """

    def update(self, token_hits: Sequence[torch.Tensor]) -> None:
        self._add(score=_item_means(token_hits, "token_hits"))


class TokenAgreement(_ItemMean):
    """Locality as agreement with the unedited model (EasyEdit).

    Per item, on the same teacher-forced input: agree_i = (1 / L_i) Σ_t [now_{i,t} == before_{i,t}],
    with now/before the edited/unedited model's argmax tokens (`TargetScore.predicted`).
    score = mean over items of agree_i.
    """

    def update(self, predicted_now: Sequence[torch.Tensor], predicted_before: Sequence[torch.Tensor]) -> None:
        if len(predicted_now) != len(predicted_before):
            raise ValueError(f"{len(predicted_now)} items now but {len(predicted_before)} before")
        same = []
        for i, (now, before) in enumerate(zip(predicted_now, predicted_before)):
            now, before = torch.as_tensor(now), torch.as_tensor(before).to(torch.as_tensor(now).device)
            if now.shape != before.shape:
                raise ValueError(f"item {i}: {now.numel()} predicted tokens now but {before.numel()} before")
            same.append(now == before)
        self._add(score=_item_means(same, "predicted_now"))


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words for the n-gram entropy: runs of word characters, and each other
    non-space character on its own (regex ``\\w+|[^\\w\\s]``; a stand-in for NLTK's tokenizer)."""
    return _WORD.findall(text.lower())


NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
"""n -> weight of the n-gram entropy in ROME's fluency score."""


def ngram_entropy(text: str) -> float:
    """Fluency of one text in bits: mean over n in (2, 3) of w_n · H_n, with w_2 = 2/3, w_3 = 4/3
    and H_n = -Σ_g p(g) log2 p(g) over the frequency distribution of the text's n-grams of
    `words` (0 when the text has fewer than n words)."""
    tokens = words(text)
    weighted = []
    for n, weight in NGRAM_WEIGHTS.items():
        counts = Counter(zip(*(tokens[i:] for i in range(n))))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


class NGramEntropy(_ItemMean):
    """Fluency as in ROME: weighted 2-/3-gram entropy of generated text, reported x100.

    Per text: f_i = (2/3 · H_2 + 4/3 · H_3) / 2 in bits (`ngram_entropy`, words from `words`).
    score = 100 · mean over texts of f_i (the x100 of the papers' tables); the CI is scaled alike.
    """

    SCALE = 100.0

    def update(self, texts: Sequence[str]) -> None:
        if isinstance(texts, str):
            raise ValueError("NGramEntropy.update takes a list of texts, not one string")
        self._add(score=torch.tensor([ngram_entropy(t) for t in texts], dtype=torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self._summary("score", scale=self.SCALE), "n": self.n.clone()}


class Perplexity(Metric):
    """Perplexity of held-out text: exp(Σ NLL / Σ tokens) over all chunks (token-weighted).

    update(total_nll, n_tokens) takes per-chunk sums (`perplexity_stats`) or scalar totals.
    ``n`` = tokens, ``chunks`` = chunks with at least one token. CI: with L = Σ NLL / Σ tokens and
    s the sample standard deviation of the per-chunk mean NLLs m_c = nll_c / tokens_c over k chunks,
    [exp(L − 1.96 · s / sqrt(k)), exp(L + 1.96 · s / sqrt(k))] — chunks, not tokens, are treated
    as the independent samples (tokens within a chunk are correlated); NaN with fewer than 2 chunks.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("chunk_mean_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chunk_mean_sumsq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chunks", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, total_nll: torch.Tensor, n_tokens: torch.Tensor) -> None:
        nll = torch.as_tensor(total_nll).reshape(-1).to(self.nll.device, torch.float64)
        count = torch.as_tensor(n_tokens).reshape(-1).to(self.nll.device, torch.long)
        if nll.shape != count.shape:
            raise ValueError(f"total_nll has {nll.numel()} chunks but n_tokens {count.numel()}")
        if bool((count < 0).any()):
            raise ValueError("n_tokens must be >= 0")
        self.nll = self.nll + nll.sum()
        self.tokens = self.tokens + count.sum()
        real = count > 0
        means = nll[real] / count[real]
        self.chunk_mean_sum = self.chunk_mean_sum + means.sum()
        self.chunk_mean_sumsq = self.chunk_mean_sumsq + (means * means).sum()
        self.chunks = self.chunks + real.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens.double()
        mean_nll = torch.where(tokens > 0, self.nll / tokens.clamp(min=1), torch.full_like(tokens, float("nan")))
        chunk_mean, low, _ = mean_ci(self.chunk_mean_sum, self.chunk_mean_sumsq, self.chunks)
        half = chunk_mean - low
        return {
            "perplexity": mean_nll.exp(),
            "nll": mean_nll,
            "ci_low": (mean_nll - half).exp(),
            "ci_high": (mean_nll + half).exp(),
            "n": self.tokens.clone(),
            "chunks": self.chunks.clone(),
        }


class FactRetention(_ItemMean):
    """Retention of held-out facts: of the facts the model got right before editing, the share it
    still gets right now: score = Σ_i [before_i ∧ now_i] / Σ_i [before_i]; ``n`` = Σ_i [before_i]
    (facts wrong before are not counted). The CI is the proportion formula on those n 0/1 values.
    """

    def update(self, correct_before: torch.Tensor, correct_now: torch.Tensor) -> None:
        before = _to_1d(correct_before, "correct_before").bool()
        now = _to_1d(correct_now, "correct_now").bool().to(before.device)
        if before.shape != now.shape:
            raise ValueError(f"correct_before has {before.numel()} facts but correct_now {now.numel()}")
        self._add(score=now[before].double())
