"""Neuron attribution for the NMKE mask: how much one amplified FFN neuron moves the prediction.

For prompt p (read at its last real token) and neuron j of the edited layer's down-projection
``W_l`` (METHOD.md, "Neuron attribution and the entropy-guided mask")::

    S[p, j] = log P(y_p | lens(r_p + s * a_pj * W_l[:, j])) - log P(y_p | lens(r_p))
    lens(x) = softmax(W_U (g * x) / sigma_p + b)

with ``s`` the amplify factor, ``g`` the final norm weight and ``sigma_p`` the RMS (Llama) or
standard deviation (GPT-2) of the FINAL layer output at that position; probabilities are clamped
to ``[floor, 1 - floor]`` and non-finite scores become 0.

The lens is linear in x before the softmax, so with ``A = W_U diag(g) W_l`` (V x d_ff)::

    logits[p, j] = base_p + (s * a_pj / sigma_p) * A[:, j],   base_p = W_U (g * r_p) / sigma_p + b

and each score is one gathered logit minus one log-sum-exp over the vocabulary. The only Python
loop is over chunks of neurons, which bounds the ``[P, chunk, V]`` block held in memory.
"""

from __future__ import annotations

import math

import torch

_FLOAT32_BYTES = 4

DEFAULT_BLOCK_BYTES = 128 * 2**20
"""Default size of the ``[P, chunk, V]`` float32 block when the chunk is chosen automatically.

Around 100-200 MB is large enough that per-chunk overheads (kernel launches, the small matmul
for ``A``) are negligible and small enough to sit beside a large model on the accelerator.
"""


def auto_neuron_chunk(
    n_prompts: int, vocab_size: int, d_ff: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES
) -> int:
    """Largest neuron chunk whose ``[n_prompts, chunk, vocab_size]`` float32 block fits the budget.

    At least 1 (a single neuron's block may exceed a tiny budget) and at most ``d_ff``.
    """
    per_neuron = max(1, n_prompts * vocab_size * _FLOAT32_BYTES)
    return max(1, min(d_ff, max_block_bytes // per_neuron))


def _clamped_log_prob(
    target_logit: torch.Tensor, lse: torch.Tensor, log_lo: float, log_hi: float
) -> torch.Tensor:
    """``log(clamp(p, lo, hi))`` for ``p = exp(target_logit - lse)``, computed in log space.

    Mirrors ``log(clamp(softmax(logits)[y]))`` including its failure modes: a softmax over logits
    whose log-sum-exp is not finite (a +inf or NaN logit, or all logits -inf) is NaN everywhere,
    so we return NaN there (it becomes a 0 score); a -inf target logit beside finite ones is a
    probability of exactly 0, which the clamp lifts to the floor.
    """
    log_p = torch.where(torch.isfinite(lse), target_logit - lse, torch.nan)
    return log_p.clamp(log_lo, log_hi)


def _check_shapes(
    resid: torch.Tensor,
    keys: torch.Tensor,
    final_scale: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    unembed: torch.Tensor,
    unembed_bias: torch.Tensor | None,
    targets: torch.Tensor,
) -> None:
    if resid.dim() != 2 or keys.dim() != 2 or weight.dim() != 2 or unembed.dim() != 2:
        raise ValueError("resid, keys, weight and unembed must be 2-D")
    n_prompts, d = resid.shape
    d_ff = keys.shape[1]
    vocab = unembed.shape[0]
    expected = {
        "keys": (keys.shape, (n_prompts, d_ff)),
        "final_scale": (final_scale.shape, (n_prompts,)),
        "weight": (weight.shape, (d, d_ff)),
        "norm_weight": (norm_weight.shape, (d,)),
        "unembed": (unembed.shape, (vocab, d)),
        "targets": (targets.shape, (n_prompts,)),
    }
    if unembed_bias is not None:
        expected["unembed_bias"] = (unembed_bias.shape, (vocab,))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"attribution_scores: {name} has shape {tuple(got)}, expected {want}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"attribution_scores: targets must be integer token ids, got {targets.dtype}"
        )


@torch.no_grad()  # a read-only probe: the model's weights may still have requires_grad set
def attribution_scores(
    resid: torch.Tensor,  # [P, d]
    keys: torch.Tensor,  # [P, d_ff]
    final_scale: torch.Tensor,  # [P]
    weight: torch.Tensor,  # [d, d_ff]
    norm_weight: torch.Tensor,  # [d]
    unembed: torch.Tensor,  # [V, d]
    unembed_bias: torch.Tensor | None,  # [V] or None
    targets: torch.Tensor,  # [P] long
    amplify: float = 30.0,
    prob_floor: float = 1e-8,
    neuron_chunk: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:  # [P, d_ff] float32
    """Log-probability gain of each prompt's current top-1 token when one neuron is amplified.

    Args:
        resid: residual stream entering layer l's MLP at each prompt's read position.
        keys: input of the down-projection there (neuron activations ``a_p``).
        final_scale: RMS (Llama) or std (GPT-2) of the final layer's output at that position,
            i.e. what the final norm divides by.
        weight: the down-projection ``W_l`` as ``[d, d_ff]`` (column j = neuron j's value).
        norm_weight: final norm weight ``g``.
        unembed: unembedding ``W_U``.
        unembed_bias: unembedding bias, or None.
        targets: ``y_p``, the model's current top-1 next token per prompt.
        amplify: the factor ``s`` a neuron's sub-value is multiplied by (30 in NMKE).
        prob_floor: probabilities are clamped to ``[prob_floor, 1 - prob_floor]`` before the log.
        neuron_chunk: neurons per chunk; None picks the largest chunk whose ``[P, chunk, V]``
            float32 block fits ``max_block_bytes`` (peak extra memory is about one block plus
            ``A``'s ``[chunk, V]`` slice and the ``[V, d]`` scaled unembedding).
        max_block_bytes: memory budget for the automatic chunk.

    Returns:
        ``[P, d_ff]`` float32 scores on the inputs' device; non-finite scores are 0.
    """
    _check_shapes(resid, keys, final_scale, weight, norm_weight, unembed, unembed_bias, targets)
    if not (0.0 < prob_floor < 0.5):
        raise ValueError(f"attribution_scores: prob_floor must be in (0, 0.5), got {prob_floor}")
    if not math.isfinite(amplify):
        raise ValueError(f"attribution_scores: amplify must be finite, got {amplify}")
    if neuron_chunk is not None and neuron_chunk < 1:
        raise ValueError(f"attribution_scores: neuron_chunk must be >= 1, got {neuron_chunk}")

    device = resid.device
    n_prompts, d_ff = keys.shape
    vocab = unembed.shape[0]
    # Half-precision logits over a 50k-250k vocabulary lose the small log-prob differences we
    # rank neurons by, so everything below runs in float32 whatever the model's dtype.
    f32 = dict(device=device, dtype=torch.float32)
    resid = resid.to(**f32)
    keys = keys.to(**f32)
    sigma = final_scale.to(**f32)  # [P]
    weight_t = weight.to(**f32).t().contiguous()  # [d_ff, d]: row j = neuron j's value vector
    unembed_g = unembed.to(**f32) * norm_weight.to(**f32)  # [V, d] = W_U diag(g)
    targets = targets.to(device=device, dtype=torch.long)

    scores = torch.zeros(n_prompts, d_ff, **f32)
    if n_prompts == 0 or d_ff == 0:
        return scores

    log_lo, log_hi = math.log(prob_floor), math.log1p(-prob_floor)

    base = (resid / sigma[:, None]) @ unembed_g.t()  # [P, V]
    if unembed_bias is not None:
        base = base + unembed_bias.to(**f32)
    base_target = base.gather(1, targets[:, None])  # [P, 1]
    base_lse = torch.logsumexp(base, dim=1, keepdim=True)  # [P, 1]
    base_log_p = _clamped_log_prob(base_target, base_lse, log_lo, log_hi)  # [P, 1]

    # The lens divides by sigma_p measured on the real forward (METHOD.md), not by the norm of the
    # amplified vector, so the amplified sub-value is scaled by the same fixed 1/sigma_p.
    coef = amplify * keys / sigma[:, None]  # [P, d_ff]

    chunk = neuron_chunk or auto_neuron_chunk(n_prompts, vocab, d_ff, max_block_bytes)
    chunk = min(chunk, d_ff)
    # One flat buffer reused by every chunk (the last, shorter one takes a contiguous prefix):
    # re-allocating a block of this size per chunk costs page faults on CPU.
    buffer = torch.empty(n_prompts * chunk * vocab, **f32)

    for start in range(0, d_ff, chunk):
        stop = min(start + chunk, d_ff)
        width = stop - start
        a_cols_t = weight_t[start:stop] @ unembed_g.t()  # [c, V] = A[:, start:stop]^T
        c = coef[:, start:stop]  # [P, c]

        block = buffer[: n_prompts * width * vocab].view(n_prompts, width, vocab)  # [P, c, V]
        torch.addcmul(base[:, None, :], c[:, :, None], a_cols_t[None, :, :], out=block)
        # log-sum-exp in place (one block in memory instead of torch.logsumexp's temporary);
        # an infinite or NaN max turns the row into NaN, which _clamped_log_prob maps to NaN.
        row_max = block.amax(dim=2, keepdim=True)  # [P, c, 1]
        block.sub_(row_max).exp_()
        lse = block.sum(dim=2).log_().add_(row_max.squeeze(2))  # [P, c]

        # Gather from the same A slice as the block so the target logit matches its row exactly.
        target_logit = base_target + c * a_cols_t[:, targets].t()  # [P, c]
        log_p = _clamped_log_prob(target_logit, lse, log_lo, log_hi)
        scores[:, start:stop] = log_p - base_log_p

    # NaN/inf scores come from degenerate inputs (a zero final scale, overflowing activations);
    # they carry no ranking information, so they are neutral (0) like the authors' code.
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
