"""Independent fp64 oracles for Nash-MTL and FairGrad, written on ``J`` (NumPy/SciPy, no library code).

Both papers choose the update ``d`` that maximises the tasks' total utility of their first-order loss
decreases ``u_i = g_iᵀd`` on a ball. In Lagrangian form (the multiplier absorbed into the ball's radius)
the update is ::

    d* = argmax_d  Σ_i U_α(g_iᵀd) − ½‖d‖²,    U_α(u) = log u (α = 1),  u^(1−α)/(1−α) otherwise

over ``{d : g_iᵀd > 0 for every i}``: Nash bargaining for ``α = 1`` (Navon et al.), α-fair allocation in
general (Ban & Ji). Its stationarity condition ``d = Σ_i (g_iᵀd)^(−α) g_i`` is the weights' system of
both papers (``w_i = (g_iᵀd)^(−α)``, ``Gw = w^(−1/α)``). Here it is solved in the parameter space itself:
a linear program finds a strictly feasible ``d`` (or shows there is none), then damped Newton on the
strictly concave objective in ``d``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares, linprog, minimize


def feasibility_margin(J: np.ndarray) -> tuple[float, np.ndarray]:
    """``max_{‖d‖_∞ ≤ 1} min_i ĝ_iᵀd`` over the unit rows ``ĝ_i`` (> 0 iff some ``d`` improves every task),
    and that ``d``."""
    R = J / np.linalg.norm(J, axis=1, keepdims=True)
    T, P = R.shape
    # Variables (d, t): maximise t subject to R d ≥ t, −1 ≤ d ≤ 1.
    result = linprog(
        c=np.r_[np.zeros(P), -1.0],
        A_ub=np.c_[-R, np.ones(T)],
        b_ub=np.zeros(T),
        bounds=[(-1.0, 1.0)] * P + [(None, 1.0)],
        method="highs",
    )
    return float(result.x[-1]), result.x[:P]


def utility_update(J: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(d*, w)`` for the rows of ``J`` (zero rows take no part and get ``w = 0``), or ``None`` when no ``d``
    has ``g_iᵀd > 0`` for every non-zero row."""
    J = np.asarray(J, dtype=np.float64)
    T, P = J.shape
    nonzero = np.linalg.norm(J, axis=1) > 0
    w = np.zeros(T)
    if not nonzero.any():
        return np.zeros(P), w
    R = J[nonzero]
    margin, d = feasibility_margin(R)
    if margin <= 0:
        return None

    def value(d: np.ndarray) -> float:
        u = R @ d
        utility = np.log(u).sum() if alpha == 1 else (u ** (1 - alpha)).sum() / (1 - alpha)
        return utility - 0.5 * d @ d

    d = d * 1e-3 / np.abs(d).max()  # any positive multiple is feasible; start short
    for _ in range(400):
        u = R @ d
        grad = R.T @ u**-alpha - d
        hess = -(R.T * (alpha * u ** (-alpha - 1))) @ R - np.eye(P)
        step = np.linalg.solve(-hess, grad)
        decrement = grad @ step  # the Newton decrement, squared
        if decrement <= 1e-30:
            break
        t = 1.0
        while t > 1e-20:
            trial = d + t * step
            if (R @ trial > 0).all() and value(trial) >= value(d) + 1e-4 * t * decrement:
                break
            t /= 2
        else:
            break
        d = trial
    # A few full Newton steps polish what the value test cannot resolve near the optimum.
    for _ in range(3):
        u = R @ d
        grad = R.T @ u**-alpha - d
        hess = -(R.T * (alpha * u ** (-alpha - 1))) @ R - np.eye(P)
        trial = d + np.linalg.solve(-hess, grad)
        if (R @ trial > 0).all():
            d = trial
    w[nonzero] = (R @ d) ** -alpha
    return d, w


def relative_residual(G: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """``|w_i^(1/α) (Gw)_i − 1|`` for the tasks with a non-zero gradient."""
    active = np.diag(G) > 0
    return np.abs(w[active] ** (1 / alpha) * (G @ w)[active] - 1)


def residual_tolerance(G: np.ndarray, w: np.ndarray, alpha: float, T: int) -> float:
    """What rounding alone allows for :func:`relative_residual`: the sum ``(Gw)_i`` is accurate to
    ``~T·ε·Σ_j |G_ij| w_j`` and ``w_i^(1/α)`` to a few ulps, relative; a factor 16 of slack."""
    active = np.diag(G) > 0
    Gw = (G @ w)[active]
    cancellation = (np.abs(G) @ w)[active] / np.abs(Gw)
    return float(16 * np.finfo(np.float64).eps * (T * cancellation + 1 / alpha + 2).max())


def scaled_hessian_condition(G: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """The condition number of the weights' problem at ``w`` (active tasks): that of the Hessian of
    ``½wᵀGw − Σ_i h(w_i)`` (``h' = w^(−1/α)``) scaled by ``diag(w^((1+1/α)/2))``, ``SGS + I/α``."""
    active = np.diag(G) > 0
    s = w[active] ** ((1 + 1 / alpha) / 2)
    K = G[np.ix_(active, active)] * s[:, None] * s[None, :] + np.eye(active.sum()) / alpha
    return float(np.linalg.cond(K))


def scipy_least_squares(G: np.ndarray, alpha: float) -> np.ndarray:
    """The official code's solve, ``least_squares`` on ``Gw − w^(−1/α)`` from ``w = 1/T`` with ``w ≥ 0``, but
    at tight tolerances (all tasks active)."""
    T = G.shape[0]
    fit = least_squares(
        lambda w: G @ w - np.power(w, -1 / alpha),
        np.full(T, 1.0 / T),
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return fit.x


def scipy_minimize(G: np.ndarray, alpha: float) -> np.ndarray:
    """``argmin ½wᵀGw − Σ_i h(w_i)`` (``h' = w^(−1/α)``) by SciPy's exact-Hessian trust region in ``u = log w``
    at a tight gradient tolerance (all tasks active; the problem must have a solution)."""
    p = 1 / alpha

    def value(u: np.ndarray) -> float:
        v = np.exp(u)
        return 0.5 * v @ G @ v - (u.sum() if p == 1 else (v ** (1 - p)).sum() / (1 - p))

    def gradient(u: np.ndarray) -> np.ndarray:
        v = np.exp(u)
        return v * (G @ v) - v ** (1 - p)

    def hessian(u: np.ndarray) -> np.ndarray:
        v = np.exp(u)
        return G * v[:, None] * v[None, :] + np.diag(v * (G @ v) - (1 - p) * v ** (1 - p))

    start = np.log(np.diag(G) ** (-alpha / (1 + alpha)))  # the solution for orthogonal gradients
    options = {"gtol": 1e-15, "maxiter": 2000}
    fit = minimize(value, start, jac=gradient, hess=hessian, method="trust-exact", options=options)
    return np.exp(fit.x)


def assert_matches_oracle(J: np.ndarray, w: np.ndarray, alpha: float, *, cancellation_limit: float) -> None:
    """``w`` is the oracle's solution (update and weights) or, where the oracle finds no update improving
    every task, all zero. Within a factor 4 of the cancellation limit (``Σ_i w_i‖g_i‖ / ‖d‖``, beyond which
    the library treats the system as having no solution), either."""
    T = J.shape[0]
    oracle = utility_update(J, alpha)
    norms = np.linalg.norm(J, axis=1)
    if oracle is None or not norms.any():
        assert (w == 0).all()
        return
    d_star, w_star = oracle
    cancellation = (w_star * norms).sum() / max(np.linalg.norm(d_star), np.finfo(float).tiny)
    if (w == 0).all() and cancellation > cancellation_limit / 4:
        return
    assert cancellation <= 4 * cancellation_limit, "accepted beyond the cancellation limit"
    G = J @ J.T
    # Both solves are backward stable: they differ by a few ulps times the problem's condition.
    tolerance = 16 * np.finfo(np.float64).eps * scaled_hessian_condition(G, w_star, alpha) * (T + alpha)
    assert np.linalg.norm(w @ J - d_star) <= tolerance * np.linalg.norm(d_star)
    assert np.abs(w - w_star).max() <= tolerance * np.abs(w_star).max()
    assert (w[norms == 0] == 0).all()
