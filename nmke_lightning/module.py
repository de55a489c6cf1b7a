"""EditModule: a frozen language model whose ``training_step`` is one edit step.

``fit`` is a lifelong editing session: each batch from `EditDataModule` is one step of the
editing core (`nmke_lightning.editing.edit_step`). Nothing is trained by gradient descent; the
module has no trainable parameters and no optimizer. What persists between steps (past-key
memory, projector bases, cumulative deltas, context templates, masks, the edited matrices) is
saved in the checkpoint under ``checkpoint["nmke"]``; the frozen base model is not.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from .data import EditCase, StepBatch, read_text_file
from .editing.editor import EditorConfig, EditState, StepResult, edit_step
from .editing.masks import NeuronMask
from .editing.stats import layer_covariances, model_fingerprint
from .evaluation import (
    REPORT_SCHEMA_VERSION,
    finite,
    peak_memory,
    plot_curve,
    report_table,
    write_json,
    EvalConfig,
    baseline_key,
    capability_metrics,
    case_metrics,
    facts_known,
    heldout_facts,
    load_baseline,
    locality_predictions,
    save_baseline,
    summarise_metrics,
    update_capability,
    update_case_metrics,
)
from .editing.values import generate_context_templates
from .metrics import teacher_forced
from .models import LoadedModel, default_cache_dir, load_model
from .strategies import gather_rows, sum_all

CHECKPOINT_KEY = "nmke"
CHECKPOINT_VERSION = 1


@dataclass
class StatsConfig:
    """One-off key statistics of the unedited model (cached on disk)."""

    corpus: str = "sample:wikitext_cov.txt"
    """Text file for the key covariance ("sample:<file>" = shipped with the package)."""
    n_tokens: int = 100_000
    """Tokens of the corpus to accumulate."""
    seq_len: int = 256
    """Tokens per sequence of the pass."""
    batch_size: int = 8
    """Sequences per forward of the pass."""
    cache_dir: str | None = None
    """Where statistics are cached; default `$NMKE_CACHE/stats` (else ~/.cache/nmke_lightning/stats)."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.stats.{name} must be >= 1, got {getattr(self, name)}")

    def text(self) -> str:
        return read_text_file(self.corpus, "model.stats.corpus")


@dataclass
class StepRecord:
    """What one step did, for callbacks, logs and the summary."""

    step: int
    edits: int  # requests in the whole step
    total_edits: int  # requests edited so far
    z_loss: float  # mean final z loss of this rank's requests
    target_prob: float  # mean exp(-NLL) of target_new under the optimised z
    success: float  # share of the step's requests whose target is top-1 (every token) after the step
    update_norms: dict[int, float]
    timings: dict[str, float]
    seconds: float
    masks: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> kept_share, ratios, entropies


def mask_summary(mask: NeuronMask) -> dict[str, float]:
    return {
        "kept_share": float(mask.kept_share),
        "general_ratio": float(mask.general_ratio),
        "specific_ratio": float(mask.specific_ratio),
        "general_entropy": float(mask.general_entropy),
        "specific_entropy": float(mask.specific_entropy),
    }


class EditModule(LightningModule):
    def __init__(
        self,
        editor: EditorConfig,
        model_name: str = "smollm2-135m",
        dtype: str = "auto",
        gguf_file: str | None = None,
        model_seed: int = 0,
        stats: StatsConfig = StatsConfig(),
        checkpoint_projectors: bool = False,
        predict_max_new_tokens: int = 10,
        evaluation: EvalConfig = EvalConfig(),
    ):
        """
        Args:
            editor: The editing method and its hyperparameters (method, layers, ...).
            model_name: Built-in name (smollm2-135m, tiny-llama, ...), local directory, GGUF file or hub id.
            dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16" or "float16".
            gguf_file: GGUF file name inside the `model` directory, if loading from GGUF.
            model_seed: Seed of the built-in tiny random models.
            stats: Key covariance statistics of the unedited model.
            checkpoint_projectors: Also save the null-space bases in checkpoints. They never change
                during a session and are rebuilt exactly from the statistics cache on resume, so
                by default checkpoints hold only what changed.
            predict_max_new_tokens: Tokens generated per prompt by `predict`.
            evaluation: Pre-edit baseline, periodic curve and final evaluation settings.
        """
        super().__init__()
        if isinstance(editor, dict):
            editor = EditorConfig(**editor)
        if isinstance(stats, dict):
            stats = StatsConfig(**stats)
        if isinstance(evaluation, dict):
            evaluation = EvalConfig(**evaluation)
        self.save_hyperparameters({"editor": asdict(editor), "model_name": model_name, "dtype": dtype,
                                   "gguf_file": gguf_file, "model_seed": model_seed, "stats": asdict(stats),
                                   "checkpoint_projectors": checkpoint_projectors,
                                   "predict_max_new_tokens": predict_max_new_tokens,
                                   "evaluation": asdict(evaluation)})
        self.editor_config = editor
        self.stats_config = stats
        self.model_name = model_name
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the edits, not the frozen base model
        self.lm: LoadedModel | None = None
        self.edit_state: EditState | None = None
        self.masks: dict[int, NeuronMask] | None = None
        self.recompute_masks = True
        """Set by the MaskRecomputation callback before each step."""
        self.last_step: StepRecord | None = None
        self.fingerprint: str | None = None
        self._pending: dict | None = None
        self._applied_pending = False
        self.eval_config = evaluation
        self.stage_metrics = torch.nn.ModuleDict({stage: case_metrics() for stage in ("val", "test")})
        self.stage_capability = torch.nn.ModuleDict({stage: capability_metrics() for stage in ("val", "test")})
        self.unedited_locality: dict[int, list[list[int]]] | None = None
        """The unedited model's answers on every case's neighbourhood prompts (locality baseline)."""
        self.facts_known_before: torch.Tensor | None = None
        """Which held-out facts the unedited model answered right (retention baseline)."""
        self.baseline: dict | None = None
        """The pre-edit evaluation (metrics of the unedited model on the session's cases)."""
        self.curve: list[dict] = []
        """Periodic evaluations: step, edits so far and the metrics of a sample of them."""
        self.timing_totals: dict[str, float] = {}
        """Seconds per phase summed over all steps (resumes included)."""
        self.final_evaluation: dict | None = None
        self.covariance_seconds: float | None = None
        self.predict_max_new_tokens = predict_max_new_tokens

    # -- model -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.lm = load_model(self.model_name, dtype=self.hparams.dtype, device=str(device),
                             gguf_file=self.hparams.gguf_file, seed=self.hparams.model_seed)
        self.model = self.lm.model  # registered so Lightning moves it; never trained
        n_layers = self.lm.spec.num_layers(self.lm.model)
        if self.editor_config.layers[-1] >= n_layers:
            raise ValueError(f"model.editor.layers {self.editor_config.layers} out of range: "
                             f"{self.model_name} has {n_layers} layers")
        self.fingerprint = model_fingerprint(self.lm.model)

    def train(self, mode: bool = True):
        """The language model always runs in eval mode (no dropout while editing)."""
        super().train(mode)
        if self.lm is not None:
            self.lm.model.eval()
        return self

    @property
    def spec(self):
        return self.lm.spec

    def edited_weights(self) -> dict[int, torch.Tensor]:
        """The edited down-projection weights as stored by the model."""
        return {l: self.spec.down_proj_module(self.lm.model, l).weight for l in self.editor_config.layers}

    # -- one-off preparation -------------------------------------------------------------------

    def _prepare_editing(self) -> None:
        """Statistics of the UNEDITED model, then the edit state; then the checkpoint's edits."""
        if self.edit_state is not None:
            return
        cfg, st = self.editor_config, self.stats_config
        cache = Path(st.cache_dir) if st.cache_dir else default_cache_dir() / "stats"
        world, rank = self.trainer.world_size, self.trainer.global_rank
        rank_zero_info(f"statistics: key covariance of layers {cfg.layers} over {st.n_tokens} tokens "
                       f"of {st.corpus} (cache {cache})")

        def reduce(state):
            for l in state.layers:
                sum_all(state.sums[l])
            count = sum_all(torch.tensor([state.count], dtype=torch.long, device=state.sums[state.layers[0]].device))
            state.count = int(count.item())
            return state

        started = time.perf_counter()
        cov, n_tokens = layer_covariances(
            self.lm.model, self.spec, self.lm.tokenizer, st.text(), cfg.layers, st.n_tokens, st.seq_len,
            st.batch_size, cache_dir=cache, model_id=self.fingerprint, shard=(rank, world),
            reduce=reduce if world > 1 else None,
        )
        self.covariance_seconds = time.perf_counter() - started
        self.edit_state = EditState.create(self.lm.model, cfg, cov, self.spec)
        if cfg.uses_projection:
            dims = {l: int(b.shape[1]) for l, b in self.edit_state.basis.items()}
            rank_zero_info(f"statistics: {n_tokens} tokens; null-space dimension per layer {dims}")

    def _apply_pending(self) -> None:
        """Put a loaded checkpoint's edits into the model (and its state into the editor)."""
        if self._pending is None or self._applied_pending:
            return
        saved = self._pending
        with torch.no_grad():
            for l, w in self.edited_weights().items():
                w.copy_(saved["weights"][l].to(w.device, w.dtype))
        if self.edit_state is not None:
            self.edit_state.load_state_dict(saved["edit_state"])
        if saved.get("masks"):
            self.masks = {l: NeuronMask(**m) for l, m in saved["masks"].items()}
        self._applied_pending = True

    def _ensure_templates(self) -> None:
        state = self.edit_state
        if state.templates is None:
            cfg = self.editor_config
            templates = generate_context_templates(
                self.lm.model, self.lm.tokenizer, cfg.context_starts, cfg.context_per_start,
                cfg.context_length, seed=cfg.context_seed,
            )
            # Identical on every rank by construction; broadcast anyway so ranks can never differ.
            state.templates = self.trainer.strategy.broadcast(templates, src=0)

    def on_fit_start(self) -> None:
        self._prepare_editing()
        self._prepare_baseline()
        self._apply_pending()
        self._ensure_templates()

    def on_validation_start(self) -> None:
        self._apply_pending()

    def on_test_start(self) -> None:
        self._apply_pending()

    def on_predict_start(self) -> None:
        self._apply_pending()

    # -- editing ---------------------------------------------------------------------------------

    def configure_optimizers(self):
        return None

    def training_step(self, batch: StepBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        self.lm.model.eval()
        requests = [c.request for c in batch.cases]
        cfg = self.editor_config
        reuse = cfg.method == "nmke" and not self.recompute_masks and self.masks is not None
        result = edit_step(self.lm.model, self.lm.tokenizer, requests, cfg, self.edit_state, self.spec,
                           gather=gather_rows, masks=self.masks if reuse else None)
        if cfg.method == "nmke":
            self.masks = result.masks
        record = self._record(batch, result, time.perf_counter() - start)
        self.last_step = record
        self._log_step(record, len(batch.all_cases))
        for phase, seconds in result.timings.items():
            self.timing_totals[phase] = self.timing_totals.get(phase, 0.0) + seconds
        self.trainer.datamodule.advance(batch)
        self._periodic_evaluation()

    @torch.no_grad()
    def edit_success(self, cases: list[EditCase]) -> torch.Tensor:
        """1.0 per case whose every target_new token is the top-1 prediction (teacher forced)."""
        scores = teacher_forced(self.lm.model, self.lm.tokenizer, [c.prompt for c in cases],
                                [c.request.target_text for c in cases], self.eval_config.batch_size)
        return torch.tensor([float(s.token_hits.all()) for s in scores], device=self.device)

    def _record(self, batch: StepBatch, result: StepResult, seconds: float) -> StepRecord:
        n_local = len(batch.cases)
        values = result.values
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        if n_local:
            stats[0] = float(values.loss.sum())
            stats[1] = float((-values.nll).exp().sum())
            stats[2] = float(self.edit_success(batch.cases).sum())
        stats[3] = n_local
        sum_all(stats)
        n = max(float(stats[3]), 1.0)
        return StepRecord(
            step=self.edit_state.steps - 1,
            edits=len(batch.all_cases),
            total_edits=self.edit_state.edits,
            z_loss=float(stats[0]) / n,
            target_prob=float(stats[1]) / n,
            success=float(stats[2]) / n,
            update_norms=result.update_norms,
            timings=result.timings,
            seconds=seconds,
            masks={l: mask_summary(m) for l, m in result.masks.items()},
        )

    def _log_step(self, record: StepRecord, batch_size: int) -> None:
        # Values are already identical on every rank (reduced above): no sync needed.
        scalars = {
            "edit/z_loss": record.z_loss,
            "edit/target_prob": record.target_prob,
            "edit/success": record.success,
            "edit/total_edits": float(record.total_edits),
            "edit/seconds": record.seconds,
        }
        for l, norm in record.update_norms.items():
            scalars[f"layer{l}/update_norm"] = norm
        for l, m in record.masks.items():
            for key, value in m.items():
                scalars[f"layer{l}/{key}"] = value
        for phase, seconds in record.timings.items():
            scalars[f"time/{phase}"] = seconds
        self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=batch_size)

    # -- evaluation ------------------------------------------------------------------------------

    def _shard(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _evaluate_sample(self, cases: list[EditCase]) -> dict:
        """Case metrics of `cases` (this rank takes every W-th), reduced over ranks."""
        rank, world = self._shard()
        metrics = case_metrics().to(self.device)
        update_case_metrics(metrics, self.lm.model, self.lm.tokenizer, cases[rank::world],
                            self.unedited_locality, self.eval_config.batch_size)
        return summarise_metrics(metrics)

    def _prepare_baseline(self) -> None:
        """On the UNEDITED model, once per session: what locality and retention compare with, and
        the pre-edit metrics of the session's cases."""
        if self.unedited_locality is not None or self._pending is not None:
            return
        cfg = self.eval_config
        cases = self.trainer.datamodule.cases
        path = None
        if cfg.baseline_cache:
            key = baseline_key(self.fingerprint, self.device.type, cases, cfg)
            path = Path(cfg.baseline_cache).expanduser() / f"baseline-{key}.pt"
        # Rank 0 decides for all ranks: they either all load or all compute (collectively).
        saved = load_baseline(path) if path is not None and self.trainer.is_global_zero else None
        saved = self.trainer.strategy.broadcast(saved, src=0)
        if saved is not None:
            rank_zero_info(f"evaluation: pre-edit baseline on {len(cases)} cases from {path}")
            self.unedited_locality = {int(k): v for k, v in saved["unedited_locality"].items()}
            self.facts_known_before = saved["facts_known_before"]
            if self.facts_known_before is not None:
                self.facts_known_before = self.facts_known_before.to(self.device)
            self.baseline = saved["baseline"]
            return
        rank_zero_info(f"evaluation: pre-edit baseline on {len(cases)} cases")
        self.unedited_locality = locality_predictions(self.lm.model, self.lm.tokenizer, cases, cfg.batch_size)
        facts = heldout_facts(cfg)
        self.facts_known_before = facts_known(self.lm.model, self.lm.tokenizer, facts, cfg.batch_size) if facts else None
        capability = capability_metrics().to(self.device)
        update_capability(capability, self.lm.model, self.lm.tokenizer, cfg, [c.prompt for c in cases], facts,
                          self.facts_known_before, self._shard())
        self.baseline = {**self._evaluate_sample(cases), **summarise_metrics(capability)}
        if path is not None and self.trainer.is_global_zero:
            known = self.facts_known_before
            save_baseline(path, {"unedited_locality": self.unedited_locality, "baseline": self.baseline,
                                 "facts_known_before": None if known is None else known.cpu()})

    def _periodic_evaluation(self) -> None:
        cfg = self.eval_config
        steps = self.edit_state.steps
        if not cfg.every_n_steps or steps % cfg.every_n_steps:
            return
        edited = self.trainer.datamodule.cases[: self.trainer.datamodule.cursor]
        generator = torch.Generator().manual_seed(steps)
        pick = torch.randperm(len(edited), generator=generator)[: cfg.sample_size].sort().values
        result = self._evaluate_sample([edited[int(i)] for i in pick])
        point = {"step": steps, "edits": self.edit_state.edits, "n": len(pick),
                 "metrics": {k: v["value"] for k, v in result.items()}}
        self.curve.append(point)
        self.log_dict({f"curve/{k}": v for k, v in point["metrics"].items()}, on_step=True, on_epoch=False)

    def _stage(self) -> str:
        return "test" if self.trainer.testing else "val"

    def validation_step(self, batch: list[EditCase], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def test_step(self, batch: list[EditCase], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def _evaluation_step(self, batch: list[EditCase]) -> None:
        update_case_metrics(self.stage_metrics[self._stage()], self.lm.model, self.lm.tokenizer, batch,
                            self.unedited_locality, self.eval_config.batch_size)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation()

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation()

    def _finish_evaluation(self) -> None:
        """After the evaluation loop: general capability, then every metric reduced, logged and
        kept for the report (the lifelong protocol: every edited case after all steps)."""
        stage = self._stage()
        data = self.trainer.datamodule
        capability = self.stage_capability[stage]
        facts = heldout_facts(self.eval_config) if self.facts_known_before is not None else []
        update_capability(capability, self.lm.model, self.lm.tokenizer, self.eval_config,
                          [c.prompt for c in data.edited_cases()], facts, self.facts_known_before, self._shard())
        result = {**summarise_metrics(self.stage_metrics[stage]), **summarise_metrics(capability)}
        for metric in list(self.stage_metrics[stage].values()) + list(capability.values()):
            metric.reset()
        self.final_evaluation = {"stage": stage, "cases": len(data.edited_cases()), "metrics": result}
        self.log_dict({f"{stage}/{k}": v["value"] for k, v in result.items() if v["value"] == v["value"]},
                      on_step=False, on_epoch=True, sync_dist=False, batch_size=1)
        self._write_report()

    def report(self) -> dict:
        """report.json's content (schema: `evaluation.REPORT_SCHEMA`)."""
        final = self.final_evaluation
        data = self.trainer.datamodule
        state = self.edit_state
        steps = state.steps if state is not None else int((self._pending or {}).get("edit_state", {}).get("steps", 0))
        edits = state.edits if state is not None else int((self._pending or {}).get("edit_state", {}).get("edits", 0))
        cfg = self.editor_config
        return finite({
            "schema_version": REPORT_SCHEMA_VERSION,
            "model": self.model_name,
            "method": cfg.method,
            "mask_mode": cfg.mask_mode if cfg.method == "nmke" else None,
            "layers": list(cfg.layers),
            "protocol": {
                "stage": final["stage"], "steps": steps, "edits": edits, "edits_per_step": data.batch_size,
                "evaluated_cases": final["cases"], "data": data.path, "format": data.resolved_format,
            },
            "metrics": final["metrics"],
            "baseline": self.baseline,
            "curve": self.curve,
            "timings": {
                "seconds_per_edit": {k: v / max(edits, 1) for k, v in self.timing_totals.items()},
                "total_seconds": dict(self.timing_totals),
                "covariance_seconds": self.covariance_seconds,
            },
            "memory": peak_memory(),
        })

    def _write_report(self) -> None:
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective under DDP
        if not self.trainer.is_global_zero:
            return
        report = self.report()
        path = directory / "report.json"
        write_json(path, report)
        plot = plot_curve(report["curve"], {"edits": report["protocol"]["edits"], "metrics": report["metrics"]},
                          directory / "metrics.png", report["baseline"])
        from rich import get_console

        get_console().print(report_table(report))
        rank_zero_info(f"report: {path.resolve()} (plot {plot})")

    @torch.no_grad()
    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Greedy continuation of each prompt by the (edited) model."""
        tok = self.lm.tokenizer
        answers = []
        for prompt in batch:
            ids = torch.tensor([tok(prompt)["input_ids"]], device=self.device)
            out = self.lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=self.predict_max_new_tokens, pad_token_id=tok.pad_token_id)
            answers.append({"prompt": prompt, "completion": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
        for answer in answers:
            rank_zero_info(f"{answer['prompt']!r} -> {answer['completion']!r}")
        return answers

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {}  # the frozen base model is never saved
        state = self.edit_state
        saved = {
            "version": CHECKPOINT_VERSION,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "weights": {l: w.detach().cpu().clone() for l, w in self.edited_weights().items()},
            "masks": {l: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in asdict(m).items()}
                      for l, m in (self.masks or {}).items()},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        config = Path(self.trainer.log_dir or "", "config.yaml") if self._trainer is not None else None
        if config is not None and config.is_file():  # written by the CLI: the resolved configuration
            saved["config"] = config.read_text(encoding="utf-8")
        if state is not None:
            sd = state.state_dict(include_stats=False)
            if self.hparams.checkpoint_projectors:
                sd["basis"] = {l: t.cpu() for l, t in state.basis.items()}
            saved["edit_state"] = sd
        elif self._pending is not None:  # saved before editing resumed: keep what was loaded
            saved["edit_state"] = self._pending["edit_state"]
        saved["evaluation"] = {
            "unedited_locality": self.unedited_locality,
            "facts_known_before": self.facts_known_before,
            "baseline": self.baseline,
            "curve": self.curve,
            "timing_totals": self.timing_totals,
        }
        checkpoint[CHECKPOINT_KEY] = saved

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("this checkpoint has no nmke edit state: was it written by nmke_lightning?")
        if saved.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint format version {saved.get('version')} is not {CHECKPOINT_VERSION}")
        if saved["model"] != self.model_name:
            raise ValueError(f"checkpoint edits model {saved['model']!r}, this run loads {self.model_name!r}")
        if self.fingerprint is not None and saved["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"checkpoint was made on a model with fingerprint {saved['fingerprint']}, the loaded "
                f"{self.model_name!r} has {self.fingerprint}: the base weights differ"
            )
        self._pending = saved
        self._applied_pending = False
        evaluation = saved.get("evaluation") or {}
        self.unedited_locality = evaluation.get("unedited_locality")
        self.facts_known_before = evaluation.get("facts_known_before")
        self.baseline = evaluation.get("baseline")
        self.curve = list(evaluation.get("curve") or [])
        self.timing_totals = dict(evaluation.get("timing_totals") or {})
        rng = saved.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def save_edited_matrices(module: EditModule, path: str | os.PathLike) -> None:
    """The edited down-projection weights as safetensors, named as in the model's state dict."""
    from safetensors.torch import save_file

    tensors = {
        f"{module.spec.down_proj.format(l)}.weight": w.detach().cpu().contiguous()
        for l, w in module.edited_weights().items()
    }
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"model": module.model_name, "fingerprint": module.fingerprint or ""})
    os.replace(tmp, path)


def apply_edited_matrices(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load matrices written by `save_edited_matrices` into a freshly loaded base model."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise ValueError(f"{path}: the model has no parameters {missing}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return sorted(tensors)
