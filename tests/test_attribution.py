"""The vectorised NMKE attribution against a plain per-prompt, per-neuron loop of its formula."""

from __future__ import annotations

import math

import pytest
import torch

from nmke_lightning.editing import attribution
from nmke_lightning.editing.attribution import (
    LensProductCache,
    _sketched_svd,
    attribution_scores,
    auto_neuron_chunk,
    series_plan,
    series_radii,
    series_radius,
)

P, D, D_FF, V = 5, 8, 20, 50


def reference_scores(
    resid, keys, final_scale, weight, norm_weight, unembed, unembed_bias, targets,
    amplify=30.0, prob_floor=1e-8,
) -> torch.Tensor:
    """METHOD.md's formula, one (prompt, neuron) at a time, in float64, building each lens input."""
    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.float64)

    resid, keys, final_scale, weight = f64(resid), f64(keys), f64(final_scale), f64(weight)
    norm_weight, unembed, unembed_bias = f64(norm_weight), f64(unembed), f64(unembed_bias)

    def log_prob(x: torch.Tensor, p: int) -> torch.Tensor:
        logits = unembed @ (norm_weight * x) / final_scale[p]
        if unembed_bias is not None:
            logits = logits + unembed_bias
        prob = torch.softmax(logits, dim=0)[targets[p]]
        return torch.log(prob.clamp(prob_floor, 1 - prob_floor))

    n_prompts, d_ff = keys.shape
    out = torch.zeros(n_prompts, d_ff, dtype=torch.float64)
    for p in range(n_prompts):
        base = log_prob(resid[p], p)
        for j in range(d_ff):
            score = log_prob(resid[p] + amplify * keys[p, j] * weight[:, j], p) - base
            out[p, j] = score if torch.isfinite(score) else 0.0
    return out


def random_inputs(seed: int, bias: bool, weight_scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        resid=torch.randn(P, D, generator=g),
        keys=torch.randn(P, D_FF, generator=g),
        final_scale=torch.rand(P, generator=g) + 0.5,
        weight=torch.randn(D, D_FF, generator=g) * weight_scale,
        norm_weight=torch.rand(D, generator=g) + 0.5,
        unembed=torch.randn(V, D, generator=g),
        unembed_bias=torch.randn(V, generator=g) if bias else None,
    )
    # y_p = the current top-1 token, as in the method (the residual stands in for the final layer).
    lens_in = inputs["resid"] * inputs["norm_weight"] / inputs["final_scale"][:, None]
    base = lens_in @ inputs["unembed"].t()
    if bias:
        base = base + inputs["unembed_bias"]
    inputs["targets"] = base.argmax(dim=1)
    return inputs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 20, 64])
def test_matches_plain_loop(bias: bool, chunk: int | None) -> None:
    inputs = random_inputs(seed=0, bias=bias)
    got = attribution_scores(**inputs, neuron_chunk=chunk)
    assert got.shape == (P, D_FF) and got.dtype == torch.float32
    want = reference_scores(**inputs)
    # Some scores are well away from zero, some are clamped: both regimes are present.
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_matches_plain_loop_random_targets_and_amplify() -> None:
    inputs = random_inputs(seed=1, bias=True)
    inputs["targets"] = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(2))
    got = attribution_scores(**inputs, amplify=7.5, prob_floor=1e-4, neuron_chunk=6)
    want = reference_scores(**inputs, amplify=7.5, prob_floor=1e-4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_saturated_probabilities_are_clamped() -> None:
    # Lens with g = 1, sigma = 1, r = 0: base logits are all 0, so P(y = 0) = 1/3.
    # Neuron 0 pushes token 0 to logit 30: P = 1 - 2e-13 -> clamped to 1 - 1e-8.
    # Neuron 1 pushes token 0 to logit -300: P underflows to 0 -> clamped to 1e-8.
    # Neuron 2 writes nothing: score 0.
    unembed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # [V=3, d=2]
    weight = torch.tensor([[1.0, -10.0, 0.0], [0.0, 0.0, 0.0]])  # [d=2, d_ff=3]
    inputs = dict(
        resid=torch.zeros(1, 2),
        keys=torch.ones(1, 3),
        final_scale=torch.ones(1),
        weight=weight,
        norm_weight=torch.ones(2),
        unembed=unembed,
        unembed_bias=None,
        targets=torch.tensor([0]),
    )
    got = attribution_scores(**inputs, amplify=30.0, neuron_chunk=2)
    expected = torch.tensor([[math.log1p(-1e-8) + math.log(3), math.log(1e-8) + math.log(3), 0.0]])
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), reference_scores(**inputs), atol=1e-6, rtol=0)


def test_non_finite_scores_become_zero() -> None:
    inputs = random_inputs(seed=3, bias=True)
    inputs["final_scale"][1] = 0.0  # the whole lens of prompt 1 is inf/NaN
    inputs["keys"][2, 4] = float("inf")  # +-inf logits: softmax is NaN
    inputs["keys"][3, 7] = float("nan")
    got = attribution_scores(**inputs, neuron_chunk=3)
    assert torch.isfinite(got).all()
    assert (got[1] == 0).all() and got[2, 4] == 0 and got[3, 7] == 0
    torch.testing.assert_close(got.double(), reference_scores(**inputs), atol=1e-5, rtol=0)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    inputs = random_inputs(seed=4, bias=True)
    def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    half = {k: cast(v, torch.bfloat16) for k, v in inputs.items()}
    upcast = {k: cast(v, torch.float32) for k, v in half.items()}
    got = attribution_scores(**half, neuron_chunk=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, attribution_scores(**upcast, neuron_chunk=4), atol=0, rtol=0)


def test_no_autograd_graph_and_device() -> None:
    inputs = random_inputs(seed=5, bias=False)
    inputs["weight"].requires_grad_(True)
    got = attribution_scores(**inputs)
    assert not got.requires_grad and got.device == inputs["resid"].device


def test_auto_chunk_from_memory_budget() -> None:
    # Exact: 60 prompts x 49152 tokens x 4 bytes = 11.25 MiB per neuron; 128 MiB // that = 11.
    assert auto_neuron_chunk(60, 49152, 1536) == 11
    # Series: 10 polynomials x one 1024-token tile x 4 bytes = 40 KiB per neuron, whatever the prompts.
    assert auto_neuron_chunk(60, 49152, 1536, 16 * 2**20, terms=10) == 409
    assert auto_neuron_chunk(6, 49152, 1536, 16 * 2**20, terms=10) == 409
    assert auto_neuron_chunk(6, 49152, 1536, 16 * 2**20, terms=10, tile=4096) == 102
    assert auto_neuron_chunk(6, 500, 1536, 16 * 2**20, terms=10, tile=4096) == 838  # the tile is at most V
    assert auto_neuron_chunk(60, 49152, 1536, max_block_bytes=1) == 1
    assert auto_neuron_chunk(2, 10, 7, max_block_bytes=2**30) == 7
    assert auto_neuron_chunk(0, 10, 7) == 7


def test_shape_and_option_errors() -> None:
    inputs = random_inputs(seed=6, bias=True)
    with pytest.raises(ValueError, match="weight"):
        attribution_scores(**{**inputs, "weight": inputs["weight"].t()})
    with pytest.raises(ValueError, match="unembed_bias"):
        attribution_scores(**{**inputs, "unembed_bias": torch.zeros(V + 1)})
    with pytest.raises(ValueError, match="targets"):
        attribution_scores(**{**inputs, "targets": inputs["targets"].float()})
    with pytest.raises(ValueError, match="neuron_chunk"):
        attribution_scores(**inputs, neuron_chunk=0)
    with pytest.raises(ValueError, match="series_tile"):
        attribution_scores(**inputs, series_tile=0)
    with pytest.raises(ValueError, match="prob_floor"):
        attribution_scores(**inputs, prob_floor=0.0)


def lens_radius(inputs: dict, amplify: float = 30.0) -> torch.Tensor:
    """rho[p, j] = |s a_pj / sigma_p| * half-range of column j of W_U diag(g) W_l, in float64."""
    f64 = {k: v.double() for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    product = (f64["unembed"] * f64["norm_weight"]) @ f64["weight"]  # [V, d_ff]
    half = (product.max(0).values - product.min(0).values) / 2
    return (amplify * f64["keys"] / f64["final_scale"][:, None]).abs() * half


@pytest.mark.parametrize("terms", [4, 10])
@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("tile", [1024, 7, 1])  # one tile for the 50 tokens; 8 uneven tiles; one per token
def test_series_matches_plain_loop_in_both_regimes(terms: int, chunk: int | None, tile: int) -> None:
    # Small neuron values put most (prompt, neuron) pairs inside the series radius; the rest
    # take the exact path, so both run in one call.
    inputs = random_inputs(seed=7, bias=True, weight_scale=0.003)
    rho = lens_radius(inputs)
    inside = (rho <= series_radius(terms, 1e-6)).double().mean()
    assert 0.2 < inside < 1.0, inside
    got = attribution_scores(**inputs, neuron_chunk=chunk, series_terms=terms, series_tile=tile)
    want = reference_scores(**inputs)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tol", [1e-6, 1e-3])
def test_neurons_of_different_radii_take_their_own_terms_within_the_tolerance(tol: float) -> None:
    # Neuron values from 1e-4 to 3 times a base scale: in one chunk, some neurons take one
    # term, some most of them, some pairs none (exact path).
    inputs = random_inputs(seed=11, bias=False, weight_scale=0.03)
    inputs["weight"] *= torch.logspace(-4, 0.5, D_FF)
    rho = lens_radius(inputs)
    need, use_series = series_plan(rho.float(), torch.tensor(series_radii(10, tol)), torch.ones(P, 1, dtype=torch.bool))
    assert need.min() <= 1 and need.max() >= 6 and (~use_series).any() and use_series.float().mean() > 0.5
    got = attribution_scores(**inputs, series_terms=10, series_tol=tol, series_tile=16)
    want = reference_scores(**inputs)
    torch.testing.assert_close(got.double(), want, atol=tol + 1e-5, rtol=0)


def test_series_plan_takes_the_cheapest_number_of_terms() -> None:
    g = torch.Generator().manual_seed(3)
    rho = torch.rand(6, 40, generator=g) * 3  # [P, c]
    rho[2, 5], rho[0, 7] = float("nan"), float("inf")
    finite_rows = torch.tensor([True, True, True, False, True, True])[:, None]
    radii = [0.1, 0.3, 0.6, 1.0, 1.5, 2.0]
    for pair_terms in (0.5, 2.0, 10.0):
        need, use_series = series_plan(rho, torch.tensor(radii), finite_rows, pair_terms)
        for j in range(rho.shape[1]):
            # Brute force: every k, counting by hand the pairs its radius leaves exact.
            costs = []
            for k in range(len(radii) + 1):
                limit = radii[k - 1] if k else -1.0
                covered = [bool(finite_rows[p, 0]) and math.isfinite(rho[p, j]) and float(rho[p, j]) <= limit
                           for p in range(rho.shape[0])]
                costs.append((k + pair_terms * covered.count(False), k, covered))
            _, k, covered = min(costs, key=lambda x: (x[0], x[1]))
            assert int(need[j]) == k
            assert use_series[:, j].tolist() == covered


def test_series_off_and_on_agree_on_saturation_and_non_finite_inputs() -> None:
    inputs = random_inputs(seed=8, bias=False, weight_scale=0.01)
    inputs["final_scale"][1] = 0.0
    inputs["keys"][2, 4] = float("nan")
    inputs["keys"][3, 7] = 1e6  # far outside the radius: exact path, probability saturates
    want = reference_scores(**inputs)
    for terms in (0, 6, 12):
        got = attribution_scores(**inputs, series_terms=terms, neuron_chunk=5)
        assert got[1].eq(0).all() and got[2, 4] == 0
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def bessel_i_by_integral(k: int, x: float, n: int = 4096) -> float:
    """I_k(x) = (1/pi) * integral over [0, pi] of exp(x cos t) cos(k t) dt, by the trapezoid rule
    (exponentially accurate for this periodic integrand)."""
    t = torch.linspace(0, math.pi, n + 1, dtype=torch.float64)
    f = torch.exp(x * torch.cos(t)) * torch.cos(k * t)
    return float((f.sum() - (f[0] + f[-1]) / 2) * (math.pi / n) / math.pi)


def test_series_radius_meets_its_bound() -> None:
    # The truncation bound of the module docstring, from Bessel functions computed another way:
    # r = 2 e^rho sum_{k > K} I_k(rho), bound = r / (1 - r), and the radius is where it reaches tol.
    assert series_radius(0, 1e-6) == -1.0
    for terms, tol in [(4, 1e-6), (10, 1e-6), (10, 1e-9), (16, 1e-3)]:
        rho = series_radius(terms, tol)
        r = 2 * math.exp(rho) * sum(bessel_i_by_integral(k, rho) for k in range(terms + 1, terms + 40))
        bound = r / (1 - r)
        assert bound <= tol * (1 + 1e-4) and bound > 0.99 * tol  # the integral is good to ~1e-6 relative here
    assert series_radius(12, 1e-6) > series_radius(10, 1e-6) > series_radius(8, 1e-6)
    assert series_radii(3, 1e-6) == (series_radius(1, 1e-6), series_radius(2, 1e-6), series_radius(3, 1e-6))


def test_precomputed_lens_product_gives_the_same_scores() -> None:
    inputs = random_inputs(seed=9, bias=True, weight_scale=0.01)
    product = (inputs["weight"].t() @ (inputs["unembed"] * inputs["norm_weight"]).t()).contiguous()
    got = attribution_scores(**inputs, lens_product=product, neuron_chunk=6)
    torch.testing.assert_close(got, attribution_scores(**inputs, neuron_chunk=6), atol=1e-6, rtol=0)
    lens_range = product.amin(dim=1), product.amax(dim=1)
    with_range = attribution_scores(**inputs, lens_product=product, lens_range=lens_range, neuron_chunk=6)
    torch.testing.assert_close(with_range, got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="lens_product"):
        attribution_scores(**inputs, lens_product=product.t())
    with pytest.raises(ValueError, match="lens_range"):
        attribution_scores(**inputs, lens_range=lens_range)
    with pytest.raises(ValueError, match="lens_range"):
        attribution_scores(**inputs, lens_product=product, lens_range=(lens_range[0][:-1], lens_range[1]))


def test_exact_pairs_run_in_reused_blocks() -> None:
    # 800 bytes hold 4 rows of the 50-token vocabulary: the exact pairs run 4 at a time, the last
    # block short, in the same two buffers.
    inputs = random_inputs(seed=7, bias=True, weight_scale=0.003)
    _, use_series = series_plan(lens_radius(inputs).float(), torch.tensor(series_radii(4, 1e-6)),
                                torch.ones(P, 1, dtype=torch.bool))
    exact = int((~use_series).sum())
    assert exact > 8 and exact % 4 != 0, exact
    got = attribution_scores(**inputs, series_terms=4, neuron_chunk=D_FF, max_block_bytes=800)
    torch.testing.assert_close(got.double(), reference_scores(**inputs), atol=1e-5, rtol=0)


def fresh_product(weight, norm_weight, unembed) -> torch.Tensor:
    return (weight.double().t() @ (unembed.double() * norm_weight.double()).t())


@pytest.mark.parametrize("d,d_ff", [(D, D_FF), (D_FF, D)])  # the change's SVD from either side
@pytest.mark.parametrize("block_rows", [None, 3])  # updated in one block, or in blocks of 3 rows (last one short)
def test_lens_cache_follows_low_rank_edits_and_rebuilds_otherwise(d: int, d_ff: int, block_rows, monkeypatch) -> None:
    if block_rows:
        monkeypatch.setattr(attribution, "ROW_BLOCK_BYTES", block_rows * V * 4)
    g = torch.Generator().manual_seed(10)
    weight = torch.randn(d, d_ff, generator=g)
    norm_weight = torch.rand(d, generator=g) + 0.5
    unembed = torch.randn(V, d, generator=g)
    cache = LensProductCache(refresh_every=3)
    first = cache.get("l", weight, norm_weight, unembed)
    assert cache.builds == 1 and first.shape == (d_ff, V)
    assert cache.get("l", weight, norm_weight, unembed) is first and cache.builds == 1  # unchanged
    for step in range(3):  # rank-1 edits: updated in place, no rebuild
        weight += torch.randn(d, 1, generator=g) @ torch.randn(1, d_ff, generator=g)
        got = cache.get("l", weight, norm_weight, unembed)
        torch.testing.assert_close(got.double(), fresh_product(weight, norm_weight, unembed), atol=1e-4, rtol=1e-5)
        lo, hi = cache.row_range("l")  # exactly the updated product's, row by row
        assert torch.equal(lo, got.amin(dim=1)) and torch.equal(hi, got.amax(dim=1))
    assert cache.builds == 1 and cache.low_rank_updates == 3
    weight += torch.randn(d, 1, generator=g) @ torch.randn(1, d_ff, generator=g)
    cache.get("l", weight, norm_weight, unembed)  # a fourth in a row: refresh
    assert cache.builds == 2
    weight += torch.randn(d, d_ff, generator=g)  # full rank: rebuild
    got = cache.get("l", weight, norm_weight, unembed)
    assert cache.builds == 3
    assert torch.equal(cache.row_range("l")[0], got.amin(dim=1)) and torch.equal(cache.row_range("l")[1], got.amax(dim=1))
    torch.testing.assert_close(got.double(), fresh_product(weight, norm_weight, unembed), atol=1e-4, rtol=1e-5)
    unembed.mul_(2.0)  # an in-place change of the unembedding is noticed
    got = cache.get("l", weight, norm_weight, unembed)
    assert cache.builds == 4
    torch.testing.assert_close(got.double(), fresh_product(weight, norm_weight, unembed), atol=1e-4, rtol=1e-5)


def test_lens_cache_respects_its_budget() -> None:
    weight, norm_weight, unembed = torch.randn(D, D_FF), torch.ones(D), torch.randn(V, D)
    one_layer = D_FF * V * 4
    cache = LensProductCache(max_bytes=one_layer)
    assert cache.get(1, weight, norm_weight, unembed) is not None
    assert cache.get(2, weight, norm_weight, unembed) is None  # would exceed the budget
    assert cache.get(1, weight, norm_weight, unembed) is not None
    assert LensProductCache(max_bytes=0).get(1, weight, norm_weight, unembed) is None


@pytest.mark.parametrize("d,d_ff", [(48, 128), (128, 48)])
def test_lens_cache_sees_the_rank_of_an_edit_through_float32_rounding(d: int, d_ff: int) -> None:
    # Realistic magnitudes: weights ~0.05, edits ~1e-3 of rank 2. W + delta is rounded to float32,
    # so the difference the cache sees is the edit plus full-rank rounding noise.
    g = torch.Generator().manual_seed(11)
    vocab = 300
    weight = torch.randn(d, d_ff, generator=g) * 0.05
    norm_weight, unembed = torch.rand(d, generator=g) + 0.5, torch.randn(vocab, d, generator=g)
    cache = LensProductCache(refresh_every=1000)
    cache.get(0, weight, norm_weight, unembed)
    for _ in range(20):
        weight += (torch.randn(d, 2, generator=g) @ torch.randn(2, d_ff, generator=g)) * 1e-3
        got = cache.get(0, weight, norm_weight, unembed)
    assert cache.builds == 1 and cache.low_rank_updates == 20 and cache.sketched_updates == 20
    want = fresh_product(weight, norm_weight, unembed)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("sketch_columns", [0, 3])
@pytest.mark.parametrize("d,d_ff", [(48, 128), (128, 48)])  # the Gram matrix of either side
def test_lens_cache_falls_back_to_the_gram_matrix_beyond_the_sketch(sketch_columns: int, d: int, d_ff: int) -> None:
    # Rank-5 edits: more than 3 sketch columns see (or no sketch at all), within the 12 that
    # max_rank_fraction allows for the shorter side 48: the Gram path must take them, as accurately.
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(d, d_ff, generator=g) * 0.05
    norm_weight, unembed = torch.rand(d, generator=g) + 0.5, torch.randn(300, d, generator=g)
    cache = LensProductCache(refresh_every=1000, sketch_columns=sketch_columns)
    cache.get(0, weight, norm_weight, unembed)
    for _ in range(5):
        weight += (torch.randn(d, 5, generator=g) @ torch.randn(5, d_ff, generator=g)) * 1e-3
        got = cache.get(0, weight, norm_weight, unembed)
    assert cache.builds == 1 and cache.low_rank_updates == 5 and cache.sketched_updates == 0
    want = fresh_product(weight, norm_weight, unembed)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_sketched_svd_reconstructs_within_the_noise_or_declines() -> None:
    g = torch.Generator().manual_seed(13)
    low = torch.randn(60, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 90, generator=g, dtype=torch.float64)
    noise = torch.randn(60, 90, generator=g, dtype=torch.float64) * 1e-9
    change = low + noise
    u, s, vh = _sketched_svd(change, noise=1e-6, columns=10)
    assert len(s) == 4  # the noise (Frobenius ~7e-8) is dropped, the four real components kept
    assert float(((u * s) @ vh - change).norm()) <= 1e-6
    torch.testing.assert_close(u.t() @ u, torch.eye(4, dtype=torch.float64))
    want = torch.linalg.svdvals(low)[:4]
    torch.testing.assert_close(s, want, rtol=1e-7, atol=0)
    assert _sketched_svd(change, noise=1e-6, columns=3) is None  # rank 4 does not fit 3 columns
    assert _sketched_svd(change, noise=1e3, columns=3)[1].numel() == 0  # all of it is "noise"


def test_bessel_functions_match_their_integral_form() -> None:
    # I_k(x) = (1/pi) int_0^pi exp(x cos t) cos(k t) dt; the trapezoid rule on this periodic
    # integrand is accurate to float64 rounding with a few hundred points.
    z = torch.linspace(-6.0, 6.0, 41, dtype=torch.float64).view(1, 41, 1).expand(2, 41, 3)  # any shape
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    k = torch.arange(11, dtype=torch.float64)
    integrand = torch.exp(z.reshape(-1)[:, None] * theta.cos())[None] * torch.cos(k[:, None] * theta)[:, None]
    want = (torch.trapezoid(integrand, theta, dim=-1) / math.pi).view(11, *z.shape)
    got = attribution._bessel_i(z, 10)
    assert got.shape == (11, 2, 41, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
