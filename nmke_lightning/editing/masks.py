"""The entropy-guided neuron mask of NMKE.

METHOD.md, "Neuron attribution and the entropy-guided mask".

From attribution scores ``S`` (``[P, D]``: prompts x FFN neurons of one layer) two neuron sets
are selected and, by default, united:

- knowledge-general ("resonance") neurons: those that raise many prompts' predictions, i.e. whose
  score is above the prompt's mean for many prompts;
- knowledge-specific ("burst") neurons: those with a large score on at least one prompt.

How many of each are kept adapts to how spread out the attribution is: a flat (high-entropy)
attribution means knowledge is distributed over many neurons, so the kept ratio rises towards
the upper bound; a peaked one keeps close to the lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK_KINDS = ("union", "general", "specific")


@dataclass
class MaskConfig:
    """How the per-layer neuron mask is chosen from attribution scores."""

    alpha: float = 30.0
    """Temperature of the per-prompt softmax over neuron scores whose entropy sets the general
    ratio: larger alpha sharpens the distribution and lowers the entropy."""
    general_bounds: tuple[float, float] = (0.3, 0.4)
    """(low, high) share of neurons kept as knowledge-general, reached at entropy 0 and 1."""
    general_power: float = 3.0
    """Exponent on the normalised entropy: rho_g = low + (high - low) * H_g ** general_power."""
    specific_bounds: tuple[float, float] = (0.3, 0.4)
    """(low, high) share of neurons kept as knowledge-specific, reached at entropy 0 and 1."""
    specific_power: float = 2.0
    """Exponent on the normalised entropy: rho_s = low + (high - low) * H_s ** specific_power."""
    kind: str = "union"
    """Which neurons the final mask keeps: "union" (NMKE), "general" or "specific" (ablations)."""
    zero_tol: float = 1e-12
    """When the total positive burst mass sum_j max(0, max_p S[p, j]) is below this, no neuron
    helps any prompt: rho_s falls back to the low bound and H_s is 0."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"mask.alpha must be a positive finite number, got {self.alpha}")
        for name in ("general_bounds", "specific_bounds"):
            bounds = tuple(getattr(self, name))
            if len(bounds) != 2:
                raise ValueError(f"mask.{name} must be a pair (low, high), got {bounds!r}")
            low, high = float(bounds[0]), float(bounds[1])
            if not (0.0 <= low <= high <= 1.0):
                raise ValueError(f"mask.{name} must satisfy 0 <= low <= high <= 1, got {bounds!r}")
            # YAML/CLI parsers hand lists over; keep a hashable, printable tuple of floats.
            setattr(self, name, (low, high))
        for name in ("general_power", "specific_power"):
            power = getattr(self, name)
            if not (math.isfinite(power) and power > 0):
                raise ValueError(f"mask.{name} must be a positive finite number, got {power}")
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask.kind must be one of {MASK_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.zero_tol) and self.zero_tol >= 0):
            raise ValueError(f"mask.zero_tol must be a finite number >= 0, got {self.zero_tol}")


@dataclass
class NeuronMask:
    """The mask of one layer plus what it was built from (for logging and entropy tracking)."""

    mask: torch.Tensor
    """[D] bool: neurons the edit may change (per MaskConfig.kind)."""
    general: torch.Tensor
    """[D] bool: knowledge-general (resonance) neurons."""
    specific: torch.Tensor
    """[D] bool: knowledge-specific (burst) neurons."""
    general_ratio: float
    """rho_g, the target share of general neurons."""
    specific_ratio: float
    """rho_s, the target share of specific neurons."""
    general_entropy: float
    """H_g in [0, 1]: mean normalised entropy of the per-prompt score softmax."""
    specific_entropy: float
    """H_s in [0, 1]: normalised entropy of the burst distribution."""
    kept_share: float
    """Share of neurons in `mask` (about 0.55-0.6 in the paper with the default bounds)."""


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float64 ``[P, D]`` (P, D >= 1).

    float64 because an entropy over ~10^4 neurons sums many tiny terms and is then raised to a
    power and tracked across steps; float32 rounding would show up in those curves.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_prompts, d_ff], got shape {tuple(scores.shape)}")
    if scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(
            f"scores must have at least one prompt and one neuron, got {tuple(scores.shape)}"
        )
    return scores.to(torch.float64)


def _check_ratio(rho: float, name: str) -> None:
    if not (0.0 <= rho <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {rho}")


def _normalised(entropy: torch.Tensor, n_neurons: int) -> float:
    """Entropy divided by its maximum log D, clipped to [0, 1] against rounding.

    A single neuron has neither spread nor a meaningful maximum (log 1 = 0): entropy 0.
    """
    if n_neurons < 2:
        return 0.0
    return min(1.0, max(0.0, entropy.item() / math.log(n_neurons)))


def _ratio(entropy: float, bounds: tuple[float, float], power: float) -> float:
    low, high = bounds
    return low + (high - low) * entropy**power


def general_ratio(
    scores: torch.Tensor,  # [P, D]
    alpha: float,
    bounds: tuple[float, float],
    power: float,
) -> tuple[float, float]:
    """``(rho_g, H_g)``: H_g is the mean over prompts of the entropy of
    ``softmax(alpha * (S_p - max S_p))`` over neurons, divided by log D.

    Subtracting the row max does not change the softmax; it only keeps ``exp`` in range.
    """
    s = _check_scores(scores)
    logits = alpha * (s - s.amax(dim=1, keepdim=True))  # [P, D], <= 0
    probs = torch.softmax(logits, dim=1)
    # xlogy gives 0 * log 0 = 0 for neurons whose probability underflows.
    entropy = -torch.special.xlogy(probs, probs).sum(dim=1)  # [P]
    h_g = _normalised(entropy.mean(), s.shape[1])
    return _ratio(h_g, bounds, power), h_g


def specific_ratio(
    scores: torch.Tensor,  # [P, D]
    bounds: tuple[float, float],
    power: float,
    zero_tol: float = 1e-12,
) -> tuple[float, float]:
    """``(rho_s, H_s)``: H_s is the entropy of ``b / sum b`` with ``b_j = max(0, max_p S[p, j])``,
    divided by log D. With no positive mass (``sum b < zero_tol``) the distribution is undefined:
    ``(low, 0.0)``."""
    s = _check_scores(scores)
    burst = s.amax(dim=0).clamp(min=0.0)  # [D]
    total = burst.sum()
    if total.item() < zero_tol:
        return float(bounds[0]), 0.0
    probs = burst / total
    h_s = _normalised(-torch.special.xlogy(probs, probs).sum(), s.shape[1])
    return _ratio(h_s, bounds, power), h_s


def _keep_top_share(values: torch.Tensor, rho: float) -> torch.Tensor:
    """``values >= quantile(values, 1 - rho)`` (linear interpolation): at least a share rho kept,
    and every neuron tied with the threshold value kept too."""
    threshold = torch.quantile(values.to(torch.float64), 1.0 - rho)
    return values.to(torch.float64) >= threshold


def general_counts(scores: torch.Tensor) -> torch.Tensor:  # [P, D] -> [D] long
    """``c_j``: number of prompts whose z-scored score for neuron j is positive.

    ``z > 0`` iff ``S[p, j]`` exceeds the row mean (the std only rescales), so we compare with the
    mean directly. A constant row has no z-score (std 0) and counts for no neuron; we test
    constancy explicitly because the float mean of equal values can round below them.
    """
    s = _check_scores(scores)
    above = s > s.mean(dim=1, keepdim=True)  # [P, D]
    constant = s.amax(dim=1) == s.amin(dim=1)  # [P]
    above &= ~constant[:, None]
    return above.sum(dim=0)


def general_mask(scores: torch.Tensor, rho_g: float) -> torch.Tensor:  # [P, D] -> [D] bool
    """Knowledge-general neurons: keep ``c_j >= quantile(c, 1 - rho_g)`` (see `general_counts`).

    The counts are small integers, so many neurons tie at the threshold; all of them are kept,
    which is why the kept share can exceed rho_g. With all-zero (uninformative) scores every
    count is 0 and every neuron is kept.
    """
    _check_ratio(rho_g, "rho_g")
    return _keep_top_share(general_counts(scores), rho_g)


def specific_mask(scores: torch.Tensor, rho_s: float) -> torch.Tensor:  # [P, D] -> [D] bool
    """Knowledge-specific neurons: keep ``m_j >= quantile(m, 1 - rho_s)``.

    ``m_j = max_p S[p, j]``: a neuron counts if it strongly supports at least one prompt.
    """
    _check_ratio(rho_s, "rho_s")
    return _keep_top_share(_check_scores(scores).amax(dim=0), rho_s)


def neuron_mask(scores: torch.Tensor, config: MaskConfig) -> NeuronMask:
    """Both neuron sets, their ratios and entropies, and the mask selected by ``config.kind``.

    Both sets are always computed so that the ablations log the same diagnostics as NMKE.
    """
    rho_g, h_g = general_ratio(scores, config.alpha, config.general_bounds, config.general_power)
    rho_s, h_s = specific_ratio(
        scores, config.specific_bounds, config.specific_power, config.zero_tol
    )
    general = general_mask(scores, rho_g)
    specific = specific_mask(scores, rho_s)
    mask = {"union": general | specific, "general": general, "specific": specific}[config.kind]
    return NeuronMask(
        mask=mask,
        general=general,
        specific=specific,
        general_ratio=rho_g,
        specific_ratio=rho_s,
        general_entropy=h_g,
        specific_entropy=h_s,
        kept_share=mask.to(torch.float64).mean().item(),
    )
