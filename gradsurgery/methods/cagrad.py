"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

With ``g0 = (1/T)Σ_t g_t``, ``b = G·1/T`` and ``φ = c·‖g0‖ = c·sqrt(1ᵀG1)/T``, solve the dual problem ::

    w* = argmin_{w ∈ Δ} wᵀb + φ·sqrt(wᵀGw)        (= g_wᵀg0 + φ‖g_w‖,  g_w = Σ_t w_t g_t)

and return ``d = (g0 + λ·g_{w*}) / rescale`` with ``λ = φ / ‖g_{w*}‖`` (0 when that norm is 0), put on the
sum scale (``×T``): ``w_t = (1 + T·λ·w*_t) / rescale``. ``rescale`` is ``1 + c²`` (the official code's
default), ``1 + c`` or ``None`` (1). ``c = 0`` is exactly naive summation.

``c = 0.4`` is the value of the official NYUv2 and Cityscapes runs. ``T = 2`` is solved in closed form
(a one-dimensional convex problem: the stationary point of ``f(u)``, ``w = (u, 1 − u)``, clipped to
``[0, 1]``); up to ``_supports.MAX_TASKS`` (10) tasks the dual is solved exactly from the optimality
conditions on every face of the simplex at once. Larger ``T`` runs the fixed-budget interior-point
solver of ``_simplex`` on the normalised problem, smoothing ``‖g_w‖`` to ``sqrt(‖g_w‖² + 1/t²)`` along
the barrier path (error ``≤ φ/t``, ``t`` reaching ``1e14``); it reaches the minimum to ``1e-6``
relative in ``max_iter = 48`` iterations, and an exact solve on the faces its weights point to
(``_supports.polish_cagrad_dual``) then takes it to rounding whenever that face is non-degenerate.
The official code uses SciPy's SLSQP at its default tolerance instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._common import check_gram, check_reduction, normalized, to_reduction
from . import _supports
from ._simplex import DEFAULT_ITERATIONS, LocalModel, minimize_on_simplex

RESCALES = ("1+c^2", "1+c", None)

BIBTEX = """@inproceedings{liu2021conflict,
  title     = {Conflict-Averse Gradient Descent for Multi-task Learning},
  author    = {Liu, Bo and Liu, Xingchao and Jin, Xiaojie and Stone, Peter and Liu, Qiang},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {34},
  pages     = {18878--18890},
  year      = {2021}
}"""


def check_cagrad_options(c: float, rescale: str | None) -> None:
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not c >= 0 or c == float("inf"):
        raise ValueError(f"c must be a finite number ≥ 0, got {c!r}")
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")


def cagrad_weights(
    G: torch.Tensor,
    *,
    c: float = 0.4,
    rescale: str | None = "1+c^2",
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    solve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the CAGrad update.

    ``solve(G_normalized, b, phi, max_iter)`` finds the dual solution for ``T ≥ 3`` (default: exact up
    to ``_supports.MAX_TASKS`` tasks, the interior-point solver here beyond); the backend passes the
    fused kernel. Either interior point is then finished exactly on its support.
    """
    check_gram(G)
    check_cagrad_options(c, rescale)
    check_reduction(reduction)
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    T = G.shape[0]
    Gn = normalized(G)
    b = Gn.sum(dim=1) / T
    phi = c * Gn.sum().clamp_min(0).sqrt() / T
    if T == 2:
        w_star = _solve_two(Gn, b, phi)
    elif solve is None and T <= _supports.MAX_TASKS:
        w_star = _supports.cagrad_dual(Gn, b, phi)
    else:
        # The interior point (the fused kernel's or the one here), finished exactly on its support.
        w_star = _supports.polish_cagrad_dual(Gn, b, phi, (solve or _solve)(Gn, b, phi, max_iter))
    norm = (w_star @ Gn @ w_star).clamp_min(0).sqrt()
    lam = torch.where(norm > 0, phi / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    divisor = {"1+c^2": 1 + c**2, "1+c": 1 + c, None: 1.0}[rescale]
    return to_reduction((1 + T * lam * w_star) / divisor, reduction)


def cagrad_objective(w: torch.Tensor, G: torch.Tensor, c: float) -> torch.Tensor:
    """``wᵀb + φ·sqrt(wᵀGw)`` for each row of ``w`` (``(T,)`` or ``(K, T)``): the dual objective."""
    T = G.shape[-1]
    b = G.sum(dim=1) / T
    phi = c * G.sum().clamp_min(0).sqrt() / T
    quad = ((w @ G) * w).sum(dim=-1)
    return w @ b + phi * quad.clamp_min(0).sqrt()


def _solve_two(G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    # w = (u, 1 − u): g_w = g2 + u(g1 − g2), ‖g_w‖² = a·u² + 2βu + γ = y²/a + D with y = a·u + β.
    # f'(u) = −s + φ·y/‖g_w‖ with s = b2 − b1, so the stationary point has sign(y) = sign(s) and
    # y² = s²·D·a / (φ²a − s²); when φ²a ≤ s² the slope never changes sign and a vertex wins.
    a = G[0, 0] + G[1, 1] - 2 * G[0, 1]
    beta = G[0, 1] - G[1, 1]
    s = b[1] - b[0]
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    distance_sq = (G[1, 1] - beta * beta / safe_a).clamp_min(0)
    margin = phi * phi * a - s * s
    safe_margin = torch.where(margin > 0, margin, torch.ones_like(margin))
    y = torch.sign(s) * (distance_sq * a / safe_margin).clamp_min(0).sqrt() * s.abs()
    interior = ((y - beta) / safe_a).clamp(0.0, 1.0)
    vertex = torch.where(s > 0, torch.ones_like(s), torch.where(s < 0, torch.zeros_like(s), torch.full_like(s, 0.5)))
    u = torch.where(a > 0, torch.where(margin > 0, interior, vertex), torch.full_like(a, 0.5))
    return torch.stack((u, 1 - u))


def _solve(G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, max_iter: int) -> torch.Tensor:
    # ‖g_w‖ is smoothed to sqrt(‖g_w‖² + 1/t²): off by at most 1/t, like the barrier at weight t,
    # and its curvature near g_w = 0 (~t) never dwarfs the barrier's.
    def objective(w: torch.Tensor, t: float) -> LocalModel:
        Gw = G @ w
        norm_sq = w @ Gw + t**-2
        norm = norm_sq.sqrt()
        # ∇f = b + φ·Gw/n, ∇²f = (φ/n)·(G − (Gw/n)(Gw/n)ᵀ)
        scale = phi / norm
        grad = torch.addcmul(b, scale, Gw)
        unit = Gw / norm
        hess = torch.addr(G, unit, unit, alpha=-1).mul_(scale)

        def slope(d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            # ∇f(w + s·d)·d = b·d + φ·(wᵀGd + s·dᵀGd) / sqrt(n² + 2s·wᵀGd + s²·dᵀGd)
            Gd = G @ d
            wGd = w @ Gd
            along = torch.addcmul(wGd, steps, d @ Gd)  # wᵀGd + s·dᵀGd
            moved_sq = torch.addcmul(norm_sq, steps, along + wGd)
            return torch.addcmul(b @ d, along / moved_sq.clamp_min(t**-2).sqrt(), phi)

        return LocalModel(grad, hess, slope)

    return minimize_on_simplex(objective, G.shape[0], like=G, iterations=max_iter)
