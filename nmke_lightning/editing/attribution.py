"""Neuron attribution for the NMKE mask: how much one amplified FFN neuron moves the prediction.

For prompt p (read at its last real token) and neuron j of the edited layer's down-projection
``W_l`` (METHOD.md, "Neuron attribution and the entropy-guided mask")::

    S[p, j] = log P(y_p | lens(r_p + s * a_pj * W_l[:, j])) - log P(y_p | lens(r_p))
    lens(x) = softmax(W_U (g * x) / sigma_p + b)

with ``s`` the amplify factor, ``g`` the final norm weight and ``sigma_p`` the RMS (Llama) or
standard deviation (GPT-2) of the FINAL layer output at that position; probabilities are clamped
to ``[floor, 1 - floor]`` and non-finite scores become 0.

The lens is linear in x before the softmax, so with ``A = W_U diag(g) W_l`` (V x d_ff)::

    logits[p, j] = base_p + c_pj * A[:, j],   base_p = W_U (g * r_p) / sigma_p + b,
    c_pj = s * a_pj / sigma_p

and each score is one gathered logit minus ``lse_p + log E_{w_p}[exp(c_pj A[:, j])]``, where
``w_p = softmax(base_p)`` and ``lse_p`` is base_p's log-sum-exp. Evaluating that expectation
directly costs one exponential per (prompt, neuron, token): P x d_ff x V, 4.5e9 per layer for 60
prompts on SmolLM2, which no CPU does quickly.

Instead, centre each column ``A[:, j]`` on its mid-range ``m_j`` with half-range ``h_j``, so
``t_vj = (A[v, j] - m_j) / h_j`` lies in [-1, 1] and ``z_pj = c_pj h_j`` has ``|z_pj| = rho_pj``,
and expand the exponential in Chebyshev polynomials (Jacobi-Anger)::

    E_w[exp(c A_j)] = exp(c m_j) * (I_0(z) * w_mass + 2 sum_{k>=1} I_k(z) * C_k[p, j]),
    C_k = w @ T_k(t)

with ``I_k`` the modified Bessel functions. The moments ``C_k`` are K matrix products (fast on
any hardware). Since ``|T_k| <= 1`` on [-1, 1] and ``|I_k(z)| = I_k(rho)``, truncating after K
terms leaves at most ``r = 2 exp(rho) sum_{k>K} I_k(rho)`` of the expectation's lower bound
``exp(-rho)``, so the log moves by at most ``r / (1 - r)``; pairs with ``rho_pj`` below the
radius where that reaches ``series_tol`` may use the series. This converges much faster than
the Taylor series in ``c (A - m)``: 7 terms reach the radius Taylor needs 10 for. Each neuron
takes as many terms as `series_plan` finds cheapest against sending its remaining pairs to the
exact log-sum-exp (6.1-6.5 of 10 on average on SmolLM2, 0.1-0.4% of pairs exact).
``series_terms=0`` makes every pair exact.

``A`` itself costs 2 V d d_ff flops per layer (87 GFLOP on SmolLM2). `LensProductCache` keeps it
between edit steps and follows a weight change with a low-rank update: one edit step changes
``W_l`` by a matrix of rank at most the number of its requests.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

_FLOAT32_BYTES = 4

DEFAULT_BLOCK_BYTES = 128 * 2**20
"""Default size of the largest float32 work block when the chunk is chosen automatically.

Around 100-200 MB is large enough that per-chunk overheads (kernel launches, the small matmul
for ``A``) are negligible and small enough to sit beside a large model on the accelerator.
"""

EXACT_BLOCK_BYTES = 2 * 2**20
"""Block of the series' exact pairs (``[pairs, V]`` logits): 10 pairs of SmolLM2's vocabulary.
For 160 pairs on 2 CPU threads, 2 MB blocks took 16-20 ms and one 31 MB block 28-49 ms."""

DENSE_BLOCK_BYTES = 16 * 2**20
"""Cap on the automatic block when every score is exact (``series_terms=0``)."""

SERIES_TILE_TOKENS = 1024
"""Vocabulary columns per tile of the series: a chunk's Chebyshev polynomials are built one tile
at a time and multiplied into the moments while they are still in cache."""

SERIES_BLOCK_BYTES = 16 * 2**20
"""Cap on the automatic block of Chebyshev polynomials of one vocabulary tile (``terms`` per
neuron of a chunk, though most neurons need fewer), which sets the neuron chunk: 409 SmolLM2
neurons per chunk with 10 terms and 1024-token tiles. Larger chunks give the moment product more
rows per call; the tile keeps the block in the last-level cache."""

DEFAULT_SERIES_TERMS = 10
"""Moments in the series; with the default tolerance it covers pairs with rho up to about 2.1."""

SERIES_MIN_PROMPTS = 4
"""Fewest prompts for which an edit step uses the series: its cost hardly depends on the number
of prompts (the moment products are thin), while the exact path takes one exponential per
prompt, neuron and token. On SmolLM2 with 6 prompts (one request), one thread, a layer took
1.3-1.7 s with the series against 2.1-2.5 s exact; the two cross at about 4 prompts."""

DEFAULT_SERIES_TOL = 1e-6
"""Largest change of a score the truncated series may cause (a float32 log-sum-exp over a
50k-token vocabulary is about this accurate)."""


def auto_neuron_chunk(
    n_prompts: int, vocab_size: int, d_ff: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES, terms: int = 0,
    tile: int = SERIES_TILE_TOKENS,
) -> int:
    """Largest neuron chunk whose work block fits the budget: the ``[n_prompts, chunk, V]``
    logits when every pair is exact (``terms == 0``), else the ``[terms * chunk, tile]``
    Chebyshev polynomials of one vocabulary tile of the series (its exact pairs run in blocks of
    their own).

    At least 1 (a single neuron's block may exceed a tiny budget) and at most ``d_ff``.
    """
    width = min(tile, vocab_size) if terms else vocab_size
    per_neuron = max(1, (terms or n_prompts) * width * _FLOAT32_BYTES)
    return max(1, min(d_ff, max_block_bytes // per_neuron))


def _bessel_i_tail(terms: int, rho: float) -> float:
    """``sum_{k > terms} I_k(rho)`` for rho >= 0 (modified Bessel functions of the first kind),
    summed from their power series ``I_k(x) = sum_m (x/2)^(2m+k) / (m! (m+k)!)`` until the
    terms no longer change the float64 sum."""
    half, total, k = rho / 2, 0.0, terms + 1
    while True:
        term = math.exp(k * math.log(half) - math.lgamma(k + 1)) if half > 0 else 0.0  # m = 0
        i_k, m = 0.0, 0
        while term > 0 and term > 1e-18 * (i_k + term):
            i_k += term
            m += 1
            term *= half * half / (m * (m + k))
        i_k += term
        total += i_k
        if i_k <= 1e-18 * total or total == 0.0:
            return total
        k += 1


@functools.lru_cache(maxsize=256)
def series_radius(terms: int, tol: float) -> float:
    """Largest rho for which the `terms`-term Chebyshev series is within `tol` of the exact log
    (see the module docstring); -1 (no pair qualifies) when `terms` is 0."""
    if terms <= 0:
        return -1.0

    def bound(rho: float) -> float:
        r = 2 * _bessel_i_tail(terms, rho) * math.exp(rho)
        return r / (1 - r) if r < 1 else math.inf

    lo, hi = 0.0, 1.0
    while bound(hi) <= tol:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bound(mid) <= tol else (lo, mid)
    return lo


def series_radii(terms: int, tol: float) -> tuple[float, ...]:
    """`series_radius` of 1..`terms` terms (increasing)."""
    return tuple(series_radius(k, tol) for k in range(1, terms + 1))


EXACT_PAIR_TERMS = 5.0
"""What one (prompt, neuron) pair on the exact path costs, in series terms of one neuron (its
Chebyshev polynomial over the vocabulary and its moments against every prompt). Measured with
a 49,152-token vocabulary and 60 prompts on one CPU thread: 1.29-1.36 ms per exact pair against
0.20-0.27 ms per term, a ratio of 4.7-6.9."""


def series_plan(
    rho: torch.Tensor, radii: torch.Tensor, finite_rows: torch.Tensor, exact_pair_terms: float = EXACT_PAIR_TERMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many series terms each neuron of a chunk takes, and which pairs use them.

    Neuron j with k terms covers its pairs with ``rho_pj <= radii[k - 1]`` (`radii`: the radius
    of 1..K terms, increasing); its other pairs, and every pair of a row that is not finite
    (`finite_rows` ``[P, 1]``) or whose rho is not, take the exact log-sum-exp. k is the 0..K
    that costs least: ``k + exact_pair_terms * (pairs left exact)``, the fewest terms on a tie.

    Returns ``need`` ``[c]`` long and ``use_series`` ``[P, c]`` bool.
    """
    ok = finite_rows & torch.isfinite(rho)  # [P, c]
    limits = torch.cat([radii.new_full((1,), -1.0), radii.to(rho.dtype)])  # [K + 1]: radius of 0..K terms
    inside = (rho[None] <= limits[:, None, None]) & ok  # [K + 1, P, c]
    exact = rho.shape[0] - inside.sum(dim=1)  # [K + 1, c]
    cost = torch.arange(len(limits), device=rho.device, dtype=rho.dtype)[:, None] + exact_pair_terms * exact
    need = cost.argmin(dim=0)  # the first (fewest terms) of equal costs
    return need, inside.gather(0, need[None, None].expand(1, *rho.shape))[0]


def _bessel_i(z: torch.Tensor, terms: int) -> torch.Tensor:
    """``I_0(z) .. I_terms(z)`` ``[terms + 1, *z.shape]`` in float64, from the power series
    (converges fast for the |z| below the series radii)."""
    q = z.double() / 2
    qmax = float(q.abs().max()) if q.numel() else 0.0
    n_m = 20 + int(4 * qmax)
    m = torch.arange(n_m, device=z.device, dtype=torch.float64)
    k = torch.arange(terms + 1, device=z.device, dtype=torch.float64)
    coef = (-(torch.lgamma(m + 1)[None] + torch.lgamma(m[None] + k[:, None] + 1))).exp()  # [K + 1, M]

    def powers(x: torch.Tensor, n: int) -> torch.Tensor:  # x^0 .. x^n as [n + 1, *x.shape]
        # Running products: a float64 pow per element took a few times longer.
        return torch.cat([torch.ones_like(x)[None], x[None].expand(n, *x.shape)]).cumprod(0)

    sums = torch.tensordot(coef, powers(q * q, n_m - 1), dims=1)  # [K + 1, *z.shape]
    return sums * powers(q, terms)


def row_minmax(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of each row of a 2-D `x` (into `out` if given).

    Two reductions rather than ``torch.aminmax``: on CPU (torch 2.13, 2 cores) aminmax over the
    rows of a ``[1536, 49152]`` float32 product took 0.11 s, amin and amax together 0.02 s."""
    lo, hi = out if out is not None else (None, None)
    return torch.amin(x, dim=1, out=lo), torch.amax(x, dim=1, out=hi)


ROW_BLOCK_BYTES = 3 * 2**20
"""Rows of ``A^T`` updated at a time by `LensProductCache` (then their range is read from cache).
On SmolLM2 (16 rows of 49,152 tokens) a rank-10 update with the ranges took 36 ms per layer,
against 63 ms with 8 MB blocks (42 rows) on the 2-core CPU."""

LENS_MIN_COLUMNS = 16
"""`LensProductCache` multiplies the unembedding by at least this many columns: on the 2-core
CPU a ``[49152, 576] x [576, 10]`` product took 38 ms and the same with 6 zero columns added
16 ms (BLAS kernels are 8 or 16 columns wide; a single column is a fast matrix-vector product)."""

SKETCH_COLUMNS = 40
"""Random columns with which `LensProductCache` first tries to capture a weight change: any
change of rank up to about 35 (an edit step of that many requests) is captured with a few
dozen-MFLOP products instead of the d x d Gram matrix and its eigen-decomposition (on SmolLM2,
about 70 ms per layer)."""


def _sketched_svd(
    change: torch.Tensor, noise: float, columns: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Thin SVD ``u [m, r], s [r], vh [r, n]`` of `change` ``[m, n]`` (float64) from a Gaussian
    sketch of its column space, dropping what is at most `noise` in Frobenius norm; None when
    the sketch leaves more than that (the change has higher rank than the sketch sees).

    ``Q = orth(change @ Omega)``; the residual ``change - Q Q^T change`` is measured, not assumed,
    so an accepted result is within `noise` of `change` whatever the sketch. The smallest
    singular values of ``Q^T change`` are then dropped while residual and dropped energy together
    stay within ``noise^2``. The sketch is seeded: the same change gives the same factors.
    """
    m, n = change.shape
    columns = min(columns, m, n)
    if columns == 0:
        return None
    generator = torch.Generator(device=change.device).manual_seed(0)
    omega = torch.randn(n, columns, generator=generator, device=change.device, dtype=change.dtype)
    q, _ = torch.linalg.qr(change @ omega)  # [m, columns]
    b = q.t() @ change  # [columns, n]
    residual = float((change - q @ b).square().sum())
    if residual > noise**2:
        return None
    eigvals, eigvecs = torch.linalg.eigh(b @ b.t())  # ascending
    energy = eigvals.clamp(min=0)
    dropped = residual + torch.cumsum(energy, 0)  # dropping the i + 1 smallest
    n_drop = int((dropped <= noise**2).sum())
    keep = torch.arange(columns, device=change.device) >= n_drop
    if not bool(keep.any()):
        return change.new_zeros(m, 0), change.new_zeros(0), change.new_zeros(0, n)
    s = energy[keep].sqrt().flip(0)  # descending, as an SVD's
    u_small = eigvecs[:, keep].flip(1)
    vh = (u_small.t() @ b) / s[:, None]  # [r, n]
    return q @ u_small, s, vh


def _gram_svd(change: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``u [m, r], s [r], vh [r, n]`` of `change` ``[m, n]`` (float64) keeping the
    singular values above `noise`, from the eigen-decomposition of the Gram matrix of its shorter
    side (in float64, whose eigenvalues s^2 resolve singular values far below the noise level; a
    full SVD costs several times more)."""
    wide = change.shape[0] <= change.shape[1]
    short = change if wide else change.t()
    eigvals, eigvecs = torch.linalg.eigh(short @ short.t())
    s = eigvals.clamp(min=0).sqrt()
    keep = s > noise
    u, s = eigvecs[:, keep], s[keep]
    vh = (u.t() @ short) / s[:, None]  # [r, longer side]
    return (u, s, vh) if wide else (vh.t(), s, u.t())


class LensProductCache:
    """``A_l^T = (W_U diag(g) W_l)^T`` per edited layer, kept between edit steps.

    `get` compares the weight with the copy ``A`` was last brought up to date with. An unchanged
    weight returns the cached ``A``; a change of low rank (an edit step) is added through its
    thin SVD at ``V (d + d_ff) r`` flops (the SVD from a random sketch of `sketch_columns`
    columns when that captures the change, `_sketched_svd`; else from the Gram matrix,
    `_gram_svd`);
    a change of high rank, a changed norm or unembedding,
    or `refresh_every` low-rank updates in a row rebuild ``A`` (bounding float32 drift). Layers
    whose ``A`` would take the cache past `max_bytes` are not cached (`get` returns None and the
    attribution builds the columns chunk by chunk, as without a cache).
    """

    def __init__(
        self, max_bytes: int = 2 * 2**30, refresh_every: int = 100, max_rank_fraction: float = 0.25,
        sketch_columns: int = SKETCH_COLUMNS,
    ) -> None:
        if max_bytes < 0 or refresh_every < 1 or not 0 < max_rank_fraction <= 1 or sketch_columns < 0:
            raise ValueError("LensProductCache: max_bytes >= 0, refresh_every >= 1, 0 < max_rank_fraction <= 1, "
                             "sketch_columns >= 0")
        self.max_bytes = max_bytes
        self.refresh_every = refresh_every
        self.max_rank_fraction = max_rank_fraction
        self._entries: dict[object, dict] = {}
        self.sketch_columns = sketch_columns
        self.builds = 0  # full products computed (for tests and benchmarks)
        self.low_rank_updates = 0
        self.sketched_updates = 0  # the low-rank updates whose factors came from the sketch

    def _bytes(self) -> int:
        return sum(e["A"].numel() * e["A"].element_size() for e in self._entries.values())

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple:
        """Identity and in-place version of a tensor: changes whenever its values may have."""
        return (t.data_ptr(), t._version, tuple(t.shape), t.device)

    @torch.no_grad()
    def get(
        self, key, weight: torch.Tensor, norm_weight: torch.Tensor, unembed: torch.Tensor
    ) -> torch.Tensor | None:
        """``A^T`` ``[d_ff, V]`` float32 for `weight` ``[d, d_ff]``, or None if it does not fit."""
        vocab, d_ff = unembed.shape[0], weight.shape[1]
        entry = self._entries.get(key)
        size = vocab * d_ff * _FLOAT32_BYTES
        if entry is None and self._bytes() + size > self.max_bytes:
            return None
        f32 = dict(device=weight.device, dtype=torch.float32)
        stamps = (self._stamp(norm_weight), self._stamp(unembed))
        weight = weight.detach().to(**f32)

        def times_lens(x: torch.Tensor) -> torch.Tensor:  # W_U diag(g) x for x [d, k]; no [V, d] scaled copy
            k = x.shape[1]
            pad = LENS_MIN_COLUMNS - k if 1 < k < LENS_MIN_COLUMNS else 0
            x = torch.nn.functional.pad(norm_weight.detach().to(**f32)[:, None] * x, (0, pad))
            return (unembed.detach().to(**f32) @ x)[:, :k]

        if entry is not None and entry["stamps"] == stamps and entry["A"].device == weight.device:
            change = weight - entry["weight"]
            if not bool(change.any()):
                return entry["A"]
            if entry["updates"] < self.refresh_every:
                # The float32 weight rounds every entry after an edit, so the change also holds
                # noise of up to eps/2 per entry (Frobenius and spectral norm <= eps/2 ||W||_F) at
                # full rank. Components below that are dropped: they move A no more than A's own
                # rounding.
                noise = torch.finfo(torch.float32).eps * float(weight.norm())
                change = change.double()
                factors = _sketched_svd(change, noise, self.sketch_columns)
                sketched = factors is not None
                if not sketched:  # the change has more rank than the sketch sees
                    factors = _gram_svd(change, noise)
                u, s, vh = factors
                if len(s) <= self.max_rank_fraction * min(change.shape):
                    self.sketched_updates += int(sketched)
                    return self._add_low_rank(entry, weight, vh.t().float(), times_lens((u * s).float()))
        product = (weight.t() * norm_weight.detach().to(**f32)) @ unembed.detach().to(**f32).t()  # [d_ff, V]
        lo, hi = row_minmax(product)
        self._entries[key] = {"A": product, "lo": lo, "hi": hi, "weight": weight.clone(), "stamps": stamps,
                              "updates": 0}
        self.builds += 1
        return product

    def _add_low_rank(self, entry: dict, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``A^T += left @ right^T`` (``[d_ff, r]``, ``[V, r]``), a block of rows at a time, each
        block's row minima and maxima read while it is still in cache."""
        product = entry["A"]
        rows = max(1, ROW_BLOCK_BYTES // (product.shape[1] * product.element_size()))
        for start in range(0, product.shape[0], rows):
            block = product[start : start + rows].addmm_(left[start : start + rows], right.t())
            row_minmax(block, out=(entry["lo"][start : start + rows], entry["hi"][start : start + rows]))
        entry["weight"] = weight.clone()
        entry["updates"] += 1
        self.low_rank_updates += 1
        return product

    def row_range(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """Row minima and maxima ``[d_ff]`` of the ``A^T`` that `get` last returned for `key`
        (kept with it, so the attribution need not read ``A`` once more for them)."""
        entry = self._entries[key]
        return entry["lo"], entry["hi"]


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
    lens_product: torch.Tensor | None,
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
    if lens_product is not None:
        expected["lens_product"] = (lens_product.shape, (d_ff, vocab))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"attribution_scores: {name} has shape {tuple(got)}, expected {want}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"attribution_scores: targets must be integer token ids, got {targets.dtype}"
        )


def _lse_in_place(block: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the last dimension, overwriting `block` (one block in memory instead of
    torch.logsumexp's temporary); an infinite or NaN max turns the row into NaN, which
    _clamped_log_prob maps to NaN."""
    row_max = block.amax(dim=-1, keepdim=True)
    block.sub_(row_max).exp_()
    return block.sum(dim=-1).log_().add_(row_max.squeeze(-1))


def _exact_lse(
    base: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, prompts: torch.Tensor, neurons: torch.Tensor,
    max_block_bytes: int,
) -> torch.Tensor:
    """``logsumexp(base[p] + coef[p, j] * rows[j])`` for the listed (p, j) pairs, in blocks.

    The blocks are cache-sized (`EXACT_BLOCK_BYTES`) and gathered into two buffers reused
    block after block: fresh tensors of many vocabulary rows each are new pages for the OS to
    fault in, which took 2-3 times as long as the arithmetic on them (SmolLM2, 2 CPU threads)."""
    vocab, n = base.shape[1], prompts.numel()
    out = torch.empty(n, device=base.device, dtype=torch.float32)
    step = min(n, max(1, min(max_block_bytes, EXACT_BLOCK_BYTES) // (vocab * _FLOAT32_BYTES)))
    logits, picked = (torch.empty(step, vocab, device=base.device, dtype=torch.float32) for _ in range(2))
    for start in range(0, n, step):
        p, j = prompts[start : start + step], neurons[start : start + step]
        block = torch.index_select(base, 0, p, out=logits[: p.numel()])  # [m, V]
        block.addcmul_(torch.index_select(rows, 0, j, out=picked[: p.numel()]), coef[p, j][:, None])
        out[start : start + step] = _lse_in_place(block)
    return out


def _series_then_exact_lse(
    base: torch.Tensor, base_lse: torch.Tensor, finite_rows: torch.Tensor, w: torch.Tensor, w_mass: torch.Tensor,
    c: torch.Tensor, rows: torch.Tensor, w_rows: torch.Tensor, radius: torch.Tensor, max_block_bytes: int,
    tile: int = SERIES_TILE_TOKENS,
    row_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``logsumexp(base[p] + c[p, j] * rows[j])`` for a neuron chunk ``[P, c]``: the Chebyshev
    series where `series_plan` gives a pair one (module docstring), the exact log-sum-exp
    elsewhere. `radius` holds the radius of 1..K terms, increasing; `w` may have zero rows after
    the P prompts; `w_rows` ``[P, c]`` is ``sum_v w[p, v] rows[j, v]``, from which the first
    moment follows without a product over the vocabulary. `row_range`: each row's minimum and
    maximum, if known.

    The polynomials are built and multiplied `tile` vocabulary columns at a time, so that each
    tile's polynomials are still in cache when the moment product reads them."""
    terms, vocab = radius.shape[0], base.shape[1]
    lo, hi = row_minmax(rows) if row_range is None else row_range  # [c] each
    mid, half = (hi + lo) / 2, (hi - lo) / 2  # [c]
    rho = c.abs() * half  # [P, c]
    need, use_series = series_plan(rho, radius, finite_rows)
    lse = torch.full_like(c, torch.nan)
    if bool(use_series.any()):
        # Rows sorted by need: the k-th polynomial and its product shrink to the rows that still
        # need term k. T_k(t) of t = (A - m) / h, by T_(k+1) = 2 t T_k - T_(k-1), stored with the
        # signs s_k (+ + - - + + ...) that make each step one addcmul: s_(k+1) T_(k+1) =
        # s_(k-1) T_(k-1) + (2 s_(k+1) / s_k) t (s_k T_k).
        order = need.argsort(descending=True)
        n_rows = [int((need > k).sum()) for k in range(terms)]
        offsets = [0, *itertools.accumulate(n_rows)]
        first = order[: n_rows[0]]  # the neurons with at least one term
        inv_half = torch.where(half > 0, 1 / half, 0.0)
        scale, shift = inv_half[first, None], (-mid * inv_half)[first, None]  # t = scale * A + shift
        sign = [1.0 if k % 4 in (0, 1) else -1.0 for k in range(terms + 1)]
        one = torch.ones((), device=rows.device)
        tile = max(1, min(tile, vocab))
        buffer = torch.empty(offsets[-1] * tile, device=rows.device, dtype=torch.float32)
        # Moments of T_2.. by product over the vocabulary; T_1's is exact from w_rows:
        # sum_v w_v (A_v - m) / h = (w_rows - m w_mass) / h.
        packed_moments = torch.zeros(offsets[-1] - offsets[1], w.shape[0], device=rows.device)
        for v0 in range(0, vocab, tile):
            width = min(tile, vocab - v0)
            packed = buffer[: offsets[-1] * width].view(offsets[-1], width)
            poly = [packed[offsets[k] : offsets[k + 1]] for k in range(terms)]  # poly[k] = s_(k+1) T_(k+1)
            torch.index_select(rows[:, v0 : v0 + width], 0, first, out=poly[0])
            poly[0].mul_(scale).add_(shift)
            for k in range(1, terms):
                n, below = n_rows[k], one if k == 1 else poly[k - 2][: n_rows[k]]
                torch.addcmul(below, poly[0][:n], poly[k - 1][:n], value=2 * sign[k + 1] / sign[k], out=poly[k])
            if offsets[-1] > offsets[1]:
                packed_moments.addmm_(packed[offsets[1] :], w[:, v0 : v0 + width].t())
        n_prompts = c.shape[0]
        moments = torch.zeros(terms, rows.shape[0], n_prompts, device=rows.device)  # [K, c, P]
        moments[0] = ((w_rows - mid * w_mass) * inv_half).t()  # every neuron, in the chunk's order
        for k in range(1, terms):
            moments[k, : n_rows[k]] = packed_moments[offsets[k] - offsets[1] : offsets[k + 1] - offsets[1], :n_prompts]
        moments[1:] = moments[1:, order.argsort()]
        moments = moments.transpose(1, 2)  # [K, P, c] in the chunk's order
        bessel = _bessel_i(torch.where(use_series, c * half, 0.0), terms).float()  # [K + 1, P, c]
        weights = 2 * torch.tensor(sign[1:], device=rows.device)[:, None, None] * bessel[1:]
        series = bessel[0] * w_mass + (weights * moments).sum(dim=0)  # E_w[exp(c (A - m))]
        lse = torch.where(use_series, base_lse + c * mid + series.log(), lse)
    exact = ~use_series
    if bool(exact.any()):
        prompts, neurons = exact.nonzero(as_tuple=True)
        lse[prompts, neurons] = _exact_lse(base, c, rows, prompts, neurons, max_block_bytes)
    return lse


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
    series_terms: int = DEFAULT_SERIES_TERMS,
    series_tol: float = DEFAULT_SERIES_TOL,
    lens_product: torch.Tensor | None = None,  # [d_ff, V]
    series_tile: int = SERIES_TILE_TOKENS,
    lens_range: tuple[torch.Tensor, torch.Tensor] | None = None,  # [d_ff] each
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
        neuron_chunk: neurons per chunk; None picks the largest chunk whose work block fits
            ``max_block_bytes``.
        max_block_bytes: memory budget for the automatic chunk and the exact-path blocks.
        series_terms: moments K of the series (module docstring); 0 computes every score with
            the exact log-sum-exp.
        series_tol: the series is used only where its truncation changes a score by at most this.
        lens_product: ``A^T = (W_U diag(g) W_l)^T`` ``[d_ff, V]`` if already known
            (`LensProductCache`); otherwise its rows are computed chunk by chunk.
        series_tile: vocabulary columns per tile of the series' polynomials (cache blocking;
            the scores do not depend on it beyond float rounding).
        lens_range: the minimum and maximum of each row of `lens_product`, if known
            (`LensProductCache.row_range`); they must be exactly those of the given product.

    Returns:
        ``[P, d_ff]`` float32 scores on the inputs' device; non-finite scores are 0.
    """
    _check_shapes(resid, keys, final_scale, weight, norm_weight, unembed, unembed_bias, targets, lens_product)
    if lens_range is not None and (lens_product is None or any(tuple(r.shape) != (keys.shape[1],) for r in lens_range)):
        raise ValueError("attribution_scores: lens_range needs lens_product and two [d_ff] tensors (its row minima "
                         "and maxima)")
    if not (0.0 < prob_floor < 0.5):
        raise ValueError(f"attribution_scores: prob_floor must be in (0, 0.5), got {prob_floor}")
    if not math.isfinite(amplify):
        raise ValueError(f"attribution_scores: amplify must be finite, got {amplify}")
    if neuron_chunk is not None and neuron_chunk < 1:
        raise ValueError(f"attribution_scores: neuron_chunk must be >= 1, got {neuron_chunk}")
    if series_tile < 1:
        raise ValueError(f"attribution_scores: series_tile must be >= 1, got {series_tile}")
    if series_terms < 0 or not series_tol > 0:
        raise ValueError(
            f"attribution_scores: series_terms must be >= 0 and series_tol > 0, got {series_terms}, {series_tol}"
        )

    device = resid.device
    n_prompts, d_ff = keys.shape
    vocab = unembed.shape[0]
    # Half-precision logits over a 50k-250k vocabulary lose the small log-prob differences we
    # rank neurons by, so everything below runs in float32 whatever the model's dtype.
    f32 = dict(device=device, dtype=torch.float32)
    resid = resid.to(**f32)
    keys = keys.to(**f32)
    sigma = final_scale.to(**f32)  # [P]
    # W_U diag(g) is never formed ([V, d]); g scales the d-sized side of each product instead.
    unembed = unembed.to(**f32)
    norm_weight = norm_weight.to(**f32)
    weight = weight.to(**f32)
    targets = targets.to(device=device, dtype=torch.long)

    scores = torch.zeros(n_prompts, d_ff, **f32)
    if n_prompts == 0 or d_ff == 0:
        return scores

    log_lo, log_hi = math.log(prob_floor), math.log1p(-prob_floor)

    base = (resid * norm_weight / sigma[:, None]) @ unembed.t()  # [P, V]
    if unembed_bias is not None:
        base = base + unembed_bias.to(**f32)
    base_target = base.gather(1, targets[:, None])  # [P, 1]
    base_lse = torch.logsumexp(base, dim=1, keepdim=True)  # [P, 1]
    base_log_p = _clamped_log_prob(base_target, base_lse, log_lo, log_hi)  # [P, 1]

    # The lens divides by sigma_p measured on the real forward (METHOD.md), not by the norm of the
    # amplified vector, so the amplified sub-value is scaled by the same fixed 1/sigma_p.
    coef = amplify * keys / sigma[:, None]  # [P, d_ff]

    terms = series_terms
    radius = torch.tensor(series_radii(terms, series_tol), **f32)  # of 1..K terms
    # Without the series every pair is exact: dense [P, c, V] blocks in one reused buffer, kept
    # near cache size (each block is swept five times; from main memory that is the bottleneck).
    budget = min(max_block_bytes, SERIES_BLOCK_BYTES if terms else DENSE_BLOCK_BYTES)
    chunk = neuron_chunk or auto_neuron_chunk(n_prompts, vocab, d_ff, budget, terms, series_tile)
    chunk = min(chunk, d_ff)
    dense = None if terms else torch.empty(n_prompts * chunk * vocab, **f32)
    if terms:
        finite_rows = torch.isfinite(base_lse)  # [P, 1]: only these have a usable softmax w_p
        w = torch.where(finite_rows, (base - base_lse).exp(), 0.0)  # [P, V]
        w_mass = w.sum(dim=1, keepdim=True)  # [P, 1]: the 0th moment (1 up to rounding)
        # Zero rows up to a multiple of 16 prompts: the moment product's narrow side is then
        # a whole number of the GEMM kernel's tiles (on 2 CPU cores, 64 columns took 27 ms
        # where 60 took 31 ms).
        w = torch.cat([w, w.new_zeros(-n_prompts % 16, vocab)])  # [P rounded up, V]
        # sum_v w[p, v] A[v, j] through the d-dimensional side (A = W_U diag(g) W_l): the series'
        # first moment without a product over the vocabulary for every neuron.
        w_rows = ((w[:n_prompts] @ unembed) * norm_weight) @ weight  # [P, d_ff]

    weight_t = weight.t()  # [d_ff, d]: row j = neuron j's value vector
    for start in range(0, d_ff, chunk):
        stop = min(start + chunk, d_ff)
        if lens_product is not None:
            rows = lens_product[start:stop].to(**f32)  # [c, V] = A[:, start:stop]^T
        else:
            rows = (weight_t[start:stop] * norm_weight) @ unembed.t()
        row_range = None  # lens_range comes only with lens_product (checked above)
        if lens_range is not None:
            row_range = lens_range[0][start:stop].to(**f32), lens_range[1][start:stop].to(**f32)
        c = coef[:, start:stop]  # [P, c]
        if dense is not None:  # every pair exact
            block = dense[: c.numel() * vocab].view(n_prompts, -1, vocab)  # [P, c, V]
            lse = _lse_in_place(torch.addcmul(base[:, None, :], c[:, :, None], rows[None, :, :], out=block))
        else:
            lse = _series_then_exact_lse(base, base_lse, finite_rows, w, w_mass, c, rows, w_rows[:, start:stop], radius,
                                         max_block_bytes, series_tile, row_range)

        # Gather from the same A slice so the target logit matches the log-sum-exp's columns.
        target_logit = base_target + c * rows[:, targets].t()  # [P, c]
        log_p = _clamped_log_prob(target_logit, lse, log_lo, log_hi)
        scores[:, start:stop] = log_p - base_log_p

    # NaN/inf scores come from degenerate inputs (a zero final scale, overflowing activations);
    # they carry no ranking information, so they are neutral (0) like the authors' code.
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
