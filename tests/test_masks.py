"""Entropy-guided NMKE masks on hand-made score matrices and against plain-loop computations."""

from __future__ import annotations

import math

import pytest
import torch

from nmke_lightning.editing.masks import (
    MaskConfig,
    NeuronMask,
    general_counts,
    general_mask,
    general_ratio,
    neuron_mask,
    specific_mask,
    specific_ratio,
)

LN2, LN3, LN4, LN6 = math.log(2), math.log(3), math.log(4), math.log(6)

# ---- hand-made matrices ------------------------------------------------------------------------

# General counts: row means are 1, 1, 1, 1 and 0.1.
GENERAL_S = torch.tensor(
    [
        [3.0, 1.0, 0.0, 0.0, 0.0, 2.0],  # > mean 1: neurons 0, 5
        [2.0, 2.0, 0.0, 0.0, 0.0, 2.0],  # > mean 1: neurons 0, 1, 5
        [1.0, 0.0, 1.0, 0.0, 0.0, 4.0],  # > mean 1: neuron 5 (1 is not > 1)
        [0.0, 0.0, 0.0, 6.0, 0.0, 0.0],  # > mean 1: neuron 3
        # Constant row: no z-score, counts for nobody. (Its float64 mean is 0.09999999999999999,
        # so a naive "S > mean" would count all six neurons.)
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ]
)
GENERAL_COUNTS = [2, 1, 0, 1, 0, 3]  # sorted: 0 0 1 1 2 3


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        # quantile(c, 1 - rho), linear interpolation at position (1 - rho) * 5 of the sorted list:
        (0.5, [1, 1, 0, 1, 0, 1]),  # pos 2.5 -> 1:    c >= 1, four neurons tie at 1 or above
        (0.25, [1, 0, 0, 0, 0, 1]),  # pos 3.75 -> 1.75: c >= 1.75
        (0.1, [0, 0, 0, 0, 0, 1]),  # pos 4.5 -> 2.5:  c >= 2.5
        (0.0, [0, 0, 0, 0, 0, 1]),  # pos 5 -> max 3
        (1.0, [1, 1, 1, 1, 1, 1]),  # pos 0 -> min 0:  everything
    ],
)
def test_general_mask_hand_made(rho: float, expected: list[int]) -> None:
    assert general_counts(GENERAL_S).tolist() == GENERAL_COUNTS
    assert general_mask(GENERAL_S, rho).tolist() == [bool(e) for e in expected]


# Specific: m_j = max_p S[p, j] = [0.5, 0.25, 0.25, 0.0, 0.25, -0.1]; sorted -0.1 0 .25 .25 .25 .5.
SPECIFIC_S = torch.tensor(
    [
        [0.5, -1.0, 0.25, 0.0, 0.0, -0.5],
        [0.0, 0.25, 0.0, -2.0, 0.25, -0.25],
        [-0.25, 0.25, 0.25, -1.0, 0.0, -0.1],
    ]
)


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.5, [1, 1, 1, 0, 1, 0]),  # pos 2.5 -> .25: the three tied .25 are all kept (4 of 6)
        (0.25, [1, 1, 1, 0, 1, 0]),  # pos 3.75 between .25 and .25 -> .25
        (0.1, [1, 0, 0, 0, 0, 0]),  # pos 4.5 -> .375
        (0.0, [1, 0, 0, 0, 0, 0]),  # max
        (1.0, [1, 1, 1, 1, 1, 1]),  # min
    ],
)
def test_specific_mask_hand_made(rho: float, expected: list[int]) -> None:
    assert specific_mask(SPECIFIC_S, rho).tolist() == [bool(e) for e in expected]


def test_specific_ratio_hand_made() -> None:
    # b = [.5, .25, .25, 0, .25, 0], sum 1.25 -> q = [.4, .2, .2, 0, .2, 0] (0 log 0 = 0).
    # H = -(.4 ln .4 + 3 * .2 ln .2) / ln 6 = 1.3321790 / 1.7917595 = 0.7435033.
    h = -(0.4 * math.log(0.4) + 0.6 * math.log(0.2)) / LN6
    assert h == pytest.approx(0.7435033, abs=1e-7)
    rho, got_h = specific_ratio(SPECIFIC_S, (0.3, 0.4), 2.0)
    assert got_h == pytest.approx(h, abs=1e-12)
    assert rho == pytest.approx(0.3 + 0.1 * h**2, abs=1e-12)  # 0.3552797


def test_general_ratio_hand_made() -> None:
    # alpha = 1, D = 4. Softmax of each row (the row max shift changes nothing):
    #   row 0 uniform                  -> H = ln 4
    #   row 1 [ln 3, 0, 0, 0]          -> [3, 1, 1, 1] / 6 -> H = .5 ln 2 + .5 ln 6
    #   row 2 [ln 2, ln 2, 0, 0] + 7   -> [2, 2, 1, 1] / 6 -> H = 2/3 ln 3 + 1/3 ln 6
    s = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [LN3, 0.0, 0.0, 0.0],
            [LN2 + 7.0, LN2 + 7.0, 7.0, 7.0],
        ],
        dtype=torch.float64,
    )
    entropies = [LN4, 0.5 * LN2 + 0.5 * LN6, 2 / 3 * LN3 + 1 / 3 * LN6]
    h = sum(entropies) / 3 / LN4  # (1.386294 + 1.242453 + 1.329661) / 3 / 1.386294 = 0.951796
    rho, got_h = general_ratio(s, alpha=1.0, bounds=(0.3, 0.4), power=3.0)
    assert got_h == pytest.approx(h, abs=1e-12)
    assert rho == pytest.approx(0.3 + 0.1 * h**3, abs=1e-12)


def test_general_ratio_extremes() -> None:
    # One neuron far ahead in every row: the softmax is one-hot (entropy 0) -> low bound.
    peaked = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    assert general_ratio(peaked, 30.0, (0.3, 0.4), 3.0) == pytest.approx((0.3, 0.0), abs=1e-12)
    # Flat rows: uniform softmax (entropy log D) -> high bound.
    flat = torch.full((2, 5), -1.5)
    assert general_ratio(flat, 30.0, (0.3, 0.4), 3.0) == pytest.approx((0.4, 1.0), abs=1e-12)


def test_specific_ratio_all_nonpositive_is_low_bound() -> None:
    s = torch.tensor([[-1.0, 0.0, -0.5], [-2.0, -3.0, 0.0]])
    assert specific_ratio(s, (0.3, 0.4), 2.0) == (0.3, 0.0)
    assert specific_ratio(torch.zeros(4, 7), (0.25, 0.5), 2.0) == (0.25, 0.0)
    # Below the tolerance counts as zero too.
    assert specific_ratio(torch.full((1, 3), 1e-14), (0.3, 0.4), 2.0, zero_tol=1e-12) == (0.3, 0.0)


def test_neuron_mask_kinds_hand_made() -> None:
    # SPECIFIC_S: rho_s = 0.3552797 -> pos 3.2236 between .25 and .25 -> [1, 1, 1, 0, 1, 0].
    # General: row means -0.125, -0.2917, -0.1417 -> above-mean sets {0, 2, 3, 4},
    # {0, 1, 2, 4, 5}, {1, 2, 4, 5} -> c = [2, 2, 3, 1, 3, 2], sorted 1 2 2 2 3 3.
    # H_g = 0.2601 (alpha 30 makes each row's softmax peaked; the loop test checks the value)
    # -> rho_g = 0.3 + 0.1 * 0.2601^3 = 0.30176 -> pos 3.4912 between 2 and 3 -> c >= 2.49.
    assert general_counts(SPECIFIC_S).tolist() == [2, 2, 3, 1, 3, 2]
    union = neuron_mask(SPECIFIC_S, MaskConfig())
    assert isinstance(union, NeuronMask)
    assert union.specific.tolist() == [True, True, True, False, True, False]
    assert union.general.tolist() == [False, False, True, False, True, False]
    assert union.mask.tolist() == [True, True, True, False, True, False]
    assert union.kept_share == pytest.approx(4 / 6)
    assert union.general_entropy == pytest.approx(0.2601, abs=1e-4)
    assert union.general_ratio == pytest.approx(0.3 + 0.1 * union.general_entropy**3, abs=1e-12)
    assert union.specific_ratio == pytest.approx(0.3552797, abs=1e-7)

    # Two sets that differ: at rho 0.1 general keeps neuron 5 alone, specific neuron 3 alone.
    s = GENERAL_S
    cfg = dict(general_bounds=(0.1, 0.1), specific_bounds=(0.1, 0.1))
    # m = [3, 2, 1, 6, 0.1, 4] -> pos 4.5 between 4 and 6 -> 5 -> neuron 3.
    general = neuron_mask(s, MaskConfig(kind="general", **cfg))
    specific = neuron_mask(s, MaskConfig(kind="specific", **cfg))
    union = neuron_mask(s, MaskConfig(kind="union", **cfg))
    assert general.mask.tolist() == [False, False, False, False, False, True]
    assert specific.mask.tolist() == [False, False, False, True, False, False]
    assert union.mask.tolist() == [False, False, False, True, False, True]
    shares = (general.kept_share, specific.kept_share, union.kept_share)
    assert shares == pytest.approx((1 / 6, 1 / 6, 2 / 6))


def test_all_zero_scores_keep_everything() -> None:
    # No information (e.g. every score was non-finite and zeroed): every neuron ties at the
    # quantile, so nothing is masked out and the edit falls back to the unmasked update.
    result = neuron_mask(torch.zeros(3, 8), MaskConfig())
    assert result.mask.all() and result.kept_share == 1.0
    assert result.specific_ratio == 0.3 and result.specific_entropy == 0.0


# ---- random matrices against plain loops -------------------------------------------------------


def loop_quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def loop_reference(s: list[list[float]], alpha: float, rho_g: float, rho_s: float):
    n_prompts, d = len(s), len(s[0])
    # H_g: mean over prompts of the softmax entropy.
    h_rows = []
    for row in s:
        top = max(row)
        w = [math.exp(alpha * (x - top)) for x in row]
        z = sum(w)
        h_rows.append(-sum((x / z) * math.log(x / z) for x in w if x > 0))
    h_g = sum(h_rows) / n_prompts / math.log(d)
    # H_s: entropy of the positive part of the column maxima.
    col_max = [max(s[p][j] for p in range(n_prompts)) for j in range(d)]
    b = [max(0.0, m) for m in col_max]
    total = sum(b)
    h_s = -sum((x / total) * math.log(x / total) for x in b if x > 0) / math.log(d)
    # Masks: counts of positive z-scores (std computed explicitly), then quantile thresholds.
    counts = [0] * d
    for row in s:
        mean = sum(row) / d
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (d - 1))
        for j, x in enumerate(row):
            if std > 0 and (x - mean) / std > 0:
                counts[j] += 1
    c_thr = loop_quantile([float(c) for c in counts], 1 - rho_g)
    m_thr = loop_quantile(col_max, 1 - rho_s)
    return h_g, h_s, counts, [c >= c_thr for c in counts], [m >= m_thr for m in col_max]


@pytest.mark.parametrize("seed", range(6))
def test_random_against_plain_loops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_prompts, d = 4 + seed, 30 + 7 * seed
    s = torch.randn(n_prompts, d, generator=g, dtype=torch.float64) * 0.2 - 0.05
    alpha = [30.0, 5.0, 1.0][seed % 3]
    rho_g = 0.3 + 0.4 * torch.rand(1, generator=g, dtype=torch.float64).item()
    rho_s = 0.45  # (1 - rho_s) * (d - 1) is never an integer here: thresholds fall between values
    h_g, h_s, counts, want_general, want_specific = loop_reference(s.tolist(), alpha, rho_g, rho_s)

    got_rho_g, got_h_g = general_ratio(s, alpha, (0.3, 0.4), 3.0)
    got_rho_s, got_h_s = specific_ratio(s, (0.3, 0.4), 2.0)
    assert got_h_g == pytest.approx(h_g, abs=1e-10)
    assert got_h_s == pytest.approx(h_s, abs=1e-10)
    assert got_rho_g == pytest.approx(0.3 + 0.1 * h_g**3, abs=1e-10)
    assert got_rho_s == pytest.approx(0.3 + 0.1 * h_s**2, abs=1e-10)
    assert general_counts(s).tolist() == counts
    assert general_mask(s, rho_g).tolist() == want_general
    assert specific_mask(s, rho_s).tolist() == want_specific
    # float32 scores give the same entropies to float32 precision.
    assert general_ratio(s.float(), alpha, (0.3, 0.4), 3.0)[1] == pytest.approx(h_g, abs=1e-5)


# ---- configuration -----------------------------------------------------------------------------


def test_config_defaults_and_list_bounds() -> None:
    cfg = MaskConfig(general_bounds=[0.2, 0.5])  # a YAML list becomes a tuple
    assert cfg.general_bounds == (0.2, 0.5) and cfg.specific_bounds == (0.3, 0.4)
    assert (cfg.alpha, cfg.general_power, cfg.specific_power, cfg.kind) == (30.0, 3.0, 2.0, "union")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=0.0), "mask.alpha"),
        (dict(alpha=float("nan")), "mask.alpha"),
        (dict(general_bounds=(0.5, 0.4)), "mask.general_bounds must satisfy 0 <= low <= high <= 1"),
        (dict(specific_bounds=(-0.1, 0.4)), "mask.specific_bounds must satisfy 0 <= low"),
        (dict(specific_bounds=(0.3, 1.5)), "mask.specific_bounds"),
        (dict(general_bounds=(0.3,)), "mask.general_bounds must be a pair"),
        (dict(general_power=0.0), "mask.general_power"),
        (dict(specific_power=-1.0), "mask.specific_power"),
        (dict(kind="intersection"), "mask.kind"),
        (dict(zero_tol=-1.0), "mask.zero_tol"),
    ],
)
def test_config_validation_names_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rho_g"):
        general_mask(GENERAL_S, 1.5)
    with pytest.raises(ValueError, match="rho_s"):
        specific_mask(GENERAL_S, -0.1)
    with pytest.raises(ValueError, match="scores"):
        general_ratio(torch.zeros(6), 30.0, (0.3, 0.4), 3.0)
