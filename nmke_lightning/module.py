"""EditModule: a frozen language model whose ``training_step`` is one edit step.

``fit`` is a lifelong editing session: each batch from `EditDataModule` is one step of the
editing core (`nmke_lightning.editing.edit_step`). Nothing is trained by gradient descent; the
module has no trainable parameters and no optimizer. What persists between steps (past-key
memory, projector bases, cumulative deltas, context templates, masks, the edited matrices) is
saved in the checkpoint under ``checkpoint["nmke"]``; the frozen base model is not.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from .data import EditCase, StepBatch, sample_path
from .editing.editor import EditorConfig, EditState, StepResult, edit_step
from .editing.masks import NeuronMask
from .editing.stats import layer_covariances, model_fingerprint
from .editing.tokens import encode
from .editing.values import generate_context_templates
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
        path = sample_path(self.corpus[len("sample:"):]) if self.corpus.startswith("sample:") else Path(self.corpus)
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.stats.corpus {self.corpus!r}: no such file ({path})")
        return Path(path).read_text(encoding="utf-8")


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
        """
        super().__init__()
        if isinstance(editor, dict):
            editor = EditorConfig(**editor)
        if isinstance(stats, dict):
            stats = StatsConfig(**stats)
        self.save_hyperparameters({"editor": asdict(editor), "model_name": model_name, "dtype": dtype,
                                   "gguf_file": gguf_file, "model_seed": model_seed, "stats": asdict(stats),
                                   "checkpoint_projectors": checkpoint_projectors,
                                   "predict_max_new_tokens": predict_max_new_tokens})
        self.editor_config = editor
        self.stats_config = stats
        self.model_name = model_name
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the edits, not the frozen base model
        self.lm: LoadedModel | None = None
        self.edit_state: EditState | None = None
        self.masks: dict[int, NeuronMask] | None = None
        self.mask_history: dict[int, dict[str, float]] = {}
        self.recompute_masks = True
        """Set by the MaskRecomputation callback before each step."""
        self.last_step: StepRecord | None = None
        self.fingerprint: str | None = None
        self._pending: dict | None = None
        self._applied_pending = False
        self._metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MeanMetric()
            for stage in ("val", "test") for name in ("rewrite", "paraphrase", "neighbourhood")
        })
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

        cov, n_tokens = layer_covariances(
            self.lm.model, self.spec, self.lm.tokenizer, st.text(), cfg.layers, st.n_tokens, st.seq_len,
            st.batch_size, cache_dir=cache, model_id=self.fingerprint, shard=(rank, world),
            reduce=reduce if world > 1 else None,
        )
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
        import time

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
        self.trainer.datamodule.advance(batch)

    @torch.no_grad()
    def edit_success(self, cases: list[EditCase]) -> torch.Tensor:
        """1.0 per case whose every target_new token is the top-1 prediction (teacher forced)."""
        out = torch.zeros(len(cases), device=self.device)
        tok = self.lm.tokenizer
        for i, case in enumerate(cases):
            request = case.request
            prompt = tok(request.prompt)["input_ids"]
            target = tok(request.target_text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target], device=self.device)
            logits = self.lm.model(input_ids=ids, use_cache=False).logits[0]
            predicted = logits[len(prompt) - 1 : len(prompt) + len(target) - 1].argmax(-1)
            out[i] = float(torch.equal(predicted.cpu(), torch.tensor(target)))
        return out

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

    @torch.no_grad()
    def token_accuracy(self, prompts: list[str], targets: list[str]) -> torch.Tensor:
        """Per pair, the share of target tokens that are the top-1 prediction (teacher forced)."""
        tok = self.lm.tokenizer
        suffixes = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
        batch = encode(tok, prompts, suffix_ids=suffixes).to(self.device)
        logits = self.lm.model(**batch.model_inputs(), use_cache=False).logits
        out = torch.zeros(len(prompts), device=self.device)
        for i, suffix in enumerate(suffixes):
            end = int(batch.last[i]) + 1
            start = end - len(suffix)
            predicted = logits[i, start - 1 : end - 1].argmax(-1)
            out[i] = (predicted == batch.input_ids[i, start:end]).float().mean()
        return out

    def _evaluate(self, cases: list[EditCase], stage: str) -> None:
        pairs = {"rewrite": [], "paraphrase": [], "neighbourhood": []}
        for case in cases:
            request = case.request
            pairs["rewrite"].append((case.prompt, request.target_text))
            pairs["paraphrase"] += [(p, request.target_text) for p in case.paraphrases]
            pairs["neighbourhood"] += [(p, _continuation(p, a)) for p, a in case.neighbourhood if a]
        for name, items in pairs.items():
            if items:
                acc = self.token_accuracy([p for p, _ in items], [t for _, t in items])
                metric = self._metric(stage, name)
                metric.update(acc)
                self.log(f"{stage}/{name}_acc", metric, on_step=False, on_epoch=True, batch_size=len(items))

    def _metric(self, stage: str, name: str):
        return self._metrics[f"{stage}_{name}"]

    def validation_step(self, batch: list[EditCase], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: list[EditCase], batch_idx: int) -> None:
        self._evaluate(batch, "test")

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
        rng = saved.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _continuation(prompt: str, answer: str) -> str:
    return answer if prompt.endswith((" ", "\n")) or answer.startswith((" ", "\n")) else " " + answer


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
