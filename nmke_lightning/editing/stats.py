"""Key second moments ``C0_l = mean_t k_t k_t^T`` of every edited layer, in one pass.

The state is a plain sum (float64) plus a token count, so shards computed on different
processes add up exactly, and a pass can be saved and resumed between batches.
Results are cached on disk, keyed by model identity, layer, corpus and token budget.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import ArchSpec
from .hooks import run_until_stop, trace
from .tokens import pad_right


@dataclass
class CovarianceState:
    """Running float64 sums of ``k k^T`` per layer over the tokens seen so far."""

    layers: tuple[int, ...]
    sums: dict[int, torch.Tensor]  # layer -> [d_ff, d_ff] float64
    count: int = 0  # tokens accumulated
    next_chunk: int = 0  # position of this shard in its list of corpus chunks
    done: bool = False

    @classmethod
    def empty(cls, layers, d_ff: int, device="cpu") -> "CovarianceState":
        layers = tuple(layers)
        return cls(layers, {l: torch.zeros(d_ff, d_ff, dtype=torch.float64, device=device) for l in layers})

    def __add__(self, other: "CovarianceState") -> "CovarianceState":
        if self.layers != other.layers:
            raise ValueError(f"cannot add covariance states of layers {self.layers} and {other.layers}")
        return CovarianceState(
            self.layers,
            {l: self.sums[l] + other.sums[l].to(self.sums[l].device) for l in self.layers},
            self.count + other.count,
            next_chunk=0,
            done=self.done and other.done,
        )

    def mean(self, layer: int) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("covariance of zero tokens: the corpus produced no keys")
        return self.sums[layer] / self.count

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename) so an interrupted save never corrupts a resume."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"sum.{l}": s.cpu().contiguous() for l, s in self.sums.items()}
        meta = {"layers": json.dumps(list(self.layers)), "count": str(self.count),
                "next_chunk": str(self.next_chunk), "done": str(int(self.done))}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "CovarianceState":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path), device=str(device))
        layers = tuple(json.loads(meta["layers"]))
        return cls(layers, {l: tensors[f"sum.{l}"] for l in layers}, int(meta["count"]),
                   int(meta["next_chunk"]), bool(int(meta["done"])))


def corpus_chunks(tokenizer, text: str, seq_len: int, n_tokens: int) -> list[list[int]]:
    """Split a corpus into consecutive chunks of `seq_len` tokens, `n_tokens` in all.

    Paragraphs (non-empty lines) are tokenised separately and joined with the EOS token, so a
    chunk never depends on how earlier text was batched.
    """
    if seq_len < 2 or n_tokens < 1:
        raise ValueError("stats.seq_len must be >= 2 and stats.n_tokens >= 1")
    paragraphs = [line.strip() for line in text.splitlines() if line.strip()]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= n_tokens:
            break
    stream = stream[:n_tokens]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


@torch.no_grad()
def accumulate(
    model: nn.Module,
    spec: ArchSpec,
    chunks: list[list[int]],
    layers,
    batch_size: int = 8,
    state: CovarianceState | None = None,
    shard: tuple[int, int] = (0, 1),
    on_batch: Callable[[CovarianceState], None] | None = None,
    pad_id: int = 0,
) -> CovarianceState:
    """Add ``k k^T`` of every real token of this shard's chunks to `state` (one forward per
    batch for all layers, stopped after the last edited layer's down-projection).

    `shard` = (rank, world_size): rank r takes chunks r, r + W, ... `state.next_chunk` counts
    this shard's finished chunks, so a saved state resumes where it stopped.
    """
    layers = tuple(sorted(layers))
    device = next(model.parameters()).device
    if state is None:
        state = CovarianceState.empty(layers, spec.d_ff(model, layers[0]), device=device)
    rank, world = shard
    mine = chunks[rank::world]
    names = [spec.down_proj.format(l) for l in layers]
    while state.next_chunk < len(mine):
        batch = mine[state.next_chunk : state.next_chunk + batch_size]
        ids, mask = pad_right(batch, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        with trace(model, inputs=names, stop_after=names[-1]) as rec:
            run_until_stop(model, input_ids=ids, attention_mask=mask)
        real = mask.bool()
        for layer, name in zip(layers, names):
            keys = rec.inputs[name][real].to(torch.float64)  # [tokens, d_ff]
            state.sums[layer].addmm_(keys.T, keys)
        state.count += int(real.sum())
        state.next_chunk += len(batch)
        if on_batch is not None:
            on_batch(state)
    state.done = True
    return state


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the model: architecture config plus per-tensor float64 sums and norms.

    Computed on the UNEDITED model: the statistics describe the original knowledge.
    """
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", type(model).__name__)).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            p64 = p.detach().to(torch.float64)
            h.update(f"{name}:{tuple(p.shape)}:{p64.sum().item():.12e}:{p64.square().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


@dataclass
class CovarianceCache:
    """Where per-layer statistics live: ``root/<model>/<corpus>-<n_tokens>-<seq_len>/layer<l>``."""

    root: Path
    model_id: str
    corpus_id: str
    n_tokens: int
    seq_len: int
    partial_every: int = 20  # batches between resume points of an unfinished pass
    _dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self._dir = Path(self.root) / self.model_id / f"{self.corpus_id}-{self.n_tokens}-{self.seq_len}"

    def layer_path(self, layer: int) -> Path:
        return self._dir / f"layer{layer}.safetensors"

    def partial_path(self, layers, shard: tuple[int, int]) -> Path:
        tag = "_".join(map(str, sorted(layers)))
        return self._dir / f"partial-{tag}-rank{shard[0]}of{shard[1]}.safetensors"


def corpus_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def layer_covariances(
    model: nn.Module,
    spec: ArchSpec,
    tokenizer,
    text: str,
    layers,
    n_tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[CovarianceState], CovarianceState] | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """``C0_l`` (float64, ``[d_ff, d_ff]``) for each layer, and the token count.

    Cached layers are read from `cache_dir`; the missing ones are computed together in one pass.
    Under data parallelism each process passes its `shard` and a `reduce` that all-reduces
    the state (sums and count add up); only the merged result is written to the cache.
    """
    layers = tuple(sorted(layers))
    device = next(model.parameters()).device
    cache = None
    if cache_dir is not None:
        cache = CovarianceCache(Path(cache_dir), model_id or model_fingerprint(model), corpus_id(text), n_tokens, seq_len)
    found: dict[int, CovarianceState] = {}
    if cache is not None:
        for l in layers:
            if cache.layer_path(l).exists():
                found[l] = CovarianceState.load(cache.layer_path(l), device=device)
    missing = tuple(l for l in layers if l not in found)
    if missing:
        chunks = corpus_chunks(tokenizer, text, seq_len, n_tokens)
        partial = cache.partial_path(missing, shard) if cache is not None else None
        state = None
        if partial is not None and partial.exists():
            state = CovarianceState.load(partial, device=device)
        batches = 0

        def checkpoint(s: CovarianceState) -> None:
            nonlocal batches
            batches += 1
            if partial is not None and batches % cache.partial_every == 0:
                s.save(partial)

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        state = accumulate(model, spec, chunks, missing, batch_size, state, shard, checkpoint, pad)
        if reduce is not None:
            state = reduce(state)
        if cache is not None and shard[0] == 0:
            for l in missing:
                CovarianceState((l,), {l: state.sums[l]}, state.count, done=True).save(cache.layer_path(l))
        if partial is not None and partial.exists():
            partial.unlink()
        for l in missing:
            found[l] = CovarianceState((l,), {l: state.sums[l]}, state.count, done=True)
    counts = {found[l].count for l in layers}
    if len(counts) != 1:
        raise ValueError(f"cached covariances of layers {layers} disagree on the token count: {counts}")
    return {l: found[l].mean(l) for l in layers}, counts.pop()
