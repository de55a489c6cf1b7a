"""Case metrics on a model against a plain per-pair loop; the report against its schema."""

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch

from nmke_lightning.cli import main
from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.evaluation import (
    REPORT_SCHEMA,
    case_metrics,
    locality_predictions,
    summarise_metrics,
    update_case_metrics,
)
from nmke_lightning.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def plain_score(lm, prompt, target):
    """Unbatched, unpadded: mean NLL of the target tokens, their argmax hits and predictions."""
    tok = lm.tokenizer
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    rows = range(len(p_ids) - 1, len(p_ids) + len(t_ids) - 1)
    nll = -sum(float(logp[r, t]) for r, t in zip(rows, t_ids)) / len(t_ids)
    predicted = [int(logits[r].argmax()) for r in rows]
    return nll, [int(p == t) for p, t in zip(predicted, t_ids)], predicted


def spaced(prompt, answer):
    return answer if prompt.endswith(" ") or answer.startswith(" ") else " " + answer


def test_case_metrics_equal_a_plain_loop():
    lm = load_model("tiny-llama", seed=1)
    cases = load_cases(sample_path("counterfact_sample.json"), limit=5).cases
    before = locality_predictions(lm.model, lm.tokenizer, cases, batch_size=3)
    metrics = case_metrics()
    update_case_metrics(metrics, lm.model, lm.tokenizer, cases, before, batch_size=3)
    got = summarise_metrics(metrics)

    eff, gen, spec, rel, tgen, loc_ans = [], [], [], [], [], []
    for c in cases:
        new_nll, hits, _ = plain_score(lm, c.prompt, spaced(c.prompt, c.target_new))
        true_nll, _, _ = plain_score(lm, c.prompt, spaced(c.prompt, c.target_true))
        eff.append(new_nll < true_nll)
        rel.append(sum(hits) / len(hits))
        for para in c.paraphrases:
            n, h, _ = plain_score(lm, para, spaced(para, c.target_new))
            t, _, _ = plain_score(lm, para, spaced(para, c.target_true))
            gen.append(n < t)
            tgen.append(sum(h) / len(h))
        for prompt, answer in c.neighbourhood:
            n, _, _ = plain_score(lm, prompt, spaced(prompt, c.target_new))
            t, _, _ = plain_score(lm, prompt, spaced(prompt, c.target_true))
            spec.append(t < n)
            _, h, _ = plain_score(lm, prompt, spaced(prompt, answer))
            loc_ans.append(sum(h) / len(h))
    expected = {"efficacy": eff, "generalization": gen, "specificity": spec, "reliability": rel,
                "token_generalization": tgen, "locality_answer": loc_ans}
    for name, values in expected.items():
        assert got[name]["n"] == len(values) == 5
        assert got[name]["value"] == pytest.approx(sum(values) / len(values), abs=1e-9), name
    # Nothing was edited: the model agrees with its own unedited predictions everywhere.
    assert got["locality_unedited"]["value"] == 1.0
    e, g, s = (sum(expected[k]) / 5 for k in ("efficacy", "generalization", "specificity"))
    harmonic = 0.0 if min(e, g, s) == 0 else 3 / (1 / e + 1 / g + 1 / s)
    assert got["score"]["value"] == pytest.approx(harmonic)
    # The 95% CI of a proportion from its 0/1 items.
    p = sum(rel) / 5
    sd = math.sqrt(sum((x - p) ** 2 for x in rel) / 4)
    assert got["reliability"]["ci_low"] == pytest.approx(p - 1.959963984540054 * sd / math.sqrt(5), abs=1e-6)


def test_report_matches_its_schema(tmp_path):
    main([
        "fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "out"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--model.stats.cache_dir", str(tmp_path / "stats"), "--progress.refresh_rate", "0",
        "--model.evaluation.every_n_steps", "2", "--model.evaluation.retention_n", "10",
    ])
    (report_path,) = (tmp_path / "out").rglob("report.json")
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["protocol"]["steps"] == 4 and report["protocol"]["edits"] == 8
    assert report["protocol"]["edits_per_step"] == 2 and report["protocol"]["evaluated_cases"] == 8
    assert [p["edits"] for p in report["curve"]] == [4, 8]
    for name in ("efficacy", "generalization", "specificity", "score", "reliability", "token_generalization",
                 "locality_unedited", "locality_answer", "fluency", "perplexity"):
        assert name in report["metrics"] and name in report["baseline"], name
    assert report["metrics"]["efficacy"]["n"] == 8
    assert report["baseline"]["locality_unedited"]["value"] == 1.0
    assert (report_path.parent / "metrics.png").read_bytes().startswith(b"\x89PNG")
    # The schema can fail: a report without metrics, or with a wrong method, is rejected.
    for broken in ({k: v for k, v in report.items() if k != "metrics"}, {**report, "method": "rome"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, REPORT_SCHEMA)
