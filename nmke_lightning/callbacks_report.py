"""Reporting callbacks for an edit session: what the masks did, how far the stream is, what it cost.

- `EntropyTracker`: per-step mask entropies, ratios, kept share and update norms; a PNG at the end.
- `EditProgressBar`: a rich bar whose total is the edit stream's length, so it shows an ETA.
- `EditSummary`: a table and `summary.json` of the session (counts, success, cost per phase).

All three read `EditModule.last_step` (a `StepRecord`) after each training step. The tracker and
the summary keep their per-step records in callback state, so a resumed run continues them.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

MASK_KEYS = ("kept_share", "general_ratio", "specific_ratio", "general_entropy", "specific_entropy")


def output_dir(trainer: Any, dirpath: str | Path | None) -> Path:
    """`dirpath`, else the trainer's log dir, else its default root dir.

    Call it on every rank: under DDP `Trainer.log_dir` is a broadcast (a collective).
    """
    if dirpath is not None:
        return Path(dirpath)
    log_dir = getattr(trainer, "log_dir", None)
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


def _method(pl_module: Any) -> str | None:
    config = getattr(pl_module, "editor_config", None)
    return getattr(config, "method", None)


# ----------------------------------------------------------------------------------------------
# Entropy tracking


def history_entry(record: Any) -> dict[str, Any]:
    """The plotted part of a `StepRecord`, as plain ints and floats (checkpoint- and JSON-friendly)."""
    return {
        "step": int(record.step),
        "edits": int(record.edits),
        "total_edits": int(record.total_edits),
        "update_norms": {int(l): float(v) for l, v in record.update_norms.items()},
        "masks": {int(l): {k: float(m[k]) for k in MASK_KEYS} for l, m in record.masks.items()},
    }


def plot_history(history: list[dict[str, Any]], path: str | Path, method: str | None = None) -> Path:
    """Three panels over the cumulative number of edits; one colour per layer in all panels.

    (a) knowledge-general (solid) and knowledge-specific (dashed) normalised entropies H_g, H_s;
    (b) the kept ratios rho_g (solid), rho_s (dashed) and the kept-neuron share (dotted);
    (c) the Frobenius norm of each step's update per layer (log scale).
    Without masks (methods other than nmke) panels (a) and (b) only say so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    x = [entry["total_edits"] for entry in history]
    layers = sorted({l for e in history for l in e["update_norms"]} | {l for e in history for l in e["masks"]})
    color = {l: f"C{i % 10}" for i, l in enumerate(layers)}
    mask_layers = [l for l in layers if any(l in e["masks"] for e in history)]

    def series(layer: int, key: str) -> list[float]:
        return [e["masks"][layer][key] if layer in e["masks"] else math.nan for e in history]

    # A Figure with its own Agg canvas: no pyplot, so no global backend switch and no GUI.
    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_h, ax_r, ax_n = fig.subplots(3, 1, sharex=True)
    style = {"marker": ".", "markersize": 3, "linewidth": 1}
    if mask_layers:
        for l in mask_layers:
            ax_h.plot(x, series(l, "general_entropy"), color=color[l], linestyle="-", **style)
            ax_h.plot(x, series(l, "specific_entropy"), color=color[l], linestyle="--", **style)
            ax_r.plot(x, series(l, "general_ratio"), color=color[l], linestyle="-", **style)
            ax_r.plot(x, series(l, "specific_ratio"), color=color[l], linestyle="--", **style)
            ax_r.plot(x, series(l, "kept_share"), color=color[l], linestyle=":", **style)
        key = lambda ls, label: Line2D([], [], color="black", linestyle=ls, label=label)  # noqa: E731
        ax_h.legend(handles=[key("-", "H_g general"), key("--", "H_s specific")], fontsize="small")
        ax_r.legend(handles=[key("-", "rho_g"), key("--", "rho_s"), key(":", "kept share")], fontsize="small")
    else:
        for ax in (ax_h, ax_r):
            ax.text(0.5, 0.5, f"no masks (method {method or 'unknown'})", ha="center", va="center",
                    transform=ax.transAxes)
    ax_h.set(title="(a) attribution entropy", ylabel="normalised entropy")
    ax_r.set(title="(b) kept ratios", ylabel="share of neurons")

    norms = {l: [e["update_norms"].get(l, math.nan) for e in history] for l in layers}
    for l, values in norms.items():
        ax_n.plot(x, values, color=color[l], label=f"layer {l}", **style)
    if any(v > 0 for values in norms.values() for v in values):
        ax_n.set_yscale("log")
    if layers:
        ax_n.legend(fontsize="small", ncol=min(len(layers), 5))
    ax_n.set(title="(c) update norm of each step", ylabel="||delta W||_F", xlabel="edits")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


class EntropyTracker(Callback):
    """Records each step's mask entropies, ratios, kept share and update norms; plots them at the end.

    Why: NMKE keeps more neurons when the attribution is spread out (editing/masks.py); these
    curves show how that, and the size of the updates, drift as edits accumulate over a lifelong
    session. The history is callback state, so a resumed run continues the same curves.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "entropy.png"):
        """
        Args:
            dirpath: Where to write the plot; None: the trainer's log dir (else default_root_dir).
            filename: Name of the PNG.
        """
        self.dirpath, self.filename = dirpath, filename
        self.history: list[dict[str, Any]] = []
        """One `history_entry` per completed step, resumed runs included."""
        self.method: str | None = None

    @property
    def state_key(self) -> str:
        return "EntropyTracker"  # fixed, so checkpoints survive module moves and renames

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is not None:
            self.method = _method(pl_module) or self.method
            self.history.append(history_entry(record))

    def on_train_end(self, trainer, pl_module) -> None:
        directory = output_dir(trainer, self.dirpath)
        if trainer.is_global_zero and self.history:
            path = plot_history(self.history, directory / self.filename, self.method)
            rank_zero_info(f"entropy tracker: {len(self.history)} steps plotted to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "method": self.method}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state_dict["history"])
        self.method = state_dict.get("method")


# ----------------------------------------------------------------------------------------------
# Progress bar


class EditProgressBar(RichProgressBar):
    """A rich bar over the whole edit stream with an ETA, edits/s, the last z loss and success.

    The stream's loader has no length (data.py), so Lightning alone would draw a bar without a
    total or ETA. The total is the datamodule's `remaining_steps` at train start plus the steps
    already done, and the bar starts at the steps already done (3/10 after a resume). Without
    an `EditDataModule` it falls back to Lightning's behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.steps_before = 0
        """Steps completed before this session (a resumed run)."""
        self.total_steps: int | None = None
        self.session_steps = 0
        self.session_edits = 0
        self._start: float | None = None

    @property
    def total_train_batches(self) -> int | float:
        if self.total_steps is not None:
            return self.total_steps
        return super().total_train_batches

    def on_train_start(self, trainer, pl_module) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        try:
            remaining = int(datamodule.remaining_steps)
        except (AttributeError, RuntimeError, TypeError):  # no (set-up) EditDataModule
            remaining = None
        if datamodule is not None and hasattr(datamodule, "steps_done"):
            self.steps_before = int(datamodule.steps_done)
        else:
            state = getattr(pl_module, "edit_state", None)
            self.steps_before = int(getattr(state, "steps", 0) or 0)
        self.total_steps = None if remaining is None else self.steps_before + remaining
        self.session_steps = self.session_edits = 0
        self._start = time.perf_counter()
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.total_steps is not None and self.progress is not None and self.train_progress_bar_id is not None:
            # reset also drops rich's speed samples: the ETA follows this session's pace only
            self.progress.reset(self.train_progress_bar_id, total=self.total_steps, completed=self.steps_before)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_step", None)
        self.session_steps += 1
        self.session_edits += int(record.edits) if record is not None else 0
        # Lightning's batch_idx restarts or continues after a resume depending on how the loop was
        # restored; the position in the stream is ours to count.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self.steps_before + self.session_steps - 1)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.update(self.edit_metrics(pl_module))
        return items

    def edit_metrics(self, pl_module: Any) -> dict[str, float]:
        """edits/s of this session and the last step's z loss and success."""
        record = getattr(pl_module, "last_step", None)
        if record is None:
            return {}
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        return {
            "edits/s": self.session_edits / elapsed if elapsed > 0 else 0.0,
            "z_loss": float(record.z_loss),
            "success": float(record.success),
        }


# ----------------------------------------------------------------------------------------------
# Summary


def summary_entry(record: Any) -> dict[str, Any]:
    """The summarised part of a `StepRecord`, as plain ints and floats."""
    return {
        "step": int(record.step),
        "edits": int(record.edits),
        "total_edits": int(record.total_edits),
        "z_loss": float(record.z_loss),
        "target_prob": float(record.target_prob),
        "success": float(record.success),
        "seconds": float(record.seconds),
        "timings": {str(k): float(v) for k, v in record.timings.items()},
        "kept_share": {int(l): float(m["kept_share"]) for l, m in record.masks.items()},
    }


def summarise(records: list[dict[str, Any]], session_start: int = 0, **info: Any) -> dict[str, Any]:
    """The numbers of `summary.json` from `summary_entry` records; `info` (model, method, ...) is copied.

    Means are per request (each step's mean weighted by its number of edits) over all recorded
    steps, resumed sessions included; `success` is the share of requests that were top-1 right
    after their own step. `seconds_per_edit[phase]` = sum of that phase's seconds / edits.
    """
    session = records[session_start:]
    edits = sum(r["edits"] for r in records)

    def mean(key: str) -> float | None:
        return sum(r[key] * r["edits"] for r in records) / edits if edits else None

    per_edit: dict[str, float] = {}
    for r in records:
        for phase, seconds in r["timings"].items():
            per_edit[phase] = per_edit.get(phase, 0.0) + seconds
    per_edit = {phase: s / edits for phase, s in per_edit.items()} if edits else {}
    if edits:
        per_edit["step"] = sum(r["seconds"] for r in records) / edits
    shares: dict[int, list[float]] = {}
    for r in records:
        for layer, share in r["kept_share"].items():
            shares.setdefault(int(layer), []).append(share)
    last = records[-1] if records else None
    return {
        **info,
        "session": {"steps": len(session), "edits": sum(r["edits"] for r in session)},
        "total": {"steps": last["step"] + 1 if last else 0, "edits": last["total_edits"] if last else 0},
        "recorded": {"steps": len(records), "edits": edits},
        "success": mean("success"),
        "target_prob": mean("target_prob"),
        "z_loss": mean("z_loss"),
        "seconds_per_edit": per_edit,
        "kept_share": {str(l): sum(v) / len(v) for l, v in sorted(shares.items())},
    }


def summary_table(summary: dict[str, Any]):
    """A two-column rich Table of a `summarise` dict."""
    from rich.table import Table

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = Table(title="edit session summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key in ("model", "method", "layers"):
        table.add_row(key, fmt(summary.get(key)))
    for key in ("session", "total", "recorded"):
        table.add_row(f"{key} steps / edits", f"{summary[key]['steps']} / {summary[key]['edits']}")
    for key in ("success", "target_prob", "z_loss"):
        table.add_row(f"mean {key}", fmt(summary[key]))
    for phase, seconds in summary["seconds_per_edit"].items():
        table.add_row(f"s/edit {phase}", fmt(seconds))
    for layer, share in summary["kept_share"].items():
        table.add_row(f"kept share layer {layer}", fmt(share))
    for name, value in (summary.get("evaluation") or {}).items():
        table.add_row(name, fmt(value))
    table.add_row("checkpoints", fmt(summary.get("checkpoint_dir")))
    return table


class EditSummary(Callback):
    """At the end of fit, prints a table and writes `summary.json` of the edit session.

    Why: a lifelong session is long and spread over resumes; one place that says how many edits
    were made, how well they took, and where the time went (per phase) makes runs comparable.
    The per-step records are callback state, so the summary of a resumed run covers all of it.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "summary.json"):
        """
        Args:
            dirpath: Where to write the JSON; None: the trainer's log dir (else default_root_dir).
            filename: Name of the JSON file.
        """
        self.dirpath, self.filename = dirpath, filename
        self.records: list[dict[str, Any]] = []
        """One `summary_entry` per completed step, resumed runs included."""
        self.session_start = 0
        """Index in `records` of this session's first step."""

    @property
    def state_key(self) -> str:
        return "EditSummary"

    def on_train_start(self, trainer, pl_module) -> None:
        self.session_start = len(self.records)  # checkpoint state is restored before train start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is not None:
            self.records.append(summary_entry(record))

    def summary(self, trainer, pl_module) -> dict[str, Any]:
        config = getattr(pl_module, "editor_config", None)
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        dirpath = getattr(checkpoint, "dirpath", None)
        return summarise(
            self.records, self.session_start,
            model=getattr(pl_module, "model_name", None),
            method=getattr(config, "method", None),
            layers=list(getattr(config, "layers", None) or []),
            checkpoint_dir=str(dirpath) if dirpath else None,
            # After the last step fit evaluates every edited case (the lifelong protocol).
            evaluation={k: float(v) for k, v in sorted(getattr(trainer, "callback_metrics", {}).items())
                        if k.startswith("val/")},
        )

    def on_train_end(self, trainer, pl_module) -> None:
        directory = output_dir(trainer, self.dirpath)
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer, pl_module)
        path = directory / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        from rich import get_console

        get_console().print(summary_table(summary))  # the shared console: prints above a live bar
        rank_zero_info(f"edit summary: {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"records": copy.deepcopy(self.records)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = copy.deepcopy(state_dict["records"])
