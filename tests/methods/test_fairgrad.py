"""FairGrad against α-fair utility maximisation solved on J, the residual of its equation ``Gw = w^(−1/α)``
and SciPy's least squares (the official solver) at tight tolerance, and its properties: Nash-MTL at
``α = 1``, homogeneity of degree ``(1−α)/(1+α)``, permutation equivariance, gains ``w_i^(−1/α) > 0``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.methods._positive_system import MAX_CANCELLATION, solve_power_system
from gradsurgery.methods.fairgrad import BIBTEX, check_fairgrad_options, fairgrad_weights
from gradsurgery.methods.nash_mtl import nash_mtl_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads
from .oracle_utility import (
    assert_matches_oracle,
    relative_residual,
    residual_tolerance,
    scipy_least_squares,
    scipy_minimize,
)

EPS = float(np.finfo(np.float64).eps)
ALPHAS = [0.5, 2.0, 5.0]
# (T, P): T = 1, 2, 3, 5, 8 with room in P, then more tasks than parameters (T > P).
SHAPES = [(1, 10), (2, 37), (3, 37), (5, 37), (8, 37), (8, 5), (12, 7)]


def _weights(J: torch.Tensor, **options) -> np.ndarray:
    return fairgrad_weights(J @ J.T, **options).numpy()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T, P", SHAPES, ids=[f"T{T}-P{P}" for T, P in SHAPES])
def test_fairgrad_matches_alpha_fair_allocation_on_J(kind: str, T: int, P: int, alpha: float) -> None:
    J = make_J(kind, T, P, seed=T)
    assert_matches_oracle(J.numpy(), _weights(J, alpha=alpha), alpha, cancellation_limit=MAX_CANCELLATION)


@pytest.mark.parametrize("T", [2, 3, 5, 8, 16, 32, 64])
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "parallel", "zero_row"])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_residual_and_scipy(kind: str, T: int, alpha: float) -> None:
    J = make_J(kind, T, 2 * T + 3, seed=T)
    G = (J @ J.T).numpy()
    w = _weights(J, alpha=alpha)
    tolerance = residual_tolerance(G, w, alpha, T)
    residual = relative_residual(G, w, alpha).max()
    assert residual <= tolerance
    # Never worse than SciPy at tight tolerances: the official code's least squares (from w = 1/T,
    # w ≥ 0) and an exact-Hessian trust region on the convex objective, up to what rounding allows.
    active = np.diag(G) > 0
    G_active = G[np.ix_(active, active)]
    for reference in (scipy_least_squares(G_active, alpha), scipy_minimize(G_active, alpha)):
        assert residual <= max(relative_residual(G_active, reference, alpha).max(), tolerance)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 3, 8, 13])
def test_fairgrad_with_alpha_one_is_nash_mtl(kind: str, T: int) -> None:
    # Gw = 1/w ⇔ w_i (Gw)_i = 1: the same system, solved the same way.
    G = (lambda J: J @ J.T)(make_J(kind, T, 11, seed=T))
    assert torch.equal(fairgrad_weights(G, alpha=1.0, max_iter=16), nash_mtl_weights(G))


def test_fairgrad_one_task_closed_form() -> None:
    J = make_J("conflicting", 1, 9)
    for alpha in (0.5, 1.0, 2.0, 7.0):
        w = _weights(J, alpha=alpha)
        assert math.isclose(w[0], J.norm().item() ** (-2 * alpha / (1 + alpha)), rel_tol=8 * EPS)


def test_fairgrad_small_alpha_tends_to_naive_summation() -> None:
    # α → 0: w_i = (g_iᵀd)^(−α) → 1 wherever the gains stay bounded away from 0 and ∞.
    J = make_J("agreeing", 5, 30, seed=2)
    for alpha, spread in ((0.1, 0.5), (0.01, 0.05), (0.001, 0.005)):
        assert np.abs(_weights(J, alpha=alpha) - 1).max() <= spread


@pytest.mark.parametrize("T", [2, 3, 8])
def test_fairgrad_no_update_improves_every_task_gives_zero_weights(T: int) -> None:
    J = make_J("antiparallel", T, 17)
    assert (_weights(J) == 0).all()
    assert (fairgrad_weights((J @ J.T).float()) == 0).all()


def test_fairgrad_zero_gradient_takes_no_part() -> None:
    J = make_J("conflicting", 5, 23, seed=1)
    J[2] = 0
    w = _weights(J)
    assert w[2] == 0
    others = [0, 1, 3, 4]
    np.testing.assert_allclose(w[others], _weights(J[others]), rtol=1e-13)
    assert (_weights(torch.zeros(4, 6, dtype=torch.float64)) == 0).all()


def test_fairgrad_official_scale_and_clip() -> None:
    J = make_J("conflicting", 4, 19, seed=3)
    w = _weights(J, alpha=2.0)
    np.testing.assert_allclose(_weights(J, alpha=2.0, scale="official"), 4 * w, rtol=0)
    official = _weights(J, alpha=2.0, scale="official", max_norm=1.0)
    d = official @ J.numpy()
    assert math.isclose(np.linalg.norm(d), min(1.0, 4 * np.linalg.norm(w @ J.numpy())), rel_tol=1e-13)
    np.testing.assert_allclose(official / np.linalg.norm(official), w / np.linalg.norm(w), rtol=1e-14)
    np.testing.assert_allclose(_weights(J, alpha=2.0, max_norm=1e6), w, rtol=0)  # never scaled up


def test_fairgrad_mean_reduction_divides_by_T() -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", 6, 14))
    torch.testing.assert_close(fairgrad_weights(G, reduction="mean"), fairgrad_weights(G) / 6, rtol=0, atol=0)


@given(
    T=st.integers(1, 12),
    kind=st.sampled_from(["conflicting", "agreeing", "parallel", "zero_row"]),
    seed=st.integers(0, 1000),
    log_scale=st.floats(-4, 4),
    alpha=st.sampled_from([0.3, 1.0, 2.0, 5.0]),
)
def test_fairgrad_update_is_homogeneous_of_degree_one_minus_alpha_over_one_plus_alpha(
    T: int, kind: str, seed: int, log_scale: float, alpha: float
) -> None:
    # w(s·G) = s^(−α/(1+α))·w(G), so d(k·J) = k^((1−α)/(1+α))·d(J) for k > 0.
    J = make_J(kind, T, 2 * T + 1, seed=seed)
    k = 10.0**log_scale
    w = _weights(J, alpha=alpha)
    np.testing.assert_allclose(_weights(k * J, alpha=alpha), w * k ** (-2 * alpha / (1 + alpha)), rtol=1e-11, atol=0)
    d = w @ J.numpy()
    d_scaled = _weights(k * J, alpha=alpha) @ (k * J).numpy()
    np.testing.assert_allclose(d_scaled, d * k ** ((1 - alpha) / (1 + alpha)), rtol=1e-10, atol=1e-12 * np.abs(d).max())


@given(T=st.integers(2, 12), kind=st.sampled_from(KINDS), seed=st.integers(0, 1000), alpha=st.sampled_from(ALPHAS))
def test_fairgrad_is_permutation_equivariant(T: int, kind: str, seed: int, alpha: float) -> None:
    J = make_J(kind, T, 2 * T + 1, seed=seed)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    expected = _weights(J, alpha=alpha)[order.numpy()]
    # The permuted problem sums in another order: a rounding the weights' spread amplifies (a
    # rank-deficient G gives weights 1e7 apart, and the small ones carry the large ones' rounding).
    positive = expected[expected > 0]
    spread = positive.max() / positive.min() if positive.size else 1.0
    rtol = max(1e-11, np.finfo(np.float64).eps * T * spread)
    np.testing.assert_allclose(_weights(J[order], alpha=alpha), expected, rtol=rtol, atol=0)


@given(
    T=st.integers(2, 16),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 1000),
    alpha=st.sampled_from(ALPHAS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fairgrad_gains_are_the_weights_to_the_minus_one_over_alpha(
    T: int, kind: str, seed: int, alpha: float, dtype: torch.dtype
) -> None:
    # g_iᵀd = w_i^(−1/α) > 0 on the Gram it was given (every task improves), or all weights 0.
    J = make_J(kind, T, 2 * T + 1, dtype=dtype, seed=seed)
    G = J @ J.T
    w = fairgrad_weights(G, alpha=alpha).numpy()
    G64 = G.double().numpy()
    G64 = (G64 + G64.T) / 2
    assert np.isfinite(w).all() and (w >= 0).all()
    if (w == 0).all():
        return
    active = np.diag(G64) > 0
    assert (w[active] > 0).all() and (w[~active] == 0).all()
    assert relative_residual(G64, w, alpha).max() <= residual_tolerance(G64, w, alpha, T)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 12])
def test_fairgrad_weights_do_not_read_values_back(T: int) -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", T, 20))
    with ForbidHostReads():
        fairgrad_weights(G)
        fairgrad_weights(G, alpha=0.5, scale="official", max_norm=1.0, max_iter=3, reduction="mean")


def test_fairgrad_solver_is_batched() -> None:
    Gs = torch.stack([(lambda J: J @ J.T)(make_J(kind, 6, 9, seed=4)) for kind in KINDS])
    batched = solve_power_system(Gs, 1 / 2.0, max_iter=20).weights
    for G, w in zip(Gs, batched):
        torch.testing.assert_close(w, fairgrad_weights(G, alpha=2.0), rtol=1e-13, atol=0)


def test_fairgrad_nan_gives_nan_weights() -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", 4, 9))
    for bad in (math.nan, math.inf):
        G_bad = G.clone()
        G_bad[0, 3] = bad
        assert fairgrad_weights(G_bad).isnan().all()


@pytest.mark.parametrize(
    "options, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -2.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": None}, "alpha"),
        ({"scale": "sum"}, "scale"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": math.inf}, "max_norm"),
        ({"max_iter": 0}, "max_iter"),
        ({"reduction": "none"}, "reduction"),
    ],
)
def test_fairgrad_bad_options_raise(options: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fairgrad_weights(torch.eye(3), **options)


def test_fairgrad_options_check_accepts_the_defaults_and_the_official_behaviour() -> None:
    check_fairgrad_options(2.0, "paper", None, 20)
    check_fairgrad_options(1, "official", 1.0, 1)
    assert "ban2024fair" in BIBTEX and "Fair Resource Allocation" in BIBTEX
