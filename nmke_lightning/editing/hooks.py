"""Scoped forward hooks: record module inputs/outputs, stop a forward early.

Every hook is registered inside a ``with`` block and removed in ``finally``, so no hook
survives an exception (tests check ``_forward_hooks`` is empty afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import get_module


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been recorded."""


def first_output(x):
    """The tensor of a module output that may be a tuple (hidden states first)."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class Trace:
    """What a traced forward recorded, keyed by module path."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def trace(
    model: nn.Module,
    inputs: tuple[str, ...] | list[str] = (),
    outputs: tuple[str, ...] | list[str] = (),
    stop_after: str | None = None,
    detach: bool = True,
) -> Iterator[Trace]:
    """Record the first positional input of modules in `inputs` and the (first) output of
    modules in `outputs`; raise `StopForward` after `stop_after` has run.

    Use ``run_until_stop`` (or catch `StopForward`) around the forward when `stop_after` is set.
    """
    record = Trace()
    handles = []

    def keep(x: torch.Tensor) -> torch.Tensor:
        return x.detach() if detach else x

    try:
        for name in inputs:
            def pre_hook(module, args, name=name):
                record.inputs[name] = keep(first_output(args))
            handles.append(get_module(model, name).register_forward_pre_hook(pre_hook))
        for name in outputs:
            def post_hook(module, args, output, name=name):
                record.outputs[name] = keep(first_output(output))
            handles.append(get_module(model, name).register_forward_hook(post_hook))
        if stop_after is not None:
            def stop_hook(module, args, output):
                raise StopForward
            handles.append(get_module(model, stop_after).register_forward_hook(stop_hook))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(model: nn.Module, **batch) -> None:
    """Run a forward that a `trace(stop_after=...)` hook may cut short."""
    with contextlib.suppress(StopForward):
        model(**batch, use_cache=False)
