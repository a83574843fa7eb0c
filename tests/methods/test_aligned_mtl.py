"""Aligned-MTL against the paper's algorithm written on the gradients (SVD of J), and its defining
property: the aligned gradient matrix has condition number 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery.functional as F
from gradsurgery.methods.aligned_mtl import SCALE_MODES, aligned_mtl_weights, balance_transformation

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads

EPS = float(np.finfo(np.float64).eps)


def aligned_mtl_vector(J: torch.Tensor, scale_mode: str = "min") -> np.ndarray:
    """Senushkin et al. 2023, Algorithm 1 on ``J`` (fp64): ``J = U Σ Vᵀ`` truncated to its numerical rank
    ``r``; the aligned gradients are the rows of ``s·U_r V_rᵀ`` with ``s`` the smallest kept singular
    value (``"min"``), the square root of the lower median (``"median"``) or of the mean (``"rmse"``) of
    the kept ``σ²``; the update is their sum."""
    J = J.double().numpy()
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    r = int((S > max(J.shape) * EPS * S[0]).sum()) if S[0] > 0 else 0
    if r == 0:
        return J.sum(axis=0)
    squares = S[:r] ** 2
    s = np.sqrt({"min": squares[-1], "median": np.sort(squares)[(r - 1) // 2], "rmse": squares.mean()}[scale_mode])
    return (s * U[:, :r] @ Vt[:r]).sum(axis=0)


def _close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    scale = max(1.0, float(expected_t.abs().max()))
    assert float((actual.double() - expected_t).abs().max()) <= rtol * scale


def _gram_condition(J: torch.Tensor) -> float:
    """cond(G) on its kept eigenvalues: the eigendecomposition of G resolves λ_min to ~ε·λ_max."""
    S = torch.linalg.svdvals(J.double())
    kept = S[S > max(J.shape) * EPS * S[0]] if S[0] > 0 else S[:1]
    return float((kept[0] / kept[-1]) ** 2) if S[0] > 0 else 1.0


@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("T", "P"), [(1, 17), (2, 17), (3, 17), (5, 17), (8, 17), (16, 40), (8, 5), (12, 4)])
def test_aligned_mtl_matches_the_paper_algorithm(scale_mode: str, kind: str, T: int, P: int) -> None:
    J = make_J(kind, T, P, seed=T)
    d = F.aggregate(J, lambda G: aligned_mtl_weights(G, scale_mode=scale_mode), backend="torch")
    _close(d, aligned_mtl_vector(J, scale_mode), 64 * T * EPS * _gram_condition(J))


@given(
    T=st.integers(1, 8),
    P=st.integers(2, 20),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(KINDS),
    scale_mode=st.sampled_from(SCALE_MODES),
)
def test_aligned_gradients_have_condition_number_one(T: int, P: int, seed: int, kind: str, scale_mode: str) -> None:
    J = make_J(kind, T, P, seed=seed)
    aligned = balance_transformation(J @ J.T, scale_mode=scale_mode) @ J
    S = torch.linalg.svdvals(J)
    rank = int((S > max(J.shape) * EPS * S[0]).sum())
    aligned_S = torch.linalg.svdvals(aligned)
    # The first `rank` singular values are all s; the rest vanish. Both to ε·cond(G) relative.
    tol = 64 * T * EPS * _gram_condition(J) * float(S[0])
    assert float(aligned_S[rank:].sum()) <= tol * max(1, len(aligned_S) - rank)
    if rank == 0:  # every gradient zero: B = I, nothing to align
        return
    assert float(aligned_S[:rank].max() - aligned_S[:rank].min()) <= tol
    if scale_mode == "min":
        assert abs(float(aligned_S[0] - S[rank - 1])) <= tol


def test_aligned_gradients_are_orthogonal_with_equal_norms() -> None:
    J = make_J("agreeing", 5, 30, seed=1)
    aligned = balance_transformation(J @ J.T) @ J
    s = torch.linalg.svdvals(J)[-1]
    gram = aligned @ aligned.T
    tol = 64 * 5 * EPS * _gram_condition(J) * float(s) ** 2
    assert torch.allclose(gram, s**2 * torch.eye(5, dtype=torch.float64), rtol=0, atol=tol)


def test_aligned_mtl_repeated_singular_values_do_not_depend_on_the_eigenbasis() -> None:
    # Rows 0, 1 orthogonal and of equal norm: a repeated eigenvalue of G, whose eigenvectors eigh may
    # return in any rotation; B only uses the eigenspace.
    basis = torch.linalg.qr(torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    J = torch.stack([basis[0], basis[1], 2 * basis[2] + 0.5 * basis[0], 3 * basis[3]])
    for scale_mode in SCALE_MODES:
        d = F.aggregate(J, lambda G: aligned_mtl_weights(G, scale_mode=scale_mode), backend="torch")
        _close(d, aligned_mtl_vector(J, scale_mode), 1e-12)
    G = 4.0 * torch.eye(3, dtype=torch.float64)  # all eigenvalues equal: B = I whatever the basis
    assert torch.allclose(aligned_mtl_weights(G), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-15)


def test_aligned_mtl_median_is_the_lower_one() -> None:
    # Kept eigenvalues 1, 4, 9, 16 (orthogonal gradients of norms 1..4): torch.median gives 4.
    G = torch.diag(torch.tensor([16.0, 1.0, 9.0, 4.0], dtype=torch.float64))
    w = aligned_mtl_weights(G, scale_mode="median")
    assert torch.allclose(w, 2.0 / G.diagonal().sqrt(), rtol=1e-15, atol=0)
    rmse = aligned_mtl_weights(G, scale_mode="rmse")
    assert torch.allclose(rmse, 7.5**0.5 / G.diagonal().sqrt(), rtol=1e-15, atol=0)


def test_aligned_mtl_zero_gradients() -> None:
    J = make_J("conflicting", 5, 17, seed=2)
    J[[1, 3]] = 0
    w = aligned_mtl_weights(J @ J.T)
    assert torch.equal(w[[1, 3]], torch.zeros(2, dtype=torch.float64))
    _close(w[[0, 2, 4]], aligned_mtl_weights(J[[0, 2, 4]] @ J[[0, 2, 4]].T).numpy(), 1e-12)
    for scale_mode in SCALE_MODES:  # rank 0: B = I
        w = aligned_mtl_weights(torch.zeros(3, 3), scale_mode=scale_mode)
        assert torch.equal(w, torch.ones(3, dtype=torch.float64))


@given(kind=st.sampled_from(KINDS), T=st.integers(1, 8), seed=st.integers(0, 1000), log_scale=st.floats(-20, 20))
def test_aligned_mtl_weights_are_invariant_to_the_scale_of_g(kind: str, T: int, seed: int, log_scale: float) -> None:
    # w(s·G) = w(G) (B is): the update is positively homogeneous.
    J = make_J(kind, T, 13, seed=seed)
    G = J @ J.T
    w = aligned_mtl_weights(G)
    scaled = aligned_mtl_weights(G * 10.0**log_scale)
    assert (scaled - w).abs().max() <= 64 * T * EPS * _gram_condition(J) * max(1.0, float(w.abs().max()))


@given(
    kind=st.sampled_from(KINDS), T=st.integers(2, 8), seed=st.integers(0, 1000), scale_mode=st.sampled_from(SCALE_MODES)
)
def test_aligned_mtl_weights_follow_a_permutation_of_the_tasks(kind: str, T: int, seed: int, scale_mode: str) -> None:
    J = make_J(kind, T, 13, seed=seed)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = aligned_mtl_weights(J @ J.T, scale_mode=scale_mode)
    permuted = aligned_mtl_weights(J[order] @ J[order].T, scale_mode=scale_mode)
    assert (permuted - w[order]).abs().max() <= 64 * T * EPS * _gram_condition(J) * max(1.0, float(w.abs().max()))


def test_aligned_mtl_float32_gram_uses_float32_rank() -> None:
    # A rank-2 Gram in fp32: its zero eigenvalues come out at ~1e-7·λ_max, above fp64's tolerance but
    # below fp32's, so they are dropped and the update matches the rank-2 algorithm.
    J = make_J("rank_deficient", 5, 30, seed=3)
    d = F.aggregate(J.float(), aligned_mtl_weights, backend="torch")
    expected = aligned_mtl_vector(J)
    assert float((d.double() - torch.as_tensor(expected)).abs().max()) <= 1e-4 * float(np.abs(expected).max())


def test_aligned_mtl_mean_reduction_divides_by_t() -> None:
    J = make_J("conflicting", 5, 17)
    G = J @ J.T
    assert torch.equal(aligned_mtl_weights(G, reduction="mean"), aligned_mtl_weights(G) / 5)


def test_aligned_mtl_nan_gram_gives_nan_weights() -> None:
    G = torch.eye(3)
    G[0, 2] = float("nan")
    assert torch.isnan(aligned_mtl_weights(G)).all()
    assert torch.isnan(balance_transformation(G)).all()


def test_aligned_mtl_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="scale_mode.*'max'"):
        aligned_mtl_weights(torch.eye(2), scale_mode="max")
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        aligned_mtl_weights(torch.eye(2), reduction="avg")


@pytest.mark.parametrize("T", [2, 3, 8, 12])
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_aligned_mtl_does_not_read_values_back(T: int, scale_mode: str) -> None:
    J = make_J("rank_deficient", T, 20)
    G = J @ J.T
    with ForbidHostReads():
        aligned_mtl_weights(G, scale_mode=scale_mode)
