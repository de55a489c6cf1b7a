"""Reading keys, layer outputs and attribution inputs off forward passes (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, get_module
from .hooks import run_until_stop, trace
from .tokens import PromptBatch


@torch.no_grad()
def read_keys(
    model: nn.Module,
    spec: ArchSpec,
    batch: PromptBatch,
    layers,
    n_templates: int,
    out_layer: int | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys at the subject's last token, averaged over templates, for each layer in `layers`
    (``{l: [n, d_ff]}``), and, if `out_layer` is given, the output of that layer at the subject's
    last token of the bare prompt (template 0) ``[n, d]``. The forward stops after the deepest
    module needed. Rows of `batch` are request-major (see `values.prompt_batch`).
    """
    layers = tuple(sorted(layers))
    names = {l: spec.down_proj.format(l) for l in layers}
    out_name = None if out_layer is None else f"{spec.layers}.{out_layer}"
    deepest = max(layers + ((out_layer,) if out_layer is not None else ()))
    stop = out_name if out_layer is not None and out_layer >= layers[-1] else names[deepest]
    device = next(model.parameters()).device
    batch = batch.to(device)
    rows = torch.arange(batch.input_ids.shape[0], device=device)
    with trace(model, inputs=list(names.values()), outputs=[out_name] if out_name else [], stop_after=stop) as rec:
        run_until_stop(model, **batch.model_inputs())
    keys = {}
    for l, name in names.items():
        per_row = rec.inputs[name][rows, batch.lookup].float()  # [n * n_templates, d_ff]
        keys[l] = per_row.view(-1, n_templates, per_row.shape[-1]).mean(1)
    out = None
    if out_name is not None:
        bare = rows[::n_templates]
        out = rec.outputs[out_name][bare, batch.lookup[bare]].float()
    return keys, out


def norm_epsilon(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


@dataclass
class AttributionInputs:
    """Everything the attribution score needs, read at one position per prompt."""

    resid: dict[int, torch.Tensor]  # layer -> [P, d] residual entering the MLP
    keys: dict[int, torch.Tensor]  # layer -> [P, d_ff]
    final_scale: torch.Tensor  # [P] RMS / std of the final layer's output
    targets: torch.Tensor  # [P] current top-1 next token


def attribution_trace_names(spec: ArchSpec, layers) -> list[str]:
    """Modules whose inputs a forward must record for `attribution_inputs_from_trace`."""
    layers = sorted(layers)
    return [*(spec.residual_in.format(l) for l in layers), *(spec.down_proj.format(l) for l in layers),
            spec.final_norm]


@torch.no_grad()
def attribution_inputs_from_trace(
    model: nn.Module, spec: ArchSpec, rec, layers, rows: torch.Tensor, pos: torch.Tensor
) -> AttributionInputs:
    """The attribution inputs of rows `rows` at positions `pos`, from a forward that recorded
    `attribution_trace_names`. The prediction there comes from the final norm and the LM head
    applied to the recorded final-norm input, only at those positions."""
    final_in = rec.inputs[spec.final_norm][rows, pos]  # [P, d]
    norm = get_module(model, spec.final_norm)
    targets = get_module(model, spec.unembed)(norm(final_in)).argmax(-1)
    final = final_in.float()
    eps = norm_epsilon(norm)
    if spec.norm_kind == "rms":
        scale = (final.square().mean(-1) + eps).sqrt()
    elif spec.norm_kind == "layer":
        scale = (final.var(-1, unbiased=False) + eps).sqrt()
    else:
        raise ValueError(f"unknown norm kind {spec.norm_kind!r} in the architecture table")
    layers = sorted(layers)
    return AttributionInputs(
        resid={l: rec.inputs[spec.residual_in.format(l)][rows, pos].float() for l in layers},
        keys={l: rec.inputs[spec.down_proj.format(l)][rows, pos].float() for l in layers},
        final_scale=scale,
        targets=targets,
    )


@torch.no_grad()
def read_attribution_inputs(
    model: nn.Module, spec: ArchSpec, batch: PromptBatch, layers, position: str = "last_real"
) -> AttributionInputs:
    """One forward of the decoder stack over the prompts (no target appended), read at the last
    real token (``position="last_real"``) or at index -1 of the right-padded batch
    (``"padded_last"``, the authors' code: a pad token for all but the longest prompt).
    """
    if position not in ("last_real", "padded_last"):
        raise ValueError(f"attribution_position must be 'last_real' or 'padded_last', got {position!r}")
    device = next(model.parameters()).device
    batch = batch.to(device)
    rows = torch.arange(batch.input_ids.shape[0], device=device)
    pos = batch.last if position == "last_real" else torch.full_like(batch.last, batch.input_ids.shape[1] - 1)
    with trace(model, inputs=attribution_trace_names(spec, layers)) as rec:
        model.base_model(**batch.model_inputs(), use_cache=False)
    return attribution_inputs_from_trace(model, spec, rec, layers, rows, pos)
