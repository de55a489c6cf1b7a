import sys

import pytest


def run_edit_step(bench, monkeypatch, record_steps, *extra):
    """Runs the benchmark's main on the tiny model; (mask config, kept share per layer) of each step."""
    seen = record_steps(bench, lambda config, result: (config.mask, {l: m.kept_share for l, m in result.masks.items()}))
    monkeypatch.setattr(sys, "argv", ["edit_step.py", "--model", "tiny-llama", "--layers", "0,1", "--requests", "2",
                                      "--steps", "1", "--cov-tokens", "300", *extra])
    bench.main()
    return seen


def test_edit_step_benchmark_edits_with_the_mask_bounds_it_is_given(load_benchmark, monkeypatch, record_steps):
    bench = load_benchmark("edit_step")
    seen = run_edit_step(bench, monkeypatch, record_steps, "--mask-bounds", "0.8,0.9")
    assert len(seen) == 2  # the first step and one timed step
    for mask, kept in seen:
        assert mask.general_bounds == (0.8, 0.9) and mask.specific_bounds == (0.8, 0.9)
        # Each of the union's two parts alone keeps at least 80% of the neurons.
        assert set(kept) == {0, 1} and all(share >= 0.8 for share in kept.values())
    default = run_edit_step(load_benchmark("edit_step"), monkeypatch, record_steps)
    assert all(mask.general_bounds == (0.3, 0.4) for mask, _ in default)  # MaskConfig's, the paper's
    assert max(share for _, kept in default for share in kept.values()) < 0.8  # so the bounds above mattered


def test_edit_step_benchmark_rejects_bad_mask_bounds(load_benchmark, monkeypatch):
    bench = load_benchmark("edit_step")
    monkeypatch.setattr(sys, "argv", ["edit_step.py", "--model", "tiny-llama", "--mask-bounds", "0.9,0.1"])
    with pytest.raises(SystemExit, match="--mask-bounds"):
        bench.main()
