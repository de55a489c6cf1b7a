"""Data parallelism for an editor: DDP without the gradient wrapper.

The language model has no trainable parameters, so PyTorch's DistributedDataParallel has
nothing to do (and refuses such a module). Every rank holds the full model; rank 0's weights
are broadcast once at start, each rank computes values, keys and attribution scores for its
share of a step, the shares are gathered, and every rank applies the identical update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order; shares may differ in length.

    Collective: every rank must call it, in the same order. A no-op without a process group.
    """
    if not distributed():
        return t
    world = dist.get_world_size()
    t = t.contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """All-reduce sum (in place); a no-op without a process group."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class EditDDPStrategy(DDPStrategy):
    """DDP launching and process groups, but no DistributedDataParallel wrapper: rank 0's
    weights are broadcast instead, so every rank starts from the identical model."""

    strategy_name = "edit_ddp"

    def configure_ddp(self) -> None:
        # Keep the plain LightningModule; only make the ranks' weights identical.
        assert self.model is not None
        with torch.no_grad():
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(tensor.data, src=0)

    @classmethod
    def register_strategies(cls, strategy_registry: dict) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="DDP for editing: no gradient wrapper, rank 0's weights broadcast"
        )
        strategy_registry.register(
            cls.strategy_name + "_gloo", cls, process_group_backend="gloo",
            description="edit_ddp with the gloo backend (CPU)",
        )


if "edit_ddp" not in StrategyRegistry:
    EditDDPStrategy.register_strategies(StrategyRegistry)
