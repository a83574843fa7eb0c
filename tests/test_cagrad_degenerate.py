"""CAGrad where the dual optimum has ``g_w* = 0``: the update is still the solution of CAGrad's primal
problem, ``max_d min_i g_iᵀd`` s.t. ``‖d − g0‖ ≤ c‖g0‖``, checked against that problem solved directly
on the gradients (SciPy), in fp32 and fp64, at any scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import gradsurgery.functional as F
from gradsurgery.methods import cagrad as cagrad_module
from gradsurgery.methods.cagrad import cagrad_weights

from .reference import cagrad_min_scipy
from .test_no_sync import ForbidHostReads

DIVISORS = {"1+c^2": lambda c: 1 + c**2, "1+c": lambda c: 1 + c, None: lambda c: 1.0}


def primal_value(J: torch.Tensor, c: float) -> float:
    """``max_{‖d − g0‖ ≤ c‖g0‖} min_i g_iᵀd`` by SLSQP on ``(d, s)``: maximise ``s`` subject to
    ``g_iᵀd ≥ s`` and the ball, from the ball's centre, best of a few starts."""
    A = J.double().numpy()
    g0 = A.mean(axis=0)
    radius_sq = (c * np.linalg.norm(g0)) ** 2
    constraints = [
        {"type": "ineq", "fun": lambda x: A @ x[:-1] - x[-1], "jac": lambda x: np.hstack([A, -np.ones((len(A), 1))])},
        {
            "type": "ineq",
            "fun": lambda x: np.array([radius_sq - np.sum((x[:-1] - g0) ** 2)]),
            "jac": lambda x: np.hstack([-2 * (x[:-1] - g0), [0.0]])[None],
        },
    ]
    best = -np.inf
    rng = np.random.default_rng(0)
    for start in range(3):
        d0 = g0 if start == 0 else g0 + np.sqrt(radius_sq) * rng.standard_normal(len(g0)) / np.sqrt(len(g0)) / 2
        x0 = np.append(d0, np.min(A @ d0))
        result = minimize(
            lambda x: -x[-1],
            x0,
            jac=lambda x: np.append(np.zeros(len(x) - 1), -1.0),
            method="SLSQP",
            constraints=constraints,
            options={"ftol": 1e-16, "maxiter": 3000},
        )
        d = result.x[:-1]
        if np.sum((d - g0) ** 2) <= radius_sq * (1 + 1e-9) + 1e-300:
            best = max(best, float(np.min(A @ d)))
    return best


# ---------------------------------------------------------------- families where 0 is in the hull


def minimal(T: int, P: int, seed: int) -> torch.Tensor:
    """The bug report's matrix: g3 = −2·g1, so 0 = (2g1 + g3)/3 lies on an edge of the hull (T = 3)."""
    return torch.tensor([[1.0, -1.0], [2.0, 0.0], [-2.0, 2.0]], dtype=torch.float64)


def strong(T: int, P: int, seed: int) -> torch.Tensor:
    """0 in the relative interior of the hull: 0 = Σ a_t g_t with every a_t > 0 (strongly Pareto-stationary)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(T - 1, P, generator=gen, dtype=torch.float64)
    a = torch.rand(T, generator=gen, dtype=torch.float64) + 0.2
    return torch.cat((rows, -(a[:-1] @ rows / a[-1])[None]))


def weak(T: int, P: int, seed: int) -> torch.Tensor:
    """0 in the relative interior of the face of a subset of two or more tasks, the others generic: on
    the hull's boundary (weakly but not strongly Pareto-stationary)."""
    gen = torch.Generator().manual_seed(seed)
    size = 2 + seed % (T - 1)
    face = strong(size, P, seed + 1)
    J = torch.cat((face, torch.randn(T - size, P, generator=gen, dtype=torch.float64)))
    return J[torch.randperm(T, generator=gen)]


def zero_row(T: int, P: int, seed: int) -> torch.Tensor:
    """A task whose gradient is exactly zero: 0 is a vertex of the hull."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=gen, dtype=torch.float64)
    J[seed % T] = 0
    return J


def antiparallel(T: int, P: int, seed: int) -> torch.Tensor:
    """Two exactly opposite gradients of different lengths (0 on an edge) and generic others."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=gen, dtype=torch.float64)
    J[1] = -2.5 * J[0]
    return J


FAMILIES = {"minimal": minimal, "strong": strong, "weak": weak, "zero_row": zero_row, "antiparallel": antiparallel}
CASES = [("minimal", 3, 2, 0)] + [
    (family, T, P, seed)
    for family in ("strong", "weak", "zero_row", "antiparallel")
    for T, P in ((2, 3), (3, 4), (5, 6), (8, 9), (12, 14))
    for seed in (0, 1)
    if not (family == "weak" and T == 2)
]


def tolerance(T: int, dtype: torch.dtype) -> float:
    """The accuracy the switch guarantees, relative: ``(T·ε)^(1/3)`` (see ``cagrad._unless_degenerate``),
    with ε of the Gram matrix's dtype, times 4 for the combination and the reference's own error."""
    return 4 * (T * torch.finfo(dtype).eps) ** (1 / 3)


def check_primal_optimal(J: torch.Tensor, d: torch.Tensor, c: float, divisor: float, value: float, tol: float) -> None:
    """``d`` (the update on the sum scale, rescaled) is feasible and attains the primal value ``value``."""
    J = J.double()
    T = J.shape[0]
    step = d.double() * divisor / T  # back to CAGrad's own scale: the primal variable
    g0 = J.mean(dim=0)
    radius = c * float(g0.norm())
    scale = float(J.norm(dim=1).max())
    assert torch.isfinite(d).all()
    assert float((step - g0).norm()) <= radius * (1 + tol) + tol * scale * 1e-3
    assert float((J @ step).min()) >= value - tol * scale * max(float(g0.norm()), radius)


@pytest.mark.parametrize("rescale", ["1+c^2", None])
@pytest.mark.parametrize("c", [0.4, 1.0, 2.0])
@pytest.mark.parametrize(("family", "T", "P", "seed"), CASES)
def test_the_update_solves_the_primal_problem(
    family: str, T: int, P: int, seed: int, c: float, rescale: str | None
) -> None:
    J = FAMILIES[family](T, P, seed)
    value = primal_value(J, c)
    d = F.cagrad(J, c=c, rescale=rescale)
    check_primal_optimal(J, d, c, DIVISORS[rescale](c), value, tolerance(T, torch.float64))


@pytest.mark.parametrize("c", [0.4, 1.0, 2.0])
@pytest.mark.parametrize(("family", "T", "P", "seed"), CASES[::3])
def test_the_update_solves_the_primal_problem_in_fp32(family: str, T: int, P: int, seed: int, c: float) -> None:
    J = FAMILIES[family](T, P, seed).float()
    value = primal_value(J, c)
    d = F.cagrad(J, c=c)
    assert d.dtype == torch.float32
    check_primal_optimal(J, d, c, 1 + c**2, value, tolerance(T, torch.float32))


@pytest.mark.parametrize(
    ("family", "T", "P", "seed"), [("strong", 3, 4, 0), ("weak", 5, 6, 1), ("antiparallel", 4, 5, 0)]
)
def test_the_primal_reference_meets_the_dual_one(family: str, T: int, P: int, seed: int) -> None:
    # Strong duality: the primal solved on d and the dual solved on the simplex agree.
    J = FAMILIES[family](T, P, seed)
    for c in (0.4, 2.0):
        G = J @ J.T
        assert abs(primal_value(J, c) - cagrad_min_scipy(G.numpy(), c)) <= 1e-6 * float(G.diagonal().max())


def test_the_minimal_case_of_the_report() -> None:
    # 0 = (2g1 + g3)/3 and g0 = (1/3, 1/3) conflicts with no task: the primal value is 0 and g0 itself
    # attains it, so π_K(g0) = g0: naive summation, divided by the rescale.
    J = minimal(3, 2, 0)
    for rescale, divisor in (("1+c^2", 1.16), (None, 1.0)):
        w = cagrad_weights(J @ J.T, c=0.4, rescale=rescale)
        assert torch.allclose(w, torch.full((3,), 1 / divisor, dtype=torch.float64), rtol=1e-12)
    for dtype in (torch.float32, torch.float64):
        for scale in (1e-20, 1.0, 1e25):
            d = F.cagrad(J.to(dtype) * scale, rescale=None)
            assert torch.allclose(d.double(), torch.tensor([scale, scale], dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-20, 1e-10, 1e10, 1e25])
@pytest.mark.parametrize(
    ("family", "T", "P", "seed"), [("minimal", 3, 2, 0), ("strong", 5, 6, 0), ("weak", 8, 9, 1), ("zero_row", 3, 4, 1)]
)
def test_the_update_is_scale_equivariant(
    family: str, T: int, P: int, seed: int, scale: float, dtype: torch.dtype
) -> None:
    J = FAMILIES[family](T, P, seed).to(dtype)
    for c in (0.4, 2.0):
        d = F.cagrad(J, c=c).double()
        scaled = F.cagrad(J * scale, c=c).double()
        assert torch.isfinite(scaled).all()
        # fp32: J·s is rounded afresh (a relative 6e-8 change of the input), which the degenerate
        # problem can amplify up to the switch's accuracy.
        tol = tolerance(T, dtype) if dtype == torch.float32 else 1e-9
        assert float((scaled / scale - d).norm()) <= tol * float(J.double().norm(dim=1).max()) * T


@pytest.mark.parametrize("c", [0.4, 2.0])
@pytest.mark.parametrize(("family", "T", "P", "seed"), [("strong", 5, 6, 0), ("weak", 5, 6, 1), ("zero_row", 4, 5, 0)])
def test_the_interior_point_backend_gets_the_same_fix(family: str, T: int, P: int, seed: int, c: float) -> None:
    # A backend's solve (the fused kernel, here the torch interior point) only returns w*: the switch
    # after it is the same.
    J = FAMILIES[family](T, P, seed)
    w = cagrad_weights(J @ J.T, c=c, solve=cagrad_module._solve)
    check_primal_optimal(J, w @ J, c, 1 + c**2, primal_value(J, c), tolerance(T, torch.float64))


def test_zero_c_stays_naive_summation_on_degenerate_inputs() -> None:
    for family, T, P, seed in CASES[:8]:
        J = FAMILIES[family](T, P, seed)
        assert torch.equal(cagrad_weights(J @ J.T, c=0.0), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_degenerate_weights_do_not_read_values_back(T: int) -> None:
    G = strong(T, T + 1, 0) @ strong(T, T + 1, 0).T
    with ForbidHostReads():
        cagrad_weights(G, c=2.0, max_iter=5)
