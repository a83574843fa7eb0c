"""Projections onto the dual cone ``K = {d : J d ≥ 0}`` written plainly on the gradients (fp64, SciPy):
the oracles of UPGrad, DualProj and CAGrad's degenerate case, independent of the library's Gram-space
solver."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize, nnls


def project(J: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``π_K(x)`` by Moreau's decomposition: ``x = π_K(x) + π_{K°}(x)`` with the polar cone
    ``K° = {−Jᵀμ : μ ≥ 0}``, so ``π_K(x) = x + Jᵀμ*`` where ``μ* = argmin_{μ ≥ 0} ‖x + Jᵀμ‖`` — a
    non-negative least-squares problem on ``Jᵀ`` (``P × T``), solved by Lawson–Hanson."""
    A = J.double().T.numpy()
    b = x.double().numpy()
    mu, _ = nnls(A, -b, maxiter=50 * A.shape[1] + 100)
    return torch.from_numpy(b + A @ mu)


def project_slsqp(J: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``π_K(x)`` straight from its definition, ``argmin_{Jd ≥ 0} ½‖d − x‖²`` (SLSQP at tight tolerance):
    a check of :func:`project` by a method that knows nothing of duality. Small ``P`` only."""
    A = J.double().numpy()
    b = x.double().numpy()
    result = minimize(
        lambda d: 0.5 * np.sum((d - b) ** 2),
        b.copy(),
        jac=lambda d: d - b,
        method="SLSQP",
        constraints={"type": "ineq", "fun": lambda d: A @ d, "jac": lambda d: A},
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return torch.from_numpy(result.x)


def upgrad_vector(J: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """Quinton & Rey 2024: ``Σ_i p_i π_K(g_i)`` (``p = 1/T`` by default), times ``T``: the sum scale."""
    T = J.shape[0]
    p = torch.full((T,), 1.0 / T, dtype=torch.float64) if pref is None else pref.double()
    return T * sum(p[i] * project(J, J[i].double()) for i in range(T))


def dualproj_vector(J: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """``π_K(Σ_t p_t g_t)`` (``p = 1/T`` by default), times ``T``: the sum scale."""
    T = J.shape[0]
    p = torch.full((T,), 1.0 / T, dtype=torch.float64) if pref is None else pref.double()
    return T * project(J, p @ J.double())


def face_condition(J: torch.Tensor, d: torch.Tensor) -> float:
    """The condition number of the gradients whose constraint is active at ``d`` (``g_jᵀd ≈ 0``), over
    the directions they span (``σ_max/σ_min`` of the non-zero singular values; 1 when none is active):
    how much rounding in the data can move the projection along that face."""
    J = J.double()
    norms = J.norm(dim=1)
    scale = max(float(d.norm()), float(norms.max()), 1e-300)
    active = (J @ d.double()).abs() <= 1e-8 * norms * scale
    rows = J[active & (norms > 0)]
    if rows.shape[0] == 0:
        return 1.0
    s = torch.linalg.svdvals(rows / rows.norm(dim=1, keepdim=True))
    s = s[s > 1e-10 * s[0]]
    return float(s[0] / s[-1])
