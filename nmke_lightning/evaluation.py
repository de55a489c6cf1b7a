"""What an edit session is judged by: per-case editing metrics and general capability.

Per case (METHOD.md, "Evaluation"; both protocols of the literature):
- probability comparison (ROME/MEMIT/AlphaEdit): efficacy on the edit prompt, generalization on
  the paraphrases, specificity on the neighbourhood prompts, each as success rate and magnitude;
  their harmonic mean is the score;
- token accuracy (EasyEdit/NMKE, zsRE): reliability, generalization, locality against the unedited
  model's own predictions and against the dataset's answer.
General capability: fluency of generated continuations, perplexity of held-out WikiText (not
the covariance text), and retention of held-out facts the unedited model knew.

Each (case, paraphrase) and (case, neighbourhood prompt) pair counts as one item; the shipped
CounterFact and zsRE samples have one of each per case, where this equals averaging per case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .data import EditCase, load_cases, read_text_file
from .metrics import (
    FactRetention,
    NGramEntropy,
    Perplexity,
    ProbabilityComparison,
    TokenAccuracy,
    TokenAgreement,
    continuation,
    generate_greedy,
    harmonic_mean_score,
    perplexity_stats,
    teacher_forced,
)


@dataclass
class EvalConfig:
    """When and on what an edit session is evaluated."""

    every_n_steps: int = 0
    """Evaluate a sample of the edits so far every n steps, for the metric-vs-edits curve (0 = never)."""
    sample_size: int = 32
    """Cases in each periodic sample."""
    heldout_text: str = "sample:wikitext_heldout.txt"
    """Held-out text for perplexity ("sample:<file>" = shipped); must differ from the covariance corpus."""
    heldout_tokens: int = 4096
    """Tokens of held-out text scored for perplexity (0 = skip)."""
    retention_facts: str = "sample:counterfact_train_sample.json"
    """Held-out facts (never edited) for fact retention."""
    retention_n: int = 100
    """Held-out facts checked (0 = skip)."""
    fluency_n: int = 20
    """Edited prompts whose greedy continuations are scored for fluency (0 = skip)."""
    fluency_tokens: int = 30
    """Tokens generated per fluency prompt."""
    batch_size: int = 16
    """Prompts per forward in evaluation."""
    baseline_cache: str | None = None
    """Folder where the pre-edit baseline is kept and reused by any later session with the same
    model weights, cases and evaluation settings (see `baseline_key`); None computes it every
    session. The lifelong runner shares one folder between its sessions."""

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "heldout_tokens", "retention_n", "fluency_n"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.evaluation.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("sample_size", "fluency_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.evaluation.{name} must be >= 1, got {getattr(self, name)}")


CASE_METRICS = (
    "efficacy", "generalization", "specificity",
    "reliability", "token_generalization", "locality_unedited", "locality_answer",
)


def case_metrics() -> nn.ModuleDict:
    """Fresh metric objects for one evaluation of cases."""
    return nn.ModuleDict({
        "efficacy": ProbabilityComparison("efficacy"),
        "generalization": ProbabilityComparison("generalization"),
        "specificity": ProbabilityComparison("specificity"),
        "reliability": TokenAccuracy(),
        "token_generalization": TokenAccuracy(),
        "locality_unedited": TokenAgreement(),
        "locality_answer": TokenAccuracy(),
    })


def locality_pairs(case: EditCase) -> list[tuple[str, str]]:
    """(prompt, spaced answer) of each neighbourhood prompt that has an answer."""
    return [(p, continuation(p, a)) for p, a in case.neighbourhood if a]


@torch.no_grad()
def locality_predictions(model, tokenizer, cases: list[EditCase], batch_size: int = 16) -> dict[int, list[list[int]]]:
    """The model's argmax tokens on each case's neighbourhood answers (teacher forced), by case id:
    what 'locality against the unedited model' compares with after editing."""
    pairs = [(c.case_id, p, a) for c in cases for p, a in locality_pairs(c)]
    scores = teacher_forced(model, tokenizer, [p for _, p, _ in pairs], [a for _, _, a in pairs], batch_size)
    out: dict[int, list[list[int]]] = {}
    for (case_id, _, _), score in zip(pairs, scores):
        out.setdefault(case_id, []).append(score.predicted.tolist())
    return out


@torch.no_grad()
def update_case_metrics(
    metrics: nn.ModuleDict,
    model,
    tokenizer,
    cases: list[EditCase],
    unedited_locality: dict[int, list[list[int]]] | None,
    batch_size: int = 16,
) -> None:
    """Score `cases` on the model as it is and add them to `metrics` (see `case_metrics`)."""
    prompts, targets, slots = [], [], []

    def ask(prompt: str, target: str, slot: tuple) -> None:
        prompts.append(prompt)
        targets.append(target)
        slots.append(slot)

    for i, case in enumerate(cases):
        new = case.request.target_text
        true = continuation(case.prompt, case.target_true) if case.target_true else None
        ask(case.prompt, new, ("rewrite", i, "new"))
        if true:
            ask(case.prompt, true, ("rewrite", i, "true"))
        for j, para in enumerate(case.paraphrases):
            ask(para, new, ("para", (i, j), "new"))
            if true:
                ask(para, continuation(para, case.target_true), ("para", (i, j), "true"))
        for j, (prompt, answer) in enumerate(locality_pairs(case)):
            ask(prompt, answer, ("loc", (i, j), "answer"))
            ask(prompt, continuation(prompt, case.target_new), ("loc", (i, j), "new"))
            if case.target_true:
                ask(prompt, continuation(prompt, case.target_true), ("loc", (i, j), "true"))
    scores = dict(zip(slots, teacher_forced(model, tokenizer, prompts, targets, batch_size)))

    def pairs_of(kind: str):
        keys = sorted({s[1] for s in slots if s[0] == kind})
        return [(k, scores.get((kind, k, "new")), scores.get((kind, k, "true"))) for k in keys]

    def compare(metric, items):
        items = [(n, t) for _, n, t in items if n is not None and t is not None]
        if items:
            metric.update(torch.tensor([n.nll for n, _ in items]), torch.tensor([t.nll for _, t in items]))

    rewrite, para, loc = pairs_of("rewrite"), pairs_of("para"), pairs_of("loc")
    compare(metrics["efficacy"], rewrite)
    compare(metrics["generalization"], para)
    compare(metrics["specificity"], loc)
    metrics["reliability"].update([n.token_hits for _, n, _ in rewrite])
    if para:
        metrics["token_generalization"].update([n.token_hits for _, n, _ in para])
    answers = [(k, scores[("loc", k, "answer")]) for k, _, _ in loc]
    if answers:
        metrics["locality_answer"].update([s.token_hits for _, s in answers])
        if unedited_locality is not None:
            now, before = [], []
            for (i, j), score in answers:
                saved = unedited_locality.get(cases[i].case_id)
                if saved is not None and j < len(saved):
                    now.append(score.predicted)
                    before.append(torch.tensor(saved[j], dtype=torch.long))
            if now:
                metrics["locality_unedited"].update(now, before)


def summarise_metrics(metrics: nn.ModuleDict) -> dict[str, dict[str, float]]:
    """compute() of each metric that saw items, as plain floats (collective under DDP), plus the
    harmonic-mean score of the probability-comparison triple."""
    out: dict[str, dict[str, float]] = {}
    for name, metric in metrics.items():
        if not metric.update_called:
            continue
        result = {k: float(v) for k, v in metric.compute().items()}
        main = "perplexity" if "perplexity" in result else "score"
        out[name] = {"value": result.pop(main), **result}
    triple = [out.get(k, {}).get("value") for k in ("efficacy", "generalization", "specificity")]
    if all(v is not None for v in triple):
        out["score"] = {"value": harmonic_mean_score(*triple), "n": out["efficacy"]["n"]}
    return out


def heldout_facts(config: EvalConfig) -> list[EditCase]:
    """The first `retention_n` held-out facts that have a true answer."""
    if config.retention_n == 0:
        return []
    cases = load_cases(config.retention_facts, on_invalid="skip").cases
    return [c for c in cases if c.target_true][: config.retention_n]


@torch.no_grad()
def facts_known(model, tokenizer, facts: list[EditCase], batch_size: int = 16) -> torch.Tensor:
    """Per fact: True when every token of its true answer is the top-1 prediction."""
    scores = teacher_forced(model, tokenizer, [f.prompt for f in facts],
                            [continuation(f.prompt, f.target_true) for f in facts], batch_size)
    return torch.tensor([bool(s.token_hits.all()) for s in scores], dtype=torch.bool)


def capability_metrics() -> nn.ModuleDict:
    return nn.ModuleDict({"fluency": NGramEntropy(), "perplexity": Perplexity(), "retention": FactRetention()})


@torch.no_grad()
def update_capability(
    metrics: nn.ModuleDict,
    model,
    tokenizer,
    config: EvalConfig,
    fluency_prompts: list[str],
    facts: list[EditCase],
    known_before: torch.Tensor | None,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Fluency, perplexity and retention; under DDP each rank takes every W-th item (`shard`)."""
    rank, world = shard
    prompts = fluency_prompts[: config.fluency_n][rank::world]
    if prompts:
        metrics["fluency"].update(generate_greedy(model, tokenizer, prompts, config.fluency_tokens, config.batch_size))
    if config.heldout_tokens:
        text = read_text_file(config.heldout_text, "model.evaluation.heldout_text")
        stats = perplexity_stats(model, tokenizer, text, max_tokens=config.heldout_tokens)
        metrics["perplexity"].update(stats.total_nll[rank::world], stats.n_tokens[rank::world])
    if facts and known_before is not None:
        mine = list(range(len(facts)))[rank::world]
        now = facts_known(model, tokenizer, [facts[i] for i in mine], config.batch_size)
        metrics["retention"].update(known_before[mine], now)


BASELINE_CACHE_VERSION = 1
"""Part of every baseline key: bump it when the evaluation code changes what it measures."""


def baseline_key(model_fingerprint: str, device_type: str, cases: list[EditCase], config: EvalConfig) -> str:
    """What the pre-edit baseline depends on, hashed: the base weights (their fingerprint), the
    device type, every field of every case, the held-out text and facts it reads, and the
    evaluation settings that change its numbers."""
    h = hashlib.sha256()
    settings = {name: getattr(config, name) for name in (
        "heldout_text", "heldout_tokens", "retention_facts", "retention_n", "fluency_n", "fluency_tokens",
        "batch_size")}
    h.update(json.dumps({"version": BASELINE_CACHE_VERSION, "model": model_fingerprint, "device": device_type,
                         "settings": settings}, sort_keys=True).encode())
    for case in [*cases, *heldout_facts(config)]:
        h.update(json.dumps(dataclasses.asdict(case), sort_keys=True, default=str).encode())
    if config.heldout_tokens:
        h.update(read_text_file(config.heldout_text, "model.evaluation.heldout_text").encode())
    return h.hexdigest()[:24]


def load_baseline(path: Path) -> dict | None:
    """A saved baseline (`save_baseline`), or None if there is none or it cannot be read (a
    damaged cache file is reported and then ignored: the baseline is computed again)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not {"unedited_locality", "facts_known_before", "baseline"} <= set(saved):
            raise ValueError(f"missing keys, has {sorted(saved)}")
        return saved
    except Exception as err:  # noqa: BLE001 - a cache must never stop a session
        rank_zero_warn(f"evaluation: ignoring the unreadable baseline cache {path} ({err}); computing it again")
        return None


def save_baseline(path: Path, saved: dict) -> None:
    """Write atomically: a concurrent session reads the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(saved, tmp)
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# report.json

REPORT_SCHEMA_VERSION = 1

_METRIC_ENTRY = {
    "type": "object",
    "required": ["value", "n"],
    "properties": {
        "value": {"type": ["number", "null"]},
        "n": {"type": "number", "minimum": 0},
        "ci_low": {"type": ["number", "null"]},
        "ci_high": {"type": ["number", "null"]},
    },
}
_METRICS = {"type": "object", "additionalProperties": _METRIC_ENTRY}

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "nmke-lightning evaluation report",
    "description": (
        "Written to <log dir>/report.json after the final evaluation of fit, validate or test. "
        "metrics: every metric of the evaluated (edited) model, each with its value, item count n "
        "and 95% confidence interval (null where undefined); baseline: the same metrics of the "
        "unedited model on the session's cases (null when the session did not start from the base "
        "model in this run's checkpoint chain); curve: the periodic evaluations; timings: seconds "
        "per phase; memory: peaks in GB."
    ),
    "type": "object",
    "required": ["schema_version", "model", "method", "layers", "protocol", "metrics", "baseline", "curve",
                 "timings", "memory"],
    "properties": {
        "schema_version": {"const": REPORT_SCHEMA_VERSION},
        "model": {"type": "string"},
        "method": {"enum": ["nmke", "alphaedit", "memit"]},
        "mask_mode": {"type": ["string", "null"]},
        "layers": {"type": "array", "items": {"type": "integer"}},
        "protocol": {
            "type": "object",
            "required": ["stage", "steps", "edits", "edits_per_step", "evaluated_cases", "data"],
            "properties": {
                "stage": {"enum": ["val", "test"]},
                "steps": {"type": "integer", "minimum": 0, "description": "T: edit steps made"},
                "edits": {"type": "integer", "minimum": 0},
                "edits_per_step": {"type": "integer", "minimum": 1},
                "evaluated_cases": {"type": "integer", "minimum": 0},
                "data": {"type": "string"},
                "format": {"type": ["string", "null"]},
            },
        },
        "metrics": _METRICS,
        "baseline": {"oneOf": [{"type": "null"}, _METRICS]},
        "curve": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["step", "edits", "n", "metrics"],
                "properties": {
                    "step": {"type": "integer"},
                    "edits": {"type": "integer"},
                    "n": {"type": "integer"},
                    "metrics": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
                },
            },
        },
        "timings": {
            "type": "object",
            "required": ["seconds_per_edit", "total_seconds"],
            "properties": {
                "seconds_per_edit": {"type": "object", "additionalProperties": {"type": "number"}},
                "total_seconds": {"type": "object", "additionalProperties": {"type": "number"}},
                "covariance_seconds": {"type": ["number", "null"]},
            },
        },
        "memory": {
            "type": "object",
            "required": ["peak_rss_gb"],
            "properties": {"peak_rss_gb": {"type": "number"}, "peak_cuda_gb": {"type": ["number", "null"]}},
        },
    },
}


def finite(value):
    """JSON has no NaN: undefined numbers (a CI of one item, say) become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def peak_memory() -> dict[str, float | None]:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports kB
    cuda = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
    return {"peak_rss_gb": rss, "peak_cuda_gb": cuda}


def plot_curve(curve: list[dict], final: dict | None, path: Path, baseline: dict | None = None) -> Path:
    """Metrics against the number of edits: the unedited baseline at 0, the periodic samples, and
    the final evaluation of all edited cases."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in ("score", "efficacy", "generalization", "specificity", "reliability",
                         "token_generalization", "locality_unedited", "locality_answer")
             if any(n in p["metrics"] for p in curve) or (final and n in final["metrics"])]
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^v<>P"
    for i, name in enumerate(names):
        points = []
        if baseline and (baseline.get(name) or {}).get("value") is not None:
            points.append((0, baseline[name]["value"]))
        points += [(p["edits"], p["metrics"][name]) for p in curve if p["metrics"].get(name) is not None]
        if final and final["metrics"].get(name, {}).get("value") is not None:
            points.append((final["edits"], final["metrics"][name]["value"]))
        if points:
            xs, ys = zip(*points)
            # Distinct markers and dashes keep lines that coincide (several at 1.0) visible.
            ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle=("-", "--", ":")[i % 3],
                    label=name, color=f"C{i}", alpha=0.85)
    ax.set_xlabel("edits")
    ax.set_ylabel("metric (share)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("editing metrics vs edits (0: unedited; periodic samples; last: all edited cases)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def report_table(report: dict):
    """A rich Table of the report's metrics with their CIs, next to the unedited baseline."""
    from rich.table import Table

    def fmt(x):
        return "-" if x is None else f"{x:.4g}"

    proto = report["protocol"]
    table = Table(title=f"evaluation of {proto['evaluated_cases']} edited cases after {proto['steps']} steps "
                        f"({report['method']}, {report['model']})")
    for column in ("metric", "value", "95% CI", "n", "unedited"):
        table.add_column(column)
    baseline = report.get("baseline") or {}
    for name, entry in report["metrics"].items():
        ci = "-" if entry.get("ci_low") is None else f"[{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}]"
        table.add_row(name, fmt(entry["value"]), ci, str(int(entry["n"])), fmt(baseline.get(name, {}).get("value")))
    return table
