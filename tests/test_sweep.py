"""The hyperparameter sweep script on the tiny model: its grid, its numbers and its clean-up."""

import argparse
import json

import pytest
import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.editing.values import compute_values, generate_context_templates
from nmke_lightning.models import load_model


def namespace(**kw):
    base = dict(layers=["1-2"], v_lr=[0.1], clamp=[0.75], v_steps=4, l2=[1.0], per_step=2, cov_tokens=300,
                cache_dir=None, methods=["nmke"], mask_bounds=["0.3,0.4"], mom2_weight=[15000.0])
    return argparse.Namespace(**{**base, **kw})


def test_values_stage_reports_each_grid_point_from_the_train_file(load_benchmark):
    sweep = load_benchmark("sweep")
    lm = load_model("tiny-llama", seed=0)
    cases = load_cases(sample_path("counterfact_train_sample.json")).cases[:12]  # two batches of 10
    rows = sweep.values_stage(lm, cases, namespace(v_lr=[0.05, 0.2], clamp=[0.5, 2.0]))
    assert [(r["v_lr"], r["clamp"]) for r in rows] == [(0.05, 0.5), (0.05, 2.0), (0.2, 0.5), (0.2, 2.0)]
    # Independent recomputation of one grid point: layer 2 is the window's last layer.
    templates = generate_context_templates(lm.model, lm.tokenizer)
    probs = []
    for start in (0, 10):
        result = compute_values(lm.model, lm.spec, lm.tokenizer, [c.request for c in cases[start : start + 10]],
                                templates, 2, lr=0.2, num_steps=4, clamp_norm_factor=2.0)
        probs.append((-result.nll).exp())
    assert abs(rows[3]["target_prob"] - float(torch.cat(probs).mean())) < 1e-5
    assert all(r["layer"] == 2 and 0 < r["steps"] <= 4 for r in rows)


def test_layers_stage_scores_each_session_and_restores_the_model(load_benchmark, tmp_path, record_steps):
    sweep = load_benchmark("sweep")
    lm = load_model("tiny-llama", seed=0)
    cases = load_cases(sample_path("counterfact_train_sample.json")).cases[:4]
    before = {l: lm.spec.down_proj_module(lm.model, l).weight.detach().clone() for l in (0, 1, 2)}
    seen = record_steps(sweep, lambda config, result: {l: float(d.norm()) for l, d in result.deltas.items()})
    rows = sweep.layers_stage(lm, cases, namespace(layers=["0-1", "1-2"], cache_dir=str(tmp_path)))
    assert [r["layers"] for r in rows] == ["0-1", "1-2"]
    assert len(seen) == 4 and all(norm > 0 for step in seen for norm in step.values())  # edits happened
    for row in rows:
        for key in ("score", "efficacy", "generalization", "specificity", "reliability"):
            assert 0.0 <= row[key] <= 1.0
    for l, weight in before.items():  # every session starts from, and leaves, the unedited model
        assert torch.equal(lm.spec.down_proj_module(lm.model, l).weight, weight)


def test_layers_stage_compares_methods_and_mask_bounds(load_benchmark, tmp_path, record_steps):
    sweep = load_benchmark("sweep")
    lm = load_model("tiny-llama", seed=0)
    cases = load_cases(sample_path("counterfact_train_sample.json")).cases[:2]
    seen = record_steps(sweep, lambda config, result: (
        config.method, {l: m.mask.float().mean().item() for l, m in result.masks.items()}))
    rows = sweep.layers_stage(lm, cases, namespace(methods=["alphaedit", "nmke"], mask_bounds=["0.1,0.1", "0.8,0.9"],
                                                   cache_dir=str(tmp_path)))
    assert [(r["method"], r["mask"]) for r in rows] == [("alphaedit", "-"), ("nmke", "0.1-0.1"), ("nmke", "0.8-0.9")]
    assert [method for method, _ in seen] == ["alphaedit", "nmke", "nmke"]
    assert seen[0][1] == {}  # AlphaEdit has no masks
    # The union of a general and a specific set, each at least its ratio's share of the neurons
    # (ties at a set's threshold are kept too, so a set can be larger).
    assert all(share >= 0.8 for share in seen[2][1].values())
    assert all(0.1 <= share < 0.8 for share in seen[1][1].values())
    with pytest.raises(SystemExit, match="--mask-bounds"):
        sweep.mask_bounds("0.5")
    with pytest.raises(SystemExit, match="--mask-bounds"):
        sweep.mask_bounds("0.6,0.5")


def test_layers_stage_sweeps_memits_covariance_weight(load_benchmark, tmp_path, record_steps):
    sweep = load_benchmark("sweep")
    lm = load_model("tiny-llama", seed=0)
    cases = load_cases(sample_path("counterfact_train_sample.json")).cases[:2]
    seen = record_steps(sweep, lambda config, result: (
        config.method, config.mom2_update_weight, {l: float(d.norm()) for l, d in result.deltas.items()}))
    rows = sweep.layers_stage(lm, cases, namespace(methods=["memit", "alphaedit"], mom2_weight=[1e-3, 1e6],
                                                   cache_dir=str(tmp_path)))
    assert [(r["method"], r["mom2_weight"]) for r in rows] == [("memit", 1e-3), ("memit", 1e6), ("alphaedit", "-")]
    assert [(method, weight) for method, weight, _ in seen] == [("memit", 1e-3), ("memit", 1e6), ("alphaedit", 15000.0)]
    # Both MEMIT sessions start from the unedited model with the same requests, so a covariance
    # weight 10^9 times larger must shrink every layer's update.
    weak, strong = seen[1][2], seen[0][2]
    assert all(0 < weak[l] < strong[l] for l in strong)


def test_a_sweep_stopped_part_way_keeps_the_sessions_it_finished(load_benchmark, tmp_path, monkeypatch):
    sweep = load_benchmark("sweep")
    argv = ["sweep.py", "--stage", "layers", "--model", "tiny-llama", "--cases", "4", "--layers", "0-1", "1-2",
            "--per-step", "2", "--v-lr", "1.0", "--v-steps", "4", "--cov-tokens", "300", "--cache-dir", str(tmp_path / "stats"),
            "--out", str(tmp_path), "--name", "t"]
    monkeypatch.setattr("sys.argv", argv)
    original_step, calls = sweep.edit_step, []

    def stop_in_second_session(model, tokenizer, requests, config, state):
        calls.append(config.layers)
        if len(calls) == 4:  # the second session's second step
            raise KeyboardInterrupt
        return original_step(model, tokenizer, requests, config, state)

    monkeypatch.setattr(sweep, "edit_step", stop_in_second_session)
    with pytest.raises(KeyboardInterrupt):
        sweep.main()
    partial = json.loads((tmp_path / "sweep_t.json").read_text())
    assert partial["complete"] is False and [r["layers"] for r in partial["rows"]] == ["0-1"]
    assert calls == [[0, 1], [0, 1], [1, 2], [1, 2]] and not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(sweep, "edit_step", original_step)
    sweep.main()
    full = json.loads((tmp_path / "sweep_t.json").read_text())
    assert full["complete"] is True and [r["layers"] for r in full["rows"]] == ["0-1", "1-2"]
    keep = ("score", "efficacy", "generalization", "specificity", "reliability")
    assert {k: full["rows"][0][k] for k in keep} == {k: partial["rows"][0][k] for k in keep}  # same session, same numbers
