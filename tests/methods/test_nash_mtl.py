"""Nash-MTL against the Nash bargaining problem solved on J, its optimality certificate and SciPy, and its
properties (scale and per-task invariance, permutation equivariance, gains ``g_iᵀd = 1/α_i > 0``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.methods import _positive_system
from gradsurgery.methods.nash_mtl import BIBTEX, check_nash_mtl_options, nash_mtl_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads
from .oracle_utility import (
    assert_matches_oracle,
    feasibility_margin,
    relative_residual,
    residual_tolerance,
    scipy_least_squares,
    scipy_minimize,
)

EPS = float(np.finfo(np.float64).eps)
# (T, P): T = 1, 2, 3, 5, 8 with room in P, then more tasks than parameters (T > P).
SHAPES = [(1, 10), (2, 37), (3, 37), (5, 37), (8, 37), (8, 5), (12, 7)]


def _weights(J: torch.Tensor, **options) -> np.ndarray:
    return nash_mtl_weights(J @ J.T, **options).numpy()


def _agree(J: torch.Tensor, w: np.ndarray, alpha: float = 1.0) -> None:
    assert_matches_oracle(J.numpy(), w, alpha, cancellation_limit=_positive_system.MAX_CANCELLATION)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T, P", SHAPES, ids=[f"T{T}-P{P}" for T, P in SHAPES])
def test_nash_mtl_matches_the_bargaining_solution_on_J(kind: str, T: int, P: int) -> None:
    J = make_J(kind, T, P, seed=T)
    _agree(J, _weights(J))


@pytest.mark.parametrize("T", [2, 3, 5, 8, 16, 32, 64])
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "parallel", "zero_row"])
def test_nash_mtl_certificate_and_scipy(kind: str, T: int) -> None:
    J = make_J(kind, T, 2 * T + 3, seed=T)
    G = (J @ J.T).numpy()
    w = nash_mtl_weights(J @ J.T).numpy()
    tolerance = residual_tolerance(G, w, 1.0, T)
    residual = relative_residual(G, w, 1.0).max()
    assert residual <= tolerance
    # Never worse than SciPy at tight tolerances (the official least-squares formulation and an
    # exact-Hessian trust region on the convex objective), up to what rounding allows.
    active = np.diag(G) > 0
    G_active = G[np.ix_(active, active)]
    for reference in (scipy_least_squares(G_active, 1.0), scipy_minimize(G_active, 1.0)):
        assert residual <= max(relative_residual(G_active, reference, 1.0).max(), tolerance)


def test_nash_mtl_one_task_is_the_unit_gradient() -> None:
    J = make_J("conflicting", 1, 9)
    w = _weights(J)
    assert w.shape == (1,)
    assert math.isclose(w[0], 1 / J.norm().item(), rel_tol=4 * EPS)
    assert (_weights(torch.zeros(1, 9, dtype=torch.float64)) == 0).all()


@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "parallel"])
def test_nash_mtl_two_tasks_is_the_bisector(kind: str) -> None:
    J = make_J(kind, 2, 13, seed=5)
    units = J / J.norm(dim=1, keepdim=True)
    cosine = (units[0] @ units[1]).item()
    expected = (units[0] + units[1]) / math.sqrt(1 + cosine)
    d = torch.as_tensor(_weights(J)) @ J
    assert (d - expected).norm() <= 8 * EPS / (1 + cosine) * expected.norm()
    assert math.isclose(d.norm().item(), math.sqrt(2), rel_tol=1e-14)


def test_nash_mtl_parallel_gradients_share_the_direction() -> None:
    # g_i = c_i·b: C is all ones, so β_i = 1/√T and d = √T·b/‖b‖ whatever the c_i.
    J = make_J("parallel", 6, 11, seed=2)
    d = torch.as_tensor(_weights(J)) @ J
    base = J[0] / J[0].norm()
    assert (d - math.sqrt(6) * base).norm() <= 64 * EPS


@pytest.mark.parametrize("T", [2, 3, 8])
def test_nash_mtl_no_update_improves_every_task_gives_zero_weights(T: int) -> None:
    J = make_J("antiparallel", T, 17)
    assert feasibility_margin(J.numpy())[0] <= 0
    assert (_weights(J) == 0).all()
    # Exactly antiparallel pairs whose Gram is off by rounding (fp32) too.
    assert (nash_mtl_weights((J @ J.T).float()) == 0).all()


def test_nash_mtl_zero_gradient_takes_no_part() -> None:
    J = make_J("conflicting", 5, 23, seed=1)
    J[2] = 0
    w = _weights(J)
    assert w[2] == 0
    others = [0, 1, 3, 4]
    np.testing.assert_allclose(w[others], _weights(J[others]), rtol=1e-13)
    d = w @ J.numpy()
    assert math.isclose(np.linalg.norm(d), 2.0, rel_tol=1e-13)  # √(T − #zero)
    assert (_weights(torch.zeros(4, 6, dtype=torch.float64)) == 0).all()


def test_nash_mtl_near_the_boundary_is_solved_or_zero() -> None:
    # g_2 at an angle δ from −g_1: the solution has α ~ 1/δ and d ⟂ both to within δ; beyond the
    # cancellation limit (δ ≲ 2e-4 here) the weights are 0, before it they are the solution.
    for delta, solved in ((1e-2, True), (1e-3, True), (1e-5, False), (1e-8, False), (0.0, False)):
        J = torch.zeros(3, 4, dtype=torch.float64)
        J[0, 0], J[1, 0], J[1, 1], J[2, 0], J[2, 2] = 1, -2, delta, 0.5, 0.3
        w = _weights(J)
        assert np.isfinite(w).all()
        assert (w != 0).all() == solved
        if solved:
            _agree(J, w)


def test_nash_mtl_max_norm_rescales_the_update() -> None:
    J = make_J("conflicting", 4, 19, seed=3)
    w = _weights(J)
    np.testing.assert_allclose(_weights(J, max_norm=1.0), w / 2, rtol=1e-14)  # ‖d‖ = √4 → 1
    np.testing.assert_allclose(_weights(J, max_norm=5.0), w, rtol=0)  # never scaled up
    d = _weights(J, max_norm=0.3) @ J.numpy()
    assert math.isclose(np.linalg.norm(d), 0.3, rel_tol=1e-13)
    J[:] = 0
    assert (_weights(J, max_norm=1.0) == 0).all()


def test_nash_mtl_mean_reduction_divides_by_T() -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", 6, 14))
    torch.testing.assert_close(nash_mtl_weights(G, reduction="mean"), nash_mtl_weights(G) / 6, rtol=0, atol=0)


@given(
    T=st.integers(2, 12),
    kind=st.sampled_from(["conflicting", "agreeing", "parallel", "zero_row"]),
    seed=st.integers(0, 1000),
    log_scale=st.floats(-6, 6),
)
def test_nash_mtl_update_is_invariant_to_the_gradients_scale(T: int, kind: str, seed: int, log_scale: float) -> None:
    # α(s²G) = α(G)/s, so d(sJ) = d(J): the update has length √T whatever the gradients' (and even
    # each task's own: g_i → c_i·g_i gives α_i → α_i/c_i) scale.
    J = make_J(kind, T, 2 * T + 1, seed=seed)
    s = 10.0**log_scale
    w = _weights(J)
    np.testing.assert_allclose(_weights(s * J) * s, w, rtol=1e-11, atol=0)
    c = torch.rand(T, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 100 + 0.01
    np.testing.assert_allclose(_weights(c * J) * c.squeeze(1).numpy(), w, rtol=1e-11, atol=0)


@given(T=st.integers(2, 12), kind=st.sampled_from(KINDS), seed=st.integers(0, 1000))
def test_nash_mtl_is_permutation_equivariant(T: int, kind: str, seed: int) -> None:
    J = make_J(kind, T, 2 * T + 1, seed=seed)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_allclose(_weights(J[order]), _weights(J)[order.numpy()], rtol=1e-11, atol=0)


@given(
    T=st.integers(2, 16),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_nash_mtl_gains_are_the_inverse_weights(T: int, kind: str, seed: int, dtype: torch.dtype) -> None:
    # α_i·g_iᵀd = 1 on the Gram it was given (so every task improves), ‖d‖² = number of non-zero tasks;
    # or all weights 0.
    J = make_J(kind, T, 2 * T + 1, dtype=dtype, seed=seed)
    G = J @ J.T
    w = nash_mtl_weights(G).numpy()
    G64 = G.double().numpy()
    G64 = (G64 + G64.T) / 2
    assert np.isfinite(w).all() and (w >= 0).all()
    if (w == 0).all():
        return
    active = np.diag(G64) > 0
    assert (w[active] > 0).all() and (w[~active] == 0).all()
    assert relative_residual(G64, w, 1.0).max() <= residual_tolerance(G64, w, 1.0, T)
    assert math.isclose(w @ G64 @ w, active.sum(), rel_tol=T * residual_tolerance(G64, w, 1.0, T))


@pytest.mark.parametrize("T", [1, 2, 3, 8, 12])
def test_nash_mtl_weights_do_not_read_values_back(T: int) -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", T, 20))
    with ForbidHostReads():
        nash_mtl_weights(G)
        nash_mtl_weights(G, max_norm=1.0, max_iter=3, reduction="mean")


def test_nash_mtl_solver_is_batched() -> None:
    Gs = torch.stack([(lambda J: J @ J.T)(make_J(kind, 6, 9, seed=4)) for kind in KINDS])
    batched = _positive_system.solve_power_system(Gs, 1.0, max_iter=16).weights
    for G, w in zip(Gs, batched):
        torch.testing.assert_close(w, nash_mtl_weights(G), rtol=1e-13, atol=0)


def test_nash_mtl_nan_gives_nan_weights() -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", 4, 9))
    for bad in (math.nan, math.inf):
        G_bad = G.clone()
        G_bad[1, 2] = bad
        assert nash_mtl_weights(G_bad).isnan().all()


def test_nash_mtl_returns_float64_on_the_device_of_G() -> None:
    G = (lambda J: J @ J.T)(make_J("conflicting", 3, 8, dtype=torch.float32))
    w = nash_mtl_weights(G)
    assert w.dtype == torch.float64 and w.device == G.device and w.shape == (3,)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": math.inf}, "max_norm"),
        ({"max_norm": math.nan}, "max_norm"),
        ({"max_norm": True}, "max_norm"),
        ({"max_norm": "1"}, "max_norm"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"max_iter": True}, "max_iter"),
        ({"reduction": "none"}, "reduction"),
    ],
)
def test_nash_mtl_bad_options_raise(options: dict, name: str) -> None:
    G = torch.eye(3)
    with pytest.raises(ValueError, match=name):
        nash_mtl_weights(G, **options)


def test_nash_mtl_options_check_accepts_the_defaults_and_the_official_clip() -> None:
    check_nash_mtl_options(None, 16)
    check_nash_mtl_options(1.0, 1)
    assert "navon2022multi" in BIBTEX and "Bargaining Game" in BIBTEX
