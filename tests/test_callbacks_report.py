"""Report callbacks: entropy history (+ resume), the PNG, summary numbers, the progress bar total.

Fast and offline: fake trainers/modules (SimpleNamespace) feeding hand-made `StepRecord`s, and a
tiny real Trainer on a dummy module for the progress bar and the checkpoint round trip.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from nmke_lightning.callbacks_report import (
    EditProgressBar,
    EditSummary,
    EntropyTracker,
    plot_history,
    summarise,
)
from nmke_lightning.module import StepRecord

LAYERS = (4, 5)


def make_record(step: int, method: str = "nmke", edits: int = 2) -> StepRecord:
    """Distinct, exactly representable numbers per step and layer."""
    masks = {}
    if method == "nmke":
        masks = {
            l: {
                "kept_share": 0.125 * l + 0.0625 * step,
                "general_ratio": 0.25 + 0.03125 * step,
                "specific_ratio": 0.5 - 0.03125 * step,
                "general_entropy": 0.75 - 0.015625 * l,
                "specific_entropy": 0.5 + 0.015625 * step,
            }
            for l in LAYERS
        }
    return StepRecord(
        step=step, edits=edits, total_edits=edits * (step + 1), z_loss=1.0 / (step + 1),
        target_prob=0.5 + 0.125 * step, success=float(step % 2), update_norms={l: 2.0**step + l for l in LAYERS},
        timings={"z": 1.0 + step, "solve": 0.5}, seconds=2.0 + step, masks=masks,
    )


def fake_module(method: str = "nmke") -> SimpleNamespace:
    config = SimpleNamespace(method=method, layers=list(LAYERS))
    return SimpleNamespace(last_step=None, model_name="tiny", editor_config=config)


def fake_trainer(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                           checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path / "ckpt")))


def drive(callback, trainer, module, steps, method="nmke", start=True, end=False):
    if start and hasattr(callback, "on_train_start"):
        callback.on_train_start(trainer, module)
    for step in steps:
        module.last_step = make_record(step, method)
        callback.on_train_batch_end(trainer, module, None, None, step)
    if end:
        callback.on_train_end(trainer, module)


# -- EntropyTracker --------------------------------------------------------------------------------


def test_history_holds_the_fed_numbers(tmp_path):
    tracker = EntropyTracker()
    drive(tracker, fake_trainer(tmp_path), fake_module(), range(3))
    assert len(tracker.history) == 3
    for step, entry in enumerate(tracker.history):
        record = make_record(step)
        assert entry == {
            "step": step, "edits": 2, "total_edits": 2 * (step + 1),
            "update_norms": {4: 2.0**step + 4, 5: 2.0**step + 5},
            "masks": record.masks,
        }
        assert all(type(v) is float for m in entry["masks"].values() for v in m.values())
    assert tracker.history[2]["masks"][5]["kept_share"] == 0.125 * 5 + 0.0625 * 2


def test_history_resumes_from_state_dict(tmp_path):
    trainer, module = fake_trainer(tmp_path), fake_module()
    uninterrupted = EntropyTracker()
    drive(uninterrupted, trainer, module, range(5))

    first = EntropyTracker()
    drive(first, trainer, module, range(3))
    state = first.state_dict()
    resumed = EntropyTracker()
    resumed.load_state_dict(state)
    drive(resumed, trainer, module, range(3, 5))
    assert resumed.history == uninterrupted.history
    assert resumed.state_key == first.state_key == "EntropyTracker"
    first.history[0]["masks"][4]["kept_share"] = -1.0  # the saved state is a copy, not a view
    assert state["history"][0]["masks"][4]["kept_share"] == 0.5


@pytest.mark.parametrize("method", ["nmke", "memit"])
def test_png_is_written(tmp_path, method):
    tracker = EntropyTracker()
    drive(tracker, fake_trainer(tmp_path), fake_module(method), range(4), method=method, end=True)
    png = (tmp_path / "entropy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    if method == "memit":
        assert all(entry["masks"] == {} for entry in tracker.history)


def test_plot_history_without_trainer(tmp_path):
    tracker = EntropyTracker()
    drive(tracker, fake_trainer(tmp_path), fake_module(), range(1))  # a single point
    path = plot_history(tracker.history, tmp_path / "sub" / "one.png", method="nmke")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_nothing_written_off_rank_zero_or_without_history(tmp_path):
    trainer = fake_trainer(tmp_path)
    EntropyTracker().on_train_end(trainer, fake_module())  # no history
    trainer.is_global_zero = False
    drive(EntropyTracker(), trainer, fake_module(), range(2), end=True)
    drive(EditSummary(), trainer, fake_module(), range(2), end=True)
    assert list(tmp_path.iterdir()) == []


# -- EditSummary -----------------------------------------------------------------------------------


def test_summary_json_equals_hand_computation(tmp_path):
    trainer, module = fake_trainer(tmp_path), fake_module()
    summary = EditSummary()
    summary.on_train_start(trainer, module)
    for step, edits in enumerate([2, 3, 1]):
        module.last_step = make_record(step, edits=edits)
        summary.on_train_batch_end(trainer, module, None, None, step)
    summary.on_train_end(trainer, module)
    got = json.loads((tmp_path / "summary.json").read_text())

    assert got["model"] == "tiny" and got["method"] == "nmke" and got["layers"] == [4, 5]
    assert got["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert got["session"] == {"steps": 3, "edits": 6}
    assert got["total"] == {"steps": 3, "edits": 1 * 3}  # the last record's total_edits = edits * (step + 1)
    # per-request means: each step's mean weighted by its edits
    assert got["success"] == pytest.approx((0 * 2 + 1 * 3 + 0 * 1) / 6)
    assert got["target_prob"] == pytest.approx((0.5 * 2 + 0.625 * 3 + 0.75 * 1) / 6)
    assert got["z_loss"] == pytest.approx((1.0 * 2 + 0.5 * 3 + (1 / 3) * 1) / 6)
    assert got["seconds_per_edit"] == pytest.approx({"z": (1 + 2 + 3) / 6, "solve": 1.5 / 6, "step": (2 + 3 + 4) / 6})
    assert got["kept_share"] == pytest.approx({"4": 0.5 + 0.0625, "5": 0.625 + 0.0625})


def test_summary_counts_sessions_across_resume(tmp_path):
    trainer, module = fake_trainer(tmp_path), fake_module("memit")
    first = EditSummary()
    drive(first, trainer, module, range(3), method="memit")
    resumed = EditSummary()
    resumed.load_state_dict(first.state_dict())
    drive(resumed, trainer, module, range(3, 5), method="memit", end=True)
    got = json.loads((tmp_path / "summary.json").read_text())
    assert got["session"] == {"steps": 2, "edits": 4}
    assert got["total"] == {"steps": 5, "edits": 10}
    assert got["recorded"] == {"steps": 5, "edits": 10}
    assert got["kept_share"] == {}
    assert got["success"] == pytest.approx((0 + 1 + 0 + 1 + 0) / 5)


def test_summarise_empty():
    got = summarise([], model="m")
    assert got["total"] == {"steps": 0, "edits": 0} and got["success"] is None and got["seconds_per_edit"] == {}


# -- A tiny real Trainer: progress bar total, callback state in real checkpoints -------------------


class _Stream(IterableDataset):
    """Step indices from the datamodule's cursor on; no __len__, like EditDataModule's stream."""

    def __init__(self, owner):
        self.owner = owner

    def __iter__(self):
        yield from range(self.owner.steps_done, self.owner.n_steps)


class StreamData(LightningDataModule):
    def __init__(self, n_steps: int):
        super().__init__()
        self.n_steps, self.steps_done = n_steps, 0

    @property
    def remaining_steps(self) -> int:
        return self.n_steps - self.steps_done

    def train_dataloader(self):
        return DataLoader(_Stream(self), batch_size=None)

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state_dict):
        self.steps_done = state_dict["steps_done"]


class DummyEditor(LightningModule):
    """No parameters, no optimizer: training_step only publishes a StepRecord, like EditModule."""

    def __init__(self, method: str = "nmke"):
        super().__init__()
        self.automatic_optimization = False
        self.model_name = "dummy"
        self.editor_config = SimpleNamespace(method=method, layers=list(LAYERS))
        self.last_step = None

    def training_step(self, batch, batch_idx):
        self.last_step = make_record(int(batch), self.editor_config.method)
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.steps_done += 1

    def configure_optimizers(self):
        return None


class CrashAfter(Callback):
    """Saves a checkpoint after `steps` steps (after the report callbacks ran), then crashes."""

    def __init__(self, steps: int, path):
        self.steps, self.path, self.seen = steps, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.steps:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("simulated crash")


def tiny_trainer(tmp_path, callbacks):
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)


def test_progress_bar_total_is_done_plus_remaining(tmp_path):
    bar, tracker, summary = EditProgressBar(), EntropyTracker(), EditSummary()
    trainer = tiny_trainer(tmp_path / "a", [tracker, summary, bar, CrashAfter(3, tmp_path / "crash.ckpt")])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(DummyEditor(), datamodule=StreamData(10))
    assert bar.steps_before == 0 and bar.total_train_batches == 10

    bar, tracker, summary = EditProgressBar(), EntropyTracker(), EditSummary()
    trainer = tiny_trainer(tmp_path / "b", [tracker, summary, bar])
    data = StreamData(10)
    trainer.fit(DummyEditor(), datamodule=data, ckpt_path=tmp_path / "crash.ckpt")
    assert bar.steps_before == 3 and bar.total_train_batches == 3 + 7
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (10, 10)
    assert bar.session_steps == 7 and bar.session_edits == 14
    assert set(bar.edit_metrics(trainer.lightning_module)) == {"edits/s", "z_loss", "success"}

    # the callbacks' state came back from the checkpoint: the history is the uninterrupted one's
    reference = EntropyTracker()
    drive(reference, fake_trainer(tmp_path), fake_module(), range(10))
    assert tracker.history == reference.history
    assert (tmp_path / "b" / "entropy.png").read_bytes()[:4] == b"\x89PNG"
    got = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert got["session"] == {"steps": 7, "edits": 14} and got["total"] == {"steps": 10, "edits": 20}


def test_progress_bar_without_datamodule(tmp_path):
    bar = EditProgressBar()
    loader = DataLoader(_Stream(SimpleNamespace(steps_done=0, n_steps=4)), batch_size=None)
    tiny_trainer(tmp_path, [bar, EntropyTracker(), EditSummary()]).fit(DummyEditor("memit"), train_dataloaders=loader)
    assert bar.total_steps is None and bar.total_train_batches == float("inf")
    assert bar.session_steps == 4
    assert (tmp_path / "entropy.png").exists() and (tmp_path / "summary.json").exists()
