"""Architecture table: where each model family keeps the pieces the editor touches.

Adding a family is adding one `ArchSpec` to `ARCHITECTURES`; nothing else in the package
branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module-path templates (``{}`` is the layer index) for one transformer family."""

    family: str
    """Human-readable family name used in messages."""
    model_types: tuple[str, ...]
    """`config.model_type` values that belong to this family."""
    layers: str
    """The ModuleList of decoder layers."""
    down_proj: str
    """The MLP down-projection ``W_l: R^{d_ff} -> R^d``; its INPUT is the key (one value per neuron)."""
    down_proj_transposed: bool
    """True when the weight is stored ``[d_ff, d]`` (GPT-2's Conv1D) instead of ``[d, d_ff]``."""
    mlp: str
    """The MLP block; its input is the (normed) MLP input."""
    residual_in: str
    """Module whose INPUT is the residual stream the MLP reads from (the pre-MLP norm)."""
    final_norm: str
    """The final norm applied before the unembedding."""
    norm_kind: str
    """``"rms"`` (divide by the RMS) or ``"layer"`` (divide by the standard deviation)."""
    unembed: str
    """The unembedding (LM head) linear layer."""

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return get_module(model, f"{self.layers}.{index}")

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        return get_module(model, self.down_proj.format(layer))

    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.layers))

    def read_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The down-projection weight as ``[d, d_ff]`` (a view, whatever the storage)."""
        weight = self.down_proj_module(model, layer).weight
        return weight.T if self.down_proj_transposed else weight

    @torch.no_grad()
    def add_to_weight(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """``W_l += delta`` with ``delta`` given as ``[d, d_ff]``."""
        weight = self.down_proj_module(model, layer).weight
        delta = delta.to(device=weight.device, dtype=weight.dtype)
        weight.add_(delta.T if self.down_proj_transposed else delta)

    def d_ff(self, model: nn.Module, layer: int = 0) -> int:
        return self.read_weight(model, layer).shape[1]


_LLAMA_LIKE = dict(
    layers="model.layers",
    down_proj="model.layers.{}.mlp.down_proj",
    down_proj_transposed=False,
    mlp="model.layers.{}.mlp",
    residual_in="model.layers.{}.post_attention_layernorm",
    final_norm="model.norm",
    norm_kind="rms",
    unembed="lm_head",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), **_LLAMA_LIKE),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        down_proj="transformer.h.{}.mlp.c_proj",
        down_proj_transposed=True,
        mlp="transformer.h.{}.mlp",
        residual_in="transformer.h.{}.ln_2",
        final_norm="transformer.ln_f",
        norm_kind="layer",
        unembed="lm_head",
    ),
    # GPT-J runs attention and MLP in parallel on ln_1(h): the residual the MLP reads is the
    # block input.
    ArchSpec(
        family="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        down_proj="transformer.h.{}.mlp.fc_out",
        down_proj_transposed=False,
        mlp="transformer.h.{}.mlp",
        residual_in="transformer.h.{}.ln_1",
        final_norm="transformer.ln_f",
        norm_kind="layer",
        unembed="lm_head",
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        down_proj_transposed=False,
        mlp="gpt_neox.layers.{}.mlp",
        residual_in="gpt_neox.layers.{}.post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm",
        norm_kind="layer",
        # transformers >= 5 names the GPT-NeoX head `lm_head` (4.x called it `embed_out`).
        unembed="lm_head",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def arch_for(model: nn.Module) -> ArchSpec:
    """The table entry for `model`, or a ValueError listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    families = ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in ARCHITECTURES)
    raise ValueError(
        f"model type {model_type!r} is not supported; supported families: {families}. "
        "Add an ArchSpec to nmke_lightning.editing.arch.ARCHITECTURES to support another."
    )


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"model has no module {path!r} ({type(model).__name__})") from err
