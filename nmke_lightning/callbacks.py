"""Callbacks of an edit session: mask schedule and edit checkpoints.

Report callbacks (entropy tracking and plots, progress bar, summary) live in
`callbacks_report` and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from .callbacks_report import EditProgressBar, EditSummary, EntropyTracker  # noqa: F401


class MaskRecomputation(Callback):
    """When NMKE recomputes its neuron masks: every step (the paper's "dynamic" masks), every
    `every_n_steps` steps, or every step until `freeze_after` steps and then never again."""

    def __init__(self, every_n_steps: int = 1, freeze_after: int | None = None):
        """
        Args:
            every_n_steps: Recompute at steps 0, n, 2n, ... (1 = every step).
            freeze_after: Stop recomputing after this many steps (None = never freeze).
        """
        if every_n_steps < 1:
            raise ValueError(f"MaskRecomputation.every_n_steps must be >= 1, got {every_n_steps}")
        if freeze_after is not None and freeze_after < 1:
            raise ValueError(f"MaskRecomputation.freeze_after must be >= 1 or None, got {freeze_after}")
        self.every_n_steps = every_n_steps
        self.freeze_after = freeze_after

    def should_recompute(self, step: int, have_masks: bool) -> bool:
        if not have_masks:
            return True
        if self.freeze_after is not None and step >= self.freeze_after:
            return False
        return step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = pl_module.edit_state.steps
        pl_module.recompute_masks = self.should_recompute(step, pl_module.masks is not None)


class EditCheckpoint(ModelCheckpoint):
    """Checkpoint every `every_n_steps` edit steps and at the end, holding only what changed.

    A `ModelCheckpoint` so that ``--ckpt_path last`` finds ``last.ckpt``; it counts edit steps
    itself because ``trainer.global_step`` (optimizer steps) stays 0 in an edit session. Beside
    each checkpoint the edited matrices are written as safetensors (`edited-step-K.safetensors`,
    and `edited-last.safetensors`), loadable into a fresh base model with
    `nmke_lightning.module.apply_edited_matrices`.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 10, keep: int | None = 3):
        """
        Args:
            dirpath: Folder of the checkpoints (default: <log dir>/checkpoints).
            every_n_steps: Save after every n-th edit step (and always at the end).
            keep: Step checkpoints to keep (oldest removed first); None keeps all. last.ckpt stays.
        """
        if every_n_steps < 1:
            raise ValueError(f"EditCheckpoint.every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=0,
                         save_on_train_epoch_end=False)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.saved: list[str] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        steps = pl_module.edit_state.steps
        if steps % self.every_n_steps == 0:
            self.save_edits(trainer, pl_module, f"step-{steps:06d}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = pl_module.edit_state.steps if pl_module.edit_state is not None else 0
        name = f"step-{steps:06d}"
        if not self.saved or Path(self.saved[-1]).stem != name:
            self.save_edits(trainer, pl_module, name)

    def save_edits(self, trainer: Trainer, pl_module: LightningModule, name: str) -> None:
        """Write <name>.ckpt, last.ckpt and the edited matrices (collective: every rank calls it)."""
        from .module import save_edited_matrices

        dirpath = Path(self.dirpath)
        path = str(dirpath / f"{name}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        last = str(dirpath / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(last, weights_only=False)
        self.last_model_path = last
        if trainer.is_global_zero:
            save_edited_matrices(pl_module, dirpath / f"edited-{name}.safetensors")
            save_edited_matrices(pl_module, dirpath / "edited-last.safetensors")
        self.saved.append(path)
        if self.keep is not None:
            while len(self.saved) > self.keep:
                old = Path(self.saved.pop(0))
                if trainer.is_global_zero:
                    old.unlink(missing_ok=True)
                    (old.parent / f"edited-{old.stem}.safetensors").unlink(missing_ok=True)
        rank_zero_info(f"checkpoint: {path} (edits {pl_module.edit_state.edits})")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.saved = list(state_dict.get("saved", []))
