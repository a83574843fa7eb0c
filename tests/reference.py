"""Plain vector-form implementations of each paper's algorithm (fp64), written independently of the
library's Gram-space code: the oracles the tests compare against."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize


def pcgrad_vector(J: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1, with the visiting order of each task given explicitly."""
    J = J.double()
    projected = []
    for i, order in enumerate(orders):
        g = J[i].clone()
        for j in order:
            inner = torch.dot(g, J[j])
            norm_sq = torch.dot(J[j], J[j])
            if inner < 0 and norm_sq > 0:
                g = g - inner / norm_sq * J[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def min_norm_scipy(G: np.ndarray, starts: int = 4) -> np.ndarray:
    """argmin over the simplex of αᵀGα by SLSQP at tight tolerance, best of several starts."""
    return _best_on_simplex(lambda a: a @ G @ a, G.shape[0], starts)


def cagrad_objective_np(w: np.ndarray, G: np.ndarray, c: float) -> float:
    T = G.shape[0]
    b = G.sum(axis=1) / T
    phi = c * np.sqrt(max(G.sum(), 0.0)) / T
    return float(w @ b + phi * np.sqrt(max(w @ G @ w, 0.0)))


def cagrad_min_scipy(G: np.ndarray, c: float, starts: int = 4) -> float:
    """The minimum of the CAGrad dual objective by SLSQP at tight tolerance, best of several starts."""
    w = _best_on_simplex(lambda x: cagrad_objective_np(x, G, c), G.shape[0], starts)
    return cagrad_objective_np(w, G, c)


def cagrad_vector(J: torch.Tensor, c: float, w_star: np.ndarray, rescale: float) -> torch.Tensor:
    """The official CAGrad update for a given dual solution, on the sum scale (× T)."""
    J = J.double()
    T = J.shape[0]
    g0 = J.mean(dim=0)
    gw = torch.as_tensor(w_star, dtype=torch.float64) @ J
    phi = c * g0.norm()
    lam = phi / gw.norm() if gw.norm() > 0 else 0.0
    return (g0 + lam * gw) / rescale * T


def _best_on_simplex(objective, T: int, starts: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    best_x, best_f = None, np.inf
    for s in range(starts):
        x0 = np.full(T, 1.0 / T) if s == 0 else rng.dirichlet(np.ones(T))
        result = minimize(
            objective,
            x0,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * T,
            constraints={"type": "eq", "fun": lambda x: x.sum() - 1.0},
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        x = np.clip(result.x, 0, None)
        x /= x.sum()
        f = objective(x)
        if f < best_f:
            best_x, best_f = x, f
    return best_x
