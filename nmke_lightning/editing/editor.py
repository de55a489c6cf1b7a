"""One edit step: the single entry point of the editing core.

``edit_step(model, tokenizer, requests, config, state)`` applies one batch of requests and
returns what changed. Everything that persists between steps lives in `EditState`, an explicit
object with ``state_dict``/``load_state_dict``; there is no global state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec, arch_for, get_module
from .attribution import SERIES_MIN_PROMPTS, LensProductCache, attribution_scores
from .keys import AttributionInputs, read_attribution_inputs, read_keys
from .masks import MaskConfig, NeuronMask, neuron_mask
from .requests import EditRequest
from .solve import (
    nullspace_basis,
    solve_alphaedit,
    solve_masked_post,
    solve_masked_restricted,
    solve_memit,
)
from .values import (
    DEFAULT_STARTS,
    ValueResult,
    compute_values,
    generate_context_templates,
    keep_output,
    prompt_batch,
    replay_prefix,
)

METHODS = ("nmke", "alphaedit", "memit")

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenate a per-process tensor along dim 0 over all processes, in rank order."""


def _no_gather(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class EditorConfig:
    """Hyperparameters of the editor. MEMIT and AlphaEdit are NMKE with switches off."""

    layers: list[int]
    """Indices of the decoder layers whose MLP down-projection is edited (e.g. [4, 5, 6, 7, 8])."""
    method: str = "nmke"
    """"nmke" (AlphaEdit + neuron masks), "alphaedit" (null-space projection + past-key memory) or "memit"."""
    v_lr: float = 0.1
    """Adam learning rate of the target-value optimisation."""
    v_num_grad_steps: int = 25
    """Loss evaluations of the target-value optimisation (the last one takes no step)."""
    clamp_norm_factor: float = 0.75
    """Bound on ||delta|| relative to ||h_init||."""
    kl_factor: float = 0.0625
    """Weight of KL(p_now || p_init) on "{subject} is a"."""
    v_weight_decay: float = 0.5
    """Weight of ||delta|| / ||h_init||^2."""
    v_loss_stop: float = 5e-2
    """A request stops optimising once its loss is below this."""
    mom2_update_weight: float = 15000.0
    """MEMIT only: weight lambda_c of the key covariance in (lambda_c C0 + K K^T) X = K R^T."""
    nullspace_threshold: float = 2e-2
    """Eigenvalues of C0 below this (absolute) span the null space that AlphaEdit/NMKE write into."""
    l2: float = 10.0
    """AlphaEdit/NMKE: Tikhonov weight lambda on ||X||^2."""
    mask_mode: str = "restricted"
    """NMKE: "restricted" (exact masked solve, keeps the null-space guarantee) or "post" (authors' code: solve, then zero rows)."""
    attribution_position: str = "last_real"
    """Where attribution reads each prompt: "last_real" token, or "padded_last" (index -1 of the padded batch, as the authors' code)."""
    amplify_factor: float = 30.0
    """Scale s of a neuron's sub-value in the attribution score."""
    prob_floor: float = 1e-8
    """Probabilities are clamped to [prob_floor, 1 - prob_floor] before the log in the attribution score."""
    neuron_chunk: int | None = None
    """Neurons scored at once in the attribution (memory: prompts x chunk x vocabulary floats); None picks the largest chunk within 128 MiB."""
    attribution_series_terms: int = 10
    """Moments of the series that replaces most attribution log-sum-exps (attribution.py); 0 computes every score exactly. Used when a step has at least attribution.SERIES_MIN_PROMPTS (4) prompts: the series costs about terms x vocabulary x d_ff products whatever the number of prompts, the exact path one exponential per prompt."""
    attribution_series_tol: float = 1e-6
    """Largest change of an attribution score the truncated series may cause; other scores are computed exactly."""
    lens_cache_bytes: int = 2 * 2**30
    """Memory for keeping W_U diag(g) W_l of edited layers between steps (V x d_ff floats per layer; layers that do not fit are recomputed every step; 0 disables)."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Entropy-guided ratios and mask selection."""
    context_starts: tuple[str, ...] = DEFAULT_STARTS
    """Start words of the generated context templates."""
    context_per_start: int = 1
    """Templates generated per start word (5 starts x 1 = the papers' 5, plus the bare prompt)."""
    context_length: int = 10
    """Tokens generated per template."""
    context_seed: int = 0
    """Seed of the template sampling."""

    def __post_init__(self) -> None:
        self.layers = [int(l) for l in self.layers]
        if not self.layers:
            raise ValueError("editor.layers must be non-empty")
        if len(set(self.layers)) != len(self.layers) or any(l < 0 for l in self.layers):
            raise ValueError(f"editor.layers must be distinct non-negative indices, got {self.layers}")
        self.layers = sorted(self.layers)
        if self.method not in METHODS:
            raise ValueError(f"editor.method must be one of {METHODS}, got {self.method!r}")
        if self.mask_mode not in ("restricted", "post"):
            raise ValueError(f"editor.mask_mode must be 'restricted' or 'post', got {self.mask_mode!r}")
        if self.attribution_position not in ("last_real", "padded_last"):
            raise ValueError(
                f"editor.attribution_position must be 'last_real' or 'padded_last', got {self.attribution_position!r}"
            )
        for name in ("v_lr", "clamp_norm_factor", "amplify_factor", "nullspace_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"editor.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_factor", "v_weight_decay", "v_loss_stop", "mom2_update_weight", "l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"editor.{name} must be >= 0, got {getattr(self, name)}")
        if self.neuron_chunk is not None and self.neuron_chunk < 1:
            raise ValueError(f"editor.neuron_chunk must be >= 1 or None, got {self.neuron_chunk}")
        for name in ("v_num_grad_steps", "context_length", "context_per_start"):
            if getattr(self, name) < 1:
                raise ValueError(f"editor.{name} must be >= 1, got {getattr(self, name)}")
        if self.attribution_series_terms < 0 or self.lens_cache_bytes < 0:
            raise ValueError("editor.attribution_series_terms and editor.lens_cache_bytes must be >= 0, got "
                             f"{self.attribution_series_terms} and {self.lens_cache_bytes}")
        if not self.attribution_series_tol > 0:
            raise ValueError(f"editor.attribution_series_tol must be > 0, got {self.attribution_series_tol}")
        if not 0 < self.prob_floor < 0.5:
            raise ValueError(f"editor.prob_floor must be in (0, 0.5), got {self.prob_floor}")
        if isinstance(self.mask, dict):
            self.mask = MaskConfig(**self.mask)

    @property
    def uses_projection(self) -> bool:
        return self.method in ("alphaedit", "nmke")


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric matrix, row by row: half the bytes."""
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], device=matrix.device)
    return matrix[rows, cols].cpu()


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_symmetric`."""
    n = int((math.isqrt(8 * packed.numel() + 1) - 1) // 2)
    rows, cols = torch.triu_indices(n, n)
    out = torch.zeros(n, n, dtype=packed.dtype)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


@dataclass
class EditState:
    """What persists between edit steps. Tensors are float64 except the cumulative deltas."""

    layers: list[int]
    cov: dict[int, torch.Tensor]  # layer -> C0 [d_ff, d_ff] (one-off statistics of the unedited model)
    basis: dict[int, torch.Tensor]  # layer -> U0 [d_ff, k]: null-space basis of C0 (AlphaEdit/NMKE)
    past_cov: dict[int, torch.Tensor]  # layer -> Cp [d_ff, d_ff]: sum of K' K'^T over past steps
    deltas: dict[int, torch.Tensor]  # layer -> cumulative delta W [d, d_ff] float32
    templates: list[str] | None = None
    steps: int = 0
    edits: int = 0
    lens_cache: LensProductCache | None = field(default=None, repr=False, compare=False)
    """Derived from the weights, so never saved: rebuilt on the first step after a resume."""

    @classmethod
    def create(
        cls, model: nn.Module, config: EditorConfig, cov: dict[int, torch.Tensor], spec: ArchSpec | None = None
    ) -> "EditState":
        spec = spec or arch_for(model)
        missing = [l for l in config.layers if l not in cov]
        if missing:
            raise ValueError(f"no key covariance for edited layers {missing}")
        n_layers = spec.num_layers(model)
        if config.layers[-1] >= n_layers:
            raise ValueError(f"editor.layers {config.layers} out of range: the model has {n_layers} layers")
        device = cov[config.layers[0]].device
        basis, past = {}, {}
        for l in config.layers:
            c = cov[l].to(torch.float64)
            if config.uses_projection:
                basis[l] = nullspace_basis(c, config.nullspace_threshold)
                past[l] = torch.zeros_like(c)
        deltas = {l: torch.zeros_like(spec.read_weight(model, l), dtype=torch.float32, device=device)
                  for l in config.layers}
        return cls(list(config.layers), {l: cov[l].to(torch.float64) for l in config.layers}, basis, past, deltas)

    def state_dict(self, include_stats: bool = True) -> dict:
        """Tensors and plain values only. `include_stats=False` leaves out C0 and the projector
        bases, which the one-off statistics cache can rebuild."""
        out = {
            "layers": list(self.layers),
            "past_cov_triu": {l: pack_symmetric(t) for l, t in self.past_cov.items()},
            "deltas": {l: t.cpu() for l, t in self.deltas.items()},
            "templates": None if self.templates is None else list(self.templates),
            "steps": self.steps,
            "edits": self.edits,
        }
        if include_stats:
            out["cov"] = {l: t.cpu() for l, t in self.cov.items()}
            out["basis"] = {l: t.cpu() for l, t in self.basis.items()}
        return out

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["layers"]) != list(self.layers):
            raise ValueError(f"edit state is for layers {sd['layers']}, this editor edits {self.layers}")
        def put(target: dict, source: dict) -> None:
            for l in self.layers:
                if l in source:
                    ref = target.get(l)
                    target[l] = source[l].to(ref.device if ref is not None else "cpu")
        put(self.past_cov, {l: unpack_symmetric(t) for l, t in sd["past_cov_triu"].items()})
        put(self.deltas, sd["deltas"])
        if "cov" in sd:
            put(self.cov, sd["cov"])
        if "basis" in sd:
            put(self.basis, sd["basis"])
        self.templates = None if sd["templates"] is None else list(sd["templates"])
        self.steps = int(sd["steps"])
        self.edits = int(sd["edits"])


@dataclass
class StepResult:
    """What one edit step changed and measured."""

    deltas: dict[int, torch.Tensor]  # layer -> this step's delta W [d, d_ff]
    masks: dict[int, NeuronMask]  # layer -> neuron mask (NMKE only; empty otherwise)
    values: ValueResult  # z optimisation of this process's requests
    update_norms: dict[int, float]  # layer -> ||delta W||_F
    timings: dict[str, float]  # phase -> seconds: templates, attribution, z, keys, solve, memory


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    def add(self, phase: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - start
        return now


def compute_masks(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    config: EditorConfig,
    templates: list[str],
    spec: ArchSpec | None = None,
    gather: Gather | None = None,
    lens_cache: LensProductCache | None = None,
    inputs: AttributionInputs | None = None,
) -> dict[int, NeuronMask]:
    """NMKE neuron masks of every edited layer on the model as it is now.

    `lens_cache` keeps each layer's ``W_U diag(g) W_l`` between calls (see `LensProductCache`).
    `inputs`, if given, are the attribution inputs of `requests` already read off a forward of
    this model (`compute_values` records them); otherwise they are read here.
    """
    spec = spec or arch_for(model)
    gather = gather or _no_gather
    device = next(model.parameters()).device
    if requests and inputs is None:  # a process may have no share of a small step, but still takes part in the gather
        batch = prompt_batch(tokenizer, requests, templates)
        inputs = read_attribution_inputs(model, spec, batch, config.layers, config.attribution_position)
    final_norm = get_module(model, spec.final_norm)
    unembed = get_module(model, spec.unembed)
    n_prompts = 0 if inputs is None else int(inputs.targets.numel())
    series_terms = config.attribution_series_terms if n_prompts >= SERIES_MIN_PROMPTS else 0
    masks = {}
    for l in config.layers:
        if inputs is None:
            scores = torch.zeros(0, spec.d_ff(model, l), device=device)
        else:
            weight = spec.read_weight(model, l)
            product = None if lens_cache is None else lens_cache.get(l, weight, final_norm.weight, unembed.weight)
            lens_range = None if product is None else lens_cache.row_range(l)
            scores = attribution_scores(
                inputs.resid[l], inputs.keys[l], inputs.final_scale, weight,
                final_norm.weight, unembed.weight, getattr(unembed, "bias", None), inputs.targets,
                amplify=config.amplify_factor, prob_floor=config.prob_floor, neuron_chunk=config.neuron_chunk,
                series_terms=series_terms, series_tol=config.attribution_series_tol,
                lens_product=product, lens_range=lens_range,
            )
        masks[l] = neuron_mask(gather(scores), config.mask)
    return masks


class _LayerKeys:
    """``read(layer)``: the keys of `layer` ``[n, d_ff]`` and the output of `out_layer` ``[n, d]``
    at the subject's last token, for an edit loop that edits each layer right after reading it,
    in increasing order. Each read keeps the output of the layer below the one it reads, and the
    next read replays everything up to there: those layers are final for the step (the edit in
    between went to a layer above them). With layers 4-8 the reads run 19 layer forwards
    instead of 25."""

    def __init__(self, model: nn.Module, spec: ArchSpec, batch, n_templates: int, out_layer: int) -> None:
        self.model, self.spec, self.batch, self.n_templates, self.out_layer = model, spec, batch, n_templates, out_layer
        self.below: tuple[int, object] | None = None  # (layer, its raw output) from the last read

    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        model, spec = self.model, self.spec
        replay = contextlib.nullcontext()
        if self.below is not None and self.below[0] < layer:
            replay = replay_prefix(model, spec, *self.below)
        keep = keep_output(model, f"{spec.layers}.{layer - 1}") if layer > 0 else contextlib.nullcontext({})
        with replay, keep as kept:
            keys, cur = read_keys(model, spec, self.batch, [layer], self.n_templates, out_layer=self.out_layer)
        self.below = (layer - 1, kept["output"]) if "output" in kept else None
        return keys[layer], cur


def edit_step(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    config: EditorConfig,
    state: EditState,
    spec: ArchSpec | None = None,
    gather: Gather | None = None,
    masks: dict[int, NeuronMask] | None = None,
) -> StepResult:
    """Apply one batch of requests to `model` in place and update `state`.

    Under data parallelism every process passes its share of the step's requests and a
    `gather` that concatenates per-process tensors in rank order; the values z, the keys and the
    attribution scores are computed on the shares, gathered, and every process then solves the
    same systems and applies the same update. `masks` (NMKE) skips the attribution and reuses
    given masks (for mask schedules that do not recompute every step).
    """
    spec = spec or arch_for(model)
    gather = gather or _no_gather
    device = next(model.parameters()).device
    clock = _Clock(device)
    t = time.perf_counter()
    if state.templates is None:
        state.templates = generate_context_templates(
            model, tokenizer, config.context_starts, config.context_per_start, config.context_length,
            seed=config.context_seed,
        )
    templates = state.templates
    t = clock.add("templates", t)

    attribute = config.method == "nmke" and masks is None
    # z first: its set-up forward runs every prompt through the whole model anyway, so it also
    # records the attribution inputs (at the last real token only; the authors' padded read
    # position needs its own forward). Neither changes the weights, so the order is free.
    shared = attribute and config.attribution_position == "last_real"
    values = compute_values(
        model, spec, tokenizer, requests, templates, config.layers[-1], lr=config.v_lr,
        num_steps=config.v_num_grad_steps, clamp_norm_factor=config.clamp_norm_factor,
        kl_factor=config.kl_factor, weight_decay=config.v_weight_decay, stop_loss=config.v_loss_stop,
        attribution_layers=config.layers if shared else None,
    ) if requests else None
    d = spec.read_weight(model, config.layers[-1]).shape[0]
    z = gather(values.z if values is not None else torch.zeros(0, d, device=device))  # [n, d]
    t = clock.add("z", t)

    if attribute:
        if state.lens_cache is None and config.lens_cache_bytes > 0:
            state.lens_cache = LensProductCache(config.lens_cache_bytes)
        inputs = values.attribution if values is not None else None
        masks = compute_masks(model, tokenizer, requests, config, templates, spec, gather, state.lens_cache, inputs)
    t = clock.add("attribution", t)

    # The keys are read at the subject's last token only, so the prompts' later tokens are cut.
    batch = prompt_batch(tokenizer, requests, templates).through_lookup() if requests else None
    n_t = len(templates)
    deltas: dict[int, torch.Tensor] = {}
    # Edits go to layers >= the first edited one: each keys read replays what lies below the
    # layer edited last (`_LayerKeys`), the first one computes the layers below the first edit.
    read = _LayerKeys(model, spec, batch, n_t, config.layers[-1])
    step_keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(config.layers):
        if requests:
            keys, cur = read(layer)
        else:
            keys = torch.zeros(0, spec.d_ff(model, layer), device=device)
            cur = torch.zeros(0, d, device=device)
        keys = gather(keys).T.to(torch.float64)  # [d_ff, n]
        resid = (z - gather(cur)).T.to(torch.float64) / (len(config.layers) - i)  # [d, n]
        t = clock.add("keys", t)
        on = state.cov[layer].device
        keys, resid = keys.to(on), resid.to(on)
        step_keys[layer] = keys
        if config.method == "memit":
            update = solve_memit(keys, resid, state.cov[layer], config.mom2_update_weight)
        elif config.method == "alphaedit" or config.mask_mode == "post":
            update = solve_alphaedit(keys, resid, state.basis[layer], state.past_cov[layer], config.l2)
            if config.method == "nmke":
                update = solve_masked_post(update, masks[layer].mask.to(on))
        else:
            update = solve_masked_restricted(
                keys, resid, state.cov[layer], state.past_cov[layer], masks[layer].mask.to(on),
                config.nullspace_threshold, config.l2,
            )
        delta_w = update.T.to(torch.float32)  # [d, d_ff]
        spec.add_to_weight(model, layer, delta_w)
        state.deltas[layer] += delta_w.to(state.deltas[layer].device)
        deltas[layer] = delta_w
        t = clock.add("solve", t)

    if config.uses_projection:
        # The keys of the edited model: layer l's were read after every layer below it was
        # edited, and neither its own edit nor those above reach its down-projection's input.
        for layer in config.layers:
            k = step_keys[layer].to(state.past_cov[layer].device)  # [d_ff, n]
            outer = k @ k.T
            # Exactly symmetric, so checkpoints can store one triangle and restore it bitwise.
            state.past_cov[layer] += (outer + outer.T) / 2
        t = clock.add("memory", t)

    state.steps += 1
    state.edits += int(z.shape[0])
    return StepResult(
        deltas=deltas,
        masks=masks or {},
        values=values,
        update_norms={l: float(dw.norm()) for l, dw in deltas.items()},
        timings=clock.times,
    )
