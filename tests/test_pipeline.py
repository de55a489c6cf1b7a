"""The Lightning pipeline: configs build, crash-then-resume equals an uninterrupted run, CPU DDP
equals a single process, validate/predict on a saved session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file

from nmke_lightning.cli import main
from nmke_lightning.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class KillBeforeStep(Callback):
    """Simulates a killed session: raises at the start of edit step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.edit_state.steps == self.step:
            raise RuntimeError(f"killed before step {self.step}")


class DumpWeights(Callback):
    """Every rank writes its edited matrices, to check ranks hold identical weights."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        tensors = {str(l): w.detach().cpu().contiguous() for l, w in pl_module.edited_weights().items()}
        save_file(tensors, os.path.join(self.dirpath, f"rank{trainer.global_rank}.safetensors"))


def tiny_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
        "--trainer.default_root_dir", str(tmp_path / name / "out"),
        "--checkpoint.dirpath", str(tmp_path / name / "ckpt"),
        "--checkpoint.every_n_steps", "1",
        "--model.stats.cache_dir", str(tmp_path / "stats"),
        "--progress.refresh_rate", "0",
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_builds(config):
    from nmke_lightning.cli import EditCLI, TRAINER_DEFAULTS
    from nmke_lightning.data import EditDataModule
    from nmke_lightning.module import EditModule

    # GPU configs are built on the CPU here: the check is that every option parses and validates.
    cli = EditCLI(EditModule, EditDataModule, args=["--config", str(config), "--trainer.accelerator=cpu"], run=False,
                  trainer_defaults=TRAINER_DEFAULTS, auto_configure_optimizers=False)
    assert isinstance(cli.model, EditModule) and isinstance(cli.datamodule, EditDataModule)
    assert cli.model.editor_config.layers


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    main(tiny_args(tmp_path, "whole"))
    with pytest.raises(RuntimeError, match="killed before step 2"):
        main(tiny_args(tmp_path, "resumed", "--trainer.callbacks+=tests.test_pipeline.KillBeforeStep",
                       "--trainer.callbacks.step=2"))
    killed_dir = tmp_path / "resumed" / "ckpt"
    assert (killed_dir / "last.ckpt").exists() and not (killed_dir / "step-000003.ckpt").exists()
    main(tiny_args(tmp_path, "resumed", "--ckpt_path", "last"))

    whole = load_file(tmp_path / "whole" / "ckpt" / "edited-last.safetensors")
    resumed = load_file(killed_dir / "edited-last.safetensors")
    assert whole.keys() == resumed.keys() and len(whole) == 2
    for name in whole:
        assert float((whole[name] - resumed[name]).abs().max()) <= 1e-6
        assert float((whole[name] - load_model("tiny-llama").model.state_dict()[name]).abs().max()) > 1e-4
    a = torch.load(tmp_path / "whole" / "ckpt" / "last.ckpt", weights_only=False)
    b = torch.load(killed_dir / "last.ckpt", weights_only=False)
    assert a["nmke"]["edit_state"]["edits"] == b["nmke"]["edit_state"]["edits"] == 8
    assert a["nmke"]["edit_state"]["templates"] == b["nmke"]["edit_state"]["templates"]
    for l, cp in a["nmke"]["edit_state"]["past_cov_triu"].items():
        assert torch.allclose(cp, b["nmke"]["edit_state"]["past_cov_triu"][l], rtol=1e-6, atol=1e-9)
    assert a["EditDataModule"]["cursor"] == b["EditDataModule"]["cursor"] == 8
    # The checkpoint holds the edits, not the model.
    model_bytes = sum(p.numel() * p.element_size() for p in load_model("tiny-llama").model.parameters())
    ckpt_bytes = (killed_dir / "last.ckpt").stat().st_size
    assert ckpt_bytes < 0.35 * model_bytes, (ckpt_bytes, model_bytes)
    assert "config" in b["nmke"] and "tiny-llama" in b["nmke"]["config"]
    # The pre-edit baseline survives the kill: computed once, on the unedited model, and kept.
    assert json.dumps(a["nmke"]["evaluation"]["baseline"]) == json.dumps(b["nmke"]["evaluation"]["baseline"])
    assert a["nmke"]["evaluation"]["unedited_locality"] == b["nmke"]["evaluation"]["unedited_locality"]


def test_ddp_two_cpu_ranks_equal_a_single_process(tmp_path):
    # Steps of 3, 3 and 1 requests: shares of 2 and 1, then a rank with an empty share.
    # The single process also saves the pre-edit baseline; DDP rank 0 reads it and broadcasts it.
    stream = ["--data.batch_size", "3", "--data.limit", "7", "--model.evaluation.baseline_cache", str(tmp_path / "base")]
    single = tmp_path / "single"
    main(tiny_args(tmp_path, "single", *stream))
    dump = tmp_path / "ranks"
    dump.mkdir()
    cmd = [sys.executable, "-m", "nmke_lightning", *tiny_args(
        tmp_path, "ddp", *stream, "--trainer.devices", "2", "--trainer.strategy", "edit_ddp_gloo",
        "--trainer.callbacks+=tests.test_pipeline.DumpWeights", f"--trainer.callbacks.dirpath={dump}",
    )]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pre-edit baseline on 7 cases from" in proc.stdout + proc.stderr
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key])
    one = load_file(single / "ckpt" / "edited-last.safetensors")
    ddp = load_file(tmp_path / "ddp" / "ckpt" / "edited-last.safetensors")
    for name in one:
        diff = float((one[name] - ddp[name]).abs().max())
        print(f"DDP vs single process, {name}: max abs diff {diff:.3e}")
        assert diff <= 1e-5
    base = load_model("tiny-llama").model.state_dict()
    assert any(float((one[n] - base[n]).abs().max()) > 1e-4 for n in one)
    # The final evaluation splits the 7 edited cases over the ranks without counting any twice.
    single_report = json.loads(next((tmp_path / "single" / "out").rglob("report.json")).read_text())
    ddp_report = json.loads(next((tmp_path / "ddp" / "out").rglob("report.json")).read_text())
    assert json.dumps(ddp_report["baseline"]) == json.dumps(single_report["baseline"])
    for name in ("efficacy", "reliability", "locality_answer", "locality_unedited", "perplexity"):
        assert ddp_report["metrics"][name]["n"] == single_report["metrics"][name]["n"]
        assert ddp_report["metrics"][name]["value"] == pytest.approx(single_report["metrics"][name]["value"], abs=1e-4)
    assert ddp_report["metrics"]["efficacy"]["n"] == 7


def test_validate_and_predict_a_saved_session(tmp_path, capsys):
    main(tiny_args(tmp_path, "run"))
    ckpt = str(tmp_path / "run" / "ckpt" / "last.ckpt")
    common = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--model.stats.cache_dir", str(tmp_path / "stats"),
              "--trainer.default_root_dir", str(tmp_path / "eval"), "--progress.refresh_rate", "0",
              "--checkpoint.dirpath", str(tmp_path / "run" / "ckpt")]
    cli = main(["validate", *common, "--ckpt_path", ckpt])
    # The evaluated model carries the saved edits.
    saved = load_file(tmp_path / "run" / "ckpt" / "edited-last.safetensors")
    for l, w in cli.model.edited_weights().items():
        assert torch.equal(w.detach(), saved[f"model.layers.{l}.mlp.down_proj.weight"])
    metrics = cli.trainer.callback_metrics
    assert {"val/reliability", "val/token_generalization", "val/locality_answer", "val/efficacy",
            "val/locality_unedited", "val/score", "val/perplexity"} <= set(metrics)
    # Locality is judged against the unedited model's answers saved with the session.
    assert cli.model.unedited_locality is not None and cli.model.baseline is not None
    report = next((tmp_path / "eval").rglob("report.json"))
    assert report.exists()
    cli = main(["predict", *common, "--ckpt_path", ckpt, "--data.predict_prompts", '["The capital of France is"]'])
    answers = cli.trainer.predict_loop.predictions
    assert answers[0][0]["prompt"] == "The capital of France is" and isinstance(answers[0][0]["completion"], str)


def test_baseline_cache_is_reused_only_for_the_same_model_cases_and_settings(tmp_path, monkeypatch):
    import nmke_lightning.module as module

    cache = tmp_path / "baseline"
    with_cache = ["--model.evaluation.baseline_cache", str(cache), "--data.limit", "4"]

    def checkpoint(name):
        return torch.load(tmp_path / name / "ckpt" / "last.ckpt", weights_only=False)["nmke"]["evaluation"]

    main(tiny_args(tmp_path, "computed", "--data.limit", "4"))  # no cache: the reference
    main(tiny_args(tmp_path, "first", *with_cache))
    files = sorted(cache.glob("baseline-*.pt"))
    assert len(files) == 1

    def no_baseline_forward(*args, **kwargs):
        raise AssertionError("the baseline was computed, not read from the cache")

    # Another method over the same cases reads it: computing it would fail.
    monkeypatch.setattr(module, "locality_predictions", no_baseline_forward)
    main(tiny_args(tmp_path, "reused", *with_cache, "--model.editor.method", "alphaedit"))
    reference = checkpoint("computed")
    for name in ("first", "reused"):
        saved = checkpoint(name)
        assert json.dumps(saved["baseline"]) == json.dumps(reference["baseline"])
        assert saved["unedited_locality"] == reference["unedited_locality"]
        assert torch.equal(saved["facts_known_before"], reference["facts_known_before"])
    # Other cases or other evaluation settings do not match it.
    for name, option in (("cases", ["--data.limit", "2"]), ("settings", ["--model.evaluation.fluency_tokens", "7"])):
        with pytest.raises(AssertionError, match="not read from the cache"):
            main(tiny_args(tmp_path, name, *with_cache, *option))
    monkeypatch.undo()
    # A damaged file is reported, ignored and written again.
    files[0].write_bytes(b"not a baseline")
    with pytest.warns(UserWarning, match="unreadable baseline cache"):
        main(tiny_args(tmp_path, "repaired", *with_cache))
    assert json.dumps(checkpoint("repaired")["baseline"]) == json.dumps(reference["baseline"])
    assert json.dumps(torch.load(files[0], weights_only=True)["baseline"]) == json.dumps(reference["baseline"])


def test_print_config_is_commented(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model_name: tiny-llama" in out
    assert "# Indices of the decoder layers whose MLP down-projection is edited" in out


def test_mask_schedule():
    from nmke_lightning.callbacks import MaskRecomputation

    every = MaskRecomputation()
    assert [every.should_recompute(s, True) for s in range(4)] == [True] * 4
    third = MaskRecomputation(every_n_steps=3)
    assert [third.should_recompute(s, True) for s in range(7)] == [True, False, False, True, False, False, True]
    frozen = MaskRecomputation(freeze_after=2)
    assert [frozen.should_recompute(s, True) for s in range(5)] == [True, True, False, False, False]
    assert frozen.should_recompute(7, have_masks=False)  # nothing to reuse yet (e.g. after a resume)
    with pytest.raises(ValueError, match="every_n_steps"):
        MaskRecomputation(every_n_steps=0)


@pytest.mark.parametrize("freeze", [None, 1])
def test_frozen_masks_are_reused(tmp_path, freeze):
    extra = [] if freeze is None else ["--masks.freeze_after", str(freeze)]
    cli = main(tiny_args(tmp_path, "masks", *extra))
    history = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EntropyTracker").history
    shares = [tuple(step["masks"][layer]["kept_share"] for layer in sorted(step["masks"])) for step in history]
    assert len(shares) == 4
    if freeze:
        assert len(set(shares)) == 1
    else:
        assert len(set(shares)) > 1
