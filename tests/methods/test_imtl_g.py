"""IMTL-G against the paper's closed form written on the gradients, and its defining property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery.functional as F
from gradsurgery.methods.imtl_g import imtl_g_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads

EPS = float(np.finfo(np.float64).eps)


def _paper_alpha(rows: np.ndarray) -> np.ndarray:
    """Liu et al. 2021: ``α_{2:T} = g_1ᵀUᵀ(DUᵀ)⁻¹``, ``α_1 = 1 − Σ α_{2:T}`` with the rows of ``D`` the
    ``g_1 − g_t`` and those of ``U`` the ``u_1 − u_t`` (``u = g/‖g‖``), ``t = 2..T``."""
    units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    D = rows[:1] - rows[1:]
    U = units[:1] - units[1:]
    tail = np.linalg.solve((D @ U.T).T, U @ rows[0])
    return np.concatenate([[1.0 - tail.sum()], tail])


def imtl_g_vector(J: torch.Tensor, *, regularization: float = 0.0) -> np.ndarray:
    """Sum-scale weights from the paper's formula on the rows of ``J`` (fp64). Zero rows take no part
    (weight 1; the others ``K·α`` for the ``K`` non-zero rows). ``regularization = ε > 0`` gives each
    gradient a private orthogonal component of relative length ``√ε`` first: the library's answer for
    linearly dependent gradients is the limit ``ε → 0``."""
    J = J.double().numpy()
    norms = np.linalg.norm(J, axis=1)
    present = norms > 0
    w = np.ones(J.shape[0])
    K = int(present.sum())
    if K == 0:
        return w
    rows = J[present]
    if regularization > 0:
        rows = np.hstack([rows, np.sqrt(regularization) * np.diag(norms[present])])
    w[present] = K * (np.ones(1) if K == 1 else _paper_alpha(rows))
    return w


def dependent_rule_vector(J: torch.Tensor) -> np.ndarray:
    """The documented rule for linearly dependent gradients, from the SVD of the unit-gradient matrix
    ``Û = W S Zᵀ`` (so ``C = ÛÛᵀ = W S² Wᵀ``): ``β = P₀1`` (``P₀ = W₀W₀ᵀ``, the left null space) when that is
    not negligible, else ``β = C⁺1``; ``α = N⁻¹β / Σ N⁻¹β``; zero rows as in :func:`imtl_g_vector`."""
    J = J.double().numpy()
    norms = np.linalg.norm(J, axis=1)
    present = norms > 0
    w = np.ones(J.shape[0])
    K = int(present.sum())
    if K == 0:
        return w
    units = J[present] / norms[present, None]
    W, S, _ = np.linalg.svd(units, full_matrices=True)
    S = np.concatenate([S, np.zeros(K - len(S))])
    null = S <= max(units.shape) * EPS * S[0]  # NumPy's rank rule
    ones = np.ones(K)
    null_part = W[:, null] @ (W[:, null].T @ ones)
    if np.linalg.norm(null_part) > 1e-6:
        beta = null_part
    else:
        beta = W[:, ~null] @ ((W[:, ~null].T @ ones) / S[~null] ** 2)
    alpha = beta / norms[present]
    w[present] = K * alpha / alpha.sum()
    return w


def _close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    scale = max(1.0, float(expected_t.abs().max()))
    assert float((actual.double() - expected_t).abs().max()) <= rtol * scale


def _condition(J: torch.Tensor) -> float:
    """cond(C) of the cosine matrix on the directions it keeps (its non-zero eigenvalues)."""
    units = J[J.norm(dim=1) > 0]
    units = units / units.norm(dim=1, keepdim=True)
    S = torch.linalg.svdvals(units) if len(units) else torch.ones(1, dtype=torch.float64)
    kept = S[S > max(units.shape) * EPS * S[0]]
    return float((kept[0] / kept[-1]) ** 2)


@pytest.mark.parametrize("kind", ["conflicting", "agreeing"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 16])
def test_imtl_g_matches_the_paper_closed_form(kind: str, T: int) -> None:
    J = make_J(kind, T, 2 * T + 7, seed=T)
    w = imtl_g_weights(J @ J.T)
    # Both solve the same T × T system in fp64: errors ~ ε·cond(C) (C the cosine matrix) each.
    _close(w, imtl_g_vector(J), 64 * T * EPS * _condition(J))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("T", "P"), [(2, 17), (3, 17), (5, 17), (8, 17), (8, 5), (12, 4)])
def test_imtl_g_matches_its_rule_on_every_structure(kind: str, T: int, P: int) -> None:
    J = make_J(kind, T, P, seed=1)
    w = imtl_g_weights(J @ J.T)
    # Linearly independent gradients (P ≥ T, generic kinds) take the other branch of the rule, C⁻¹1: the
    # same expression. The SVD and the eigendecomposition differ by rounding amplified by cond(C) on
    # the directions kept.
    _close(w, dependent_rule_vector(J), 64 * T * EPS * _condition(J))


@pytest.mark.parametrize(
    ("kind", "T", "P"),
    [(k, T, 17) for k in ("parallel", "antiparallel", "zero_row", "rank_deficient") for T in (2, 3, 5, 8)]
    + [(k, T, P) for k in ("conflicting", "agreeing") for T, P in ((8, 5), (12, 4))],
)
def test_imtl_g_dependent_gradients_are_the_limit_of_the_paper_formula(kind: str, T: int, P: int) -> None:
    J = make_J(kind, T, P, seed=0)
    w = imtl_g_weights(J @ J.T)

    def extrapolated(epsilon: float) -> np.ndarray:  # Richardson: the O(ε) term cancels
        return 2 * imtl_g_vector(J, regularization=epsilon) - imtl_g_vector(J, regularization=2 * epsilon)

    # What is left is c·ε² (so halving ε changes the value by ¾ of it: the difference estimates the
    # error) plus the regularised solve's rounding, ~eps/ε ≈ 2e-10 times the problem's constants.
    limit = extrapolated(1e-6)
    scale = max(1.0, float(np.abs(limit).max()))
    error_estimate = float(np.abs(limit - extrapolated(5e-7)).max()) / scale
    _close(w, limit, 10 * error_estimate + 1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_imtl_g_two_tasks_weigh_by_the_other_norm(kind: str) -> None:
    # T = 2: d·u_1 = d·u_2 with α_1 + α_2 = 1 gives α_1 = n_2/(n_1 + n_2) for any two non-zero gradients
    # (parallel and antiparallel included: the limit of nearly (anti)parallel ones).
    J = make_J(kind, 2, 11, seed=5)
    n = J.norm(dim=1)
    w = imtl_g_weights(J @ J.T)
    expected = 2 * n.flip(0) / n.sum() if (n > 0).all() else torch.ones(2, dtype=torch.float64)
    _close(w, expected.numpy(), 1e-14)


@given(T=st.integers(2, 8), seed=st.integers(0, 10_000), kind=st.sampled_from(["conflicting", "agreeing"]))
def test_imtl_g_projections_on_unit_gradients_are_equal(T: int, seed: int, kind: str) -> None:
    J = make_J(kind, T, 2 * T + 3, seed=seed)
    d = F.aggregate(J, imtl_g_weights, backend="torch")
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    # dᵀu_t = (Cβ)_t/‖·‖ is computed to ~ε·cond(C) relative to the projections' size.
    spread = projections.max() - projections.min()
    assert spread <= 64 * T * EPS * _condition(J) * projections.abs().max()


@given(kind=st.sampled_from(KINDS), T=st.integers(1, 9), seed=st.integers(0, 1000))
def test_imtl_g_weights_sum_to_t(kind: str, T: int, seed: int) -> None:
    J = make_J(kind, T, 13, seed=seed)
    w = imtl_g_weights(J @ J.T)
    assert torch.isfinite(w).all()
    assert abs(float(w.sum()) - T) <= 1e-9 * float(w.abs().sum())
    assert torch.allclose(imtl_g_weights(J @ J.T, reduction="mean"), w / T, rtol=0, atol=0)


@given(
    kind=st.sampled_from(KINDS),
    T=st.integers(1, 8),
    seed=st.integers(0, 1000),
    log_scale=st.floats(-20, 20),
)
def test_imtl_g_weights_are_invariant_to_the_scale_of_g(kind: str, T: int, seed: int, log_scale: float) -> None:
    # w(s·G) = w(G): the update is positively homogeneous (d(s·J) = s·d(J)).
    J = make_J(kind, T, 13, seed=seed)
    G = J @ J.T
    w = imtl_g_weights(G)
    scaled = imtl_g_weights(G * 10.0**log_scale)
    assert (scaled - w).abs().max() <= 1e-9 * max(1.0, float(w.abs().max()))


@given(kind=st.sampled_from(KINDS), T=st.integers(2, 8), seed=st.integers(0, 1000))
def test_imtl_g_weights_follow_a_permutation_of_the_tasks(kind: str, T: int, seed: int) -> None:
    J = make_J(kind, T, 13, seed=seed)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = imtl_g_weights(J @ J.T)
    permuted = imtl_g_weights(J[order] @ J[order].T)
    assert (permuted - w[order]).abs().max() <= 1e-9 * max(1.0, float(w.abs().max()))


def test_imtl_g_zero_gradients_are_left_out() -> None:
    J = make_J("conflicting", 5, 17, seed=2)
    J[[1, 3]] = 0
    w = imtl_g_weights(J @ J.T)
    rest = imtl_g_weights(J[[0, 2, 4]] @ J[[0, 2, 4]].T)
    assert torch.equal(w[[1, 3]], torch.ones(2, dtype=torch.float64))
    _close(w[[0, 2, 4]], rest.numpy(), 1e-12)
    # One non-zero gradient left: naive summation.
    J[[0, 2]] = 0
    assert torch.allclose(imtl_g_weights(J @ J.T), torch.ones(5, dtype=torch.float64), rtol=1e-15, atol=0)
    assert torch.equal(imtl_g_weights(torch.zeros(4, 4)), torch.ones(4, dtype=torch.float64))


def test_imtl_g_more_tasks_than_directions_give_a_zero_update() -> None:
    J = make_J("conflicting", 9, 4, seed=3)
    d = F.aggregate(J, imtl_g_weights, backend="torch")
    assert float(d.norm()) <= 1e-9 * float(J.norm(dim=1).max())


def test_imtl_g_float32_gram_is_close_to_float64() -> None:
    J = make_J("conflicting", 6, 40, seed=4)
    w64 = imtl_g_weights(J @ J.T)
    w32 = imtl_g_weights((J @ J.T).float())
    # The fp32 Gram's entries carry ~1e-7 relative rounding; cond(C) amplifies it.
    assert (w32 - w64).abs().max() <= 1e3 * torch.finfo(torch.float32).eps * _condition(J) * w64.abs().max()


def test_imtl_g_nan_gram_gives_nan_weights() -> None:
    G = torch.eye(3)
    G[0, 1] = float("nan")
    assert torch.isnan(imtl_g_weights(G)).all()
    assert torch.isnan(imtl_g_weights(torch.full((2, 2), float("inf")))).all()


def test_imtl_g_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        imtl_g_weights(torch.eye(2), reduction="avg")
    with pytest.raises(ValueError, match="square"):
        imtl_g_weights(torch.ones(2, 3))


@pytest.mark.parametrize("T", [2, 3, 8, 12])
@pytest.mark.parametrize("kind", ["conflicting", "zero_row"])
def test_imtl_g_does_not_read_values_back(T: int, kind: str) -> None:
    J = make_J(kind, T, 20)
    G = J @ J.T
    with ForbidHostReads():
        imtl_g_weights(G)
