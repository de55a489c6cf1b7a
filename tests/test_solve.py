"""Each closed-form update against a brute-force float64 least-squares solution of its objective."""

import numpy as np
import pytest
import torch

from nmke_lightning.editing.solve import (
    nullspace_basis,
    solve_alphaedit,
    solve_masked_post,
    solve_masked_restricted,
    solve_memit,
)

D_FF, D, N_EDIT, N_PAST, N_TOK, RANK = 24, 6, 3, 4, 200, 10
THRESHOLD = 1e-6


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    # Preserved keys of rank 10 in a 24-dim key space: a 14-dim null space to write into.
    k0 = torch.randn(D_FF, RANK, generator=g, dtype=torch.float64) @ torch.randn(RANK, N_TOK, generator=g, dtype=torch.float64)
    cov = k0 @ k0.T / N_TOK
    keys = torch.randn(D_FF, N_EDIT, generator=g, dtype=torch.float64)
    resid = torch.randn(D, N_EDIT, generator=g, dtype=torch.float64)
    past_keys = torch.randn(D_FF, N_PAST, generator=g, dtype=torch.float64)
    mask = torch.zeros(D_FF, dtype=torch.bool)
    mask[torch.randperm(D_FF, generator=g)[:15]] = True
    return dict(k0=k0, cov=cov, keys=keys, resid=resid, past_keys=past_keys, mask=mask)


def null_basis_by_svd(k0: np.ndarray, n_tok: int, threshold: float) -> np.ndarray:
    """Independent route to the null space: left singular vectors of K0 with s^2 / N < threshold."""
    u, s, _ = np.linalg.svd(k0, full_matrices=True)
    s2 = np.zeros(u.shape[0])
    s2[: len(s)] = s**2 / n_tok
    return u[:, s2 < threshold]


def test_memit_equals_least_squares(problem):
    k, r, lam = problem["keys"], problem["resid"], 3.0
    # MEMIT's system needs a full-rank C0 (real corpora give one): full-rank preserved keys.
    k0 = torch.randn(D_FF, N_TOK, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = solve_memit(k, r, k0 @ k0.T / N_TOK, lam).numpy()
    # min ||K^T X - R^T||^2 + lam ||K0^T X||^2 / N  (= lam tr(X^T C0 X))
    a = np.vstack([k.numpy().T, np.sqrt(lam / N_TOK) * k0.numpy().T])
    b = np.vstack([r.numpy().T, np.zeros((N_TOK, D))])
    expected = np.linalg.lstsq(a, b, rcond=None)[0]
    assert rel(x, expected) < 1e-8


def test_alphaedit_equals_least_squares_and_paper_system(problem):
    k, r, kp, l2 = problem["keys"], problem["resid"], problem["past_keys"], 0.5
    basis = nullspace_basis(problem["cov"], THRESHOLD)
    u0 = null_basis_by_svd(problem["k0"].numpy(), N_TOK, THRESHOLD)
    assert basis.shape[1] == u0.shape[1] == D_FF - RANK
    x = solve_alphaedit(k, r, basis, kp @ kp.T, l2).numpy()
    # min over X = U0 Y of ||K^T X - R^T||^2 + ||Kp^T X||^2 + l2 ||X||^2
    a = np.vstack([k.numpy().T @ u0, kp.numpy().T @ u0, np.sqrt(l2) * np.eye(u0.shape[1])])
    b = np.vstack([r.numpy().T, np.zeros((N_PAST + u0.shape[1], D))])
    expected = u0 @ np.linalg.lstsq(a, b, rcond=None)[0]
    assert rel(x, expected) < 1e-8
    # The paper's full-size, non-symmetric system has the same solution.
    p = u0 @ u0.T
    kk = k.numpy() @ k.numpy().T + kp.numpy() @ kp.numpy().T
    paper = np.linalg.solve(p @ kk + l2 * np.eye(D_FF), p @ k.numpy() @ r.numpy().T)
    assert rel(x, paper) < 1e-8


def test_restricted_equals_least_squares_on_selected_rows(problem):
    k, r, kp, mask, l2 = problem["keys"], problem["resid"], problem["past_keys"], problem["mask"], 0.5
    x = solve_masked_restricted(k, r, problem["cov"], kp @ kp.T, mask, THRESHOLD, l2).numpy()
    rows = mask.numpy()
    u_s = null_basis_by_svd(problem["k0"].numpy()[rows], N_TOK, THRESHOLD)
    ks, kps = k.numpy()[rows], kp.numpy()[rows]
    a = np.vstack([ks.T @ u_s, kps.T @ u_s, np.sqrt(l2) * np.eye(u_s.shape[1])])
    b = np.vstack([r.numpy().T, np.zeros((N_PAST + u_s.shape[1], D))])
    expected = np.zeros((D_FF, D))
    expected[rows] = u_s @ np.linalg.lstsq(a, b, rcond=None)[0]
    assert rel(x, expected) < 1e-8
    assert np.all(x[~rows] == 0)


def test_post_zeroes_unselected_rows_of_alphaedit(problem):
    basis = nullspace_basis(problem["cov"], THRESHOLD)
    full = solve_alphaedit(problem["keys"], problem["resid"], basis, None, 0.5)
    post = solve_masked_post(full, problem["mask"])
    m = problem["mask"]
    assert torch.equal(post[m], full[m]) and torch.all(post[~m] == 0)


def leak(update: torch.Tensor, k0: torch.Tensor) -> float:
    """||delta W K0|| relative to ||delta W|| ||K0||: how much preserved outputs move."""
    return float((update.T @ k0).norm() / (update.norm() * k0.norm()))


def test_null_space_guarantee(problem):
    """AlphaEdit and restricted NMKE leave preserved keys untouched; post-masking does not."""
    k, r, cov, k0, mask = problem["keys"], problem["resid"], problem["cov"], problem["k0"], problem["mask"]
    kp = problem["past_keys"]
    basis = nullspace_basis(cov, THRESHOLD)
    alpha = solve_alphaedit(k, r, basis, kp @ kp.T, 0.5)
    restricted = solve_masked_restricted(k, r, cov, kp @ kp.T, mask, THRESHOLD, 0.5)
    post = solve_masked_post(alpha, mask)
    assert leak(alpha, k0) < 1e-12
    assert leak(restricted, k0) < 1e-12
    # post = diag(m) X: its leak is exactly what the dropped rows carried, X^T diag(1-m) K0.
    dropped = (alpha * (~mask).to(alpha.dtype).unsqueeze(1)).T @ k0
    assert torch.allclose(post.T @ k0, -dropped, atol=1e-10)
    # On this problem post-masking moves preserved outputs by 0.158 of the update's scale
    # (a random 15-of-24 mask), against 1.5e-16 for AlphaEdit: 15 orders of magnitude apart.
    assert 0.05 < leak(post, k0) < 1.0


def test_empty_null_space_gives_zero_update(problem):
    basis = nullspace_basis(torch.eye(D_FF, dtype=torch.float64), 1e-3)
    assert basis.shape == (D_FF, 0)
    x = solve_alphaedit(problem["keys"], problem["resid"], basis, None, 1.0)
    assert x.shape == (D_FF, D) and torch.all(x == 0)
