"""Closed-form updates of one edited matrix (METHOD.md, "One edit step", item 3).

Shapes: keys ``K`` are ``[d_ff, n]``, residuals ``R`` are ``[d, n]``, the update ``X`` is
``[d_ff, d]`` (``delta W = X^T``). All solves run in float64: the systems mix a covariance of
~1e5 tokens with a handful of edit keys and lose digits quickly in float32.
"""

from __future__ import annotations

import torch


def nullspace_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal basis ``U0`` ``[d_ff, k]`` of the eigenvectors of `cov` with eigenvalue < threshold.

    ``P = U0 U0^T`` is AlphaEdit's projector. `cov` is symmetric PSD, so `eigh` is exact and
    cheaper than the SVD the reference code uses.
    """
    cov = cov.to(torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    return evecs[:, evals < threshold].contiguous()


def solve_memit(
    keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, cov_weight: float
) -> torch.Tensor:
    """MEMIT: ``argmin_X ||K^T X - R^T||^2 + cov_weight * tr(X^T C0 X)``.

    Normal equations ``(cov_weight * C0 + K K^T) X = K R^T``.
    """
    k = keys.to(torch.float64)
    lhs = cov_weight * cov.to(torch.float64) + k @ k.T
    return _spd_solve((lhs + lhs.T) / 2, k @ resid.to(torch.float64).T)


def _spd_solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Cholesky solve of a symmetric PSD system; minimum-norm least squares if it is singular
    (a covariance of fewer tokens than neurons with no Tikhonov term)."""
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(lhs.device)


def solve_alphaedit(
    keys: torch.Tensor,
    resid: torch.Tensor,
    basis: torch.Tensor,
    past_cov: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """AlphaEdit in the reduced basis ``X = U0 Y``.

    Minimises ``||K^T X - R^T||^2 + tr(X^T Cp X) + l2 ||X||^2`` over ``X in range(U0)``:
    ``(U0^T (K K^T + Cp) U0 + l2 I) Y = U0^T K R^T``, symmetric positive definite, so a Cholesky
    solve. Its solution equals the full-size system ``(P (K K^T + Cp) + l2 I) X = P K R^T`` of
    the paper (components outside range(P) are forced to zero by the ``l2 I`` term).
    """
    u0 = basis.to(torch.float64)
    if u0.shape[1] == 0:
        return torch.zeros(keys.shape[0], resid.shape[0], dtype=torch.float64, device=keys.device)
    kr = u0.T @ keys.to(torch.float64)  # [k, n]
    lhs = kr @ kr.T
    if past_cov is not None:
        lhs = lhs + u0.T @ past_cov.to(torch.float64) @ u0
    lhs = lhs + l2 * torch.eye(lhs.shape[0], dtype=torch.float64, device=lhs.device)
    lhs = (lhs + lhs.T) / 2
    rhs = kr @ resid.to(torch.float64).T  # [k, d]
    return u0 @ _spd_solve(lhs, rhs)


def solve_masked_post(update: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NMKE as the authors' code does it: the AlphaEdit solution with unselected rows zeroed.

    Not the optimum of the masked problem and not in the null space of ``C0`` any more.
    """
    return update * mask.to(update.dtype).unsqueeze(1)


def solve_masked_restricted(
    keys: torch.Tensor,
    resid: torch.Tensor,
    cov: torch.Tensor,
    past_cov: torch.Tensor | None,
    mask: torch.Tensor,
    threshold: float,
    l2: float,
) -> torch.Tensor:
    """NMKE, exact: only the selected rows S of X are unknowns.

    ``X^T K0 = X_S^T K0_S``, so preserved keys stay untouched iff ``X_S`` lies in the null space of
    ``C0[S, S]``; with that subspace's basis ``U_S`` this is the AlphaEdit problem on S.
    """
    rows = mask.nonzero().squeeze(1)
    update = torch.zeros(keys.shape[0], resid.shape[0], dtype=torch.float64, device=keys.device)
    if rows.numel() == 0:
        return update
    cov_s = cov.to(torch.float64)[rows][:, rows]
    past_s = None if past_cov is None else past_cov.to(torch.float64)[rows][:, rows]
    basis_s = nullspace_basis(cov_s, threshold)
    update[rows] = solve_alphaedit(keys[rows], resid, basis_s, past_s, l2)
    return update
