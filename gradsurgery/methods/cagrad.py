"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

With ``g0 = (1/T)Σ_t g_t``, ``b = G·1/T`` and ``φ = c·‖g0‖ = c·sqrt(1ᵀG1)/T``, solve the dual problem ::

    w* = argmin_{w ∈ Δ} wᵀb + φ·sqrt(wᵀGw)        (= g_wᵀg0 + φ‖g_w‖,  g_w = Σ_t w_t g_t)

and return ``d = (g0 + λ·g_{w*}) / rescale`` with ``λ = φ / ‖g_{w*}‖``, put on the sum scale (``×T``):
``w_t = (1 + T·λ·w*_t) / rescale``. ``rescale`` is ``1 + c²`` (what the official trainers use), ``1 + c``
or ``None`` (1). ``c = 0`` is exactly naive summation.

``g0 + λ·g_{w*}`` solves CAGrad's primal problem ``max_d min_t g_tᵀd`` s.t. ``‖d − g0‖ ≤ φ``, whose value
is the dual optimum ``F*``. **When** ``g_{w*} = 0`` (0 is in the convex hull of the gradients and nothing
in it descends along ``−g0``: always for ``c ≥ 1`` once 0 is in the hull), ``λ`` is undefined, or, with
``‖g_{w*}‖`` computed as rounding noise, ~1e15 and ``d`` cancellation noise outside the ball. There
``F* = 0`` and every ``d`` in the ball that conflicts with no task (``d ∈ K``, the dual cone) is
primal-optimal; ``K`` meets the ball (strong duality), so the projection ``p`` of ``g0`` onto ``K`` is one.
So when ``‖g_{w*}‖² ≤ η·max_t‖g_t‖²``, ``η = (T·ε)^(2/3)`` (``ε`` of G's dtype: below it ``‖g_{w*}‖`` is
not resolved from G's rounding), the update is ``d = g0 + min(1, φ/r)·(p − g0)``,
``r = ‖p − g0‖``: ``p`` itself whenever it is in the ball, then divided by ``rescale`` and put on the sum
scale like the dual formula's (``w = (1 + min(1, φ/r)·(T·v − 1)) / rescale`` with ``p = Jᵀv``). It is
primal-optimal to ``(T·ε)^(1/3)`` relative (``F*`` is within ``‖g_{w*}‖·(φ + ‖g0‖)`` of 0), finite, feasible
and scale-invariant in the weights. ``p`` can be outside the ball only if ``F* < 0`` with ``‖g_{w*}‖`` below
the threshold (``c < 1`` and a hull that nearly touches 0, an ill-conditioned problem): the update is then
the feasible point toward ``K``, not certified optimal. The official code divides by ``‖g_{w*}‖`` unguarded
(NaN at ``g_{w*} = 0``); its dual solver's tolerance makes the noise regime wider.

``c = 0.4`` is the value of the official NYUv2 and Cityscapes run scripts (Cityscapes also runs 0.6; the
scripts' own default is 0.5). ``T = 2`` is solved in closed form
(a one-dimensional convex problem: the stationary point of ``f(u)``, ``w = (u, 1 − u)``, clipped to
``[0, 1]``); up to 10 tasks the dual is solved exactly from the optimality
conditions on every face of the simplex at once. Larger ``T`` runs a fixed-budget interior-point
solver on the normalised problem, smoothing ``‖g_w‖`` to ``sqrt(‖g_w‖² + 1/t²)`` along
the barrier path (error ``≤ φ/t``, ``t`` reaching ``1e14``); it reaches the minimum to ``1e-6``
relative in ``max_iter = 48`` iterations, and an exact solve on the faces its weights point to then
takes it to rounding whenever that face is non-degenerate. The official code uses SciPy's SLSQP
(NYUv2, T = 3) or a bounded scalar minimisation (Cityscapes, T = 2), at default tolerances, instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._common import check_gram, check_reduction, normalized, to_reduction
from . import _cone, _supports
from ._cone import dot, matvec, pad_square
from ._simplex import DEFAULT_ITERATIONS, LocalModel, minimize_on_simplex
from .spec import Method, Option, finite_number, one_of, positive_int

RESCALES = ("1+c^2", "1+c", None)
# Interior-point iterations of the projection the degenerate case uses beyond _cone.MAX_TASKS tasks
# (it is computed on every call, and used only when g_w* vanishes): with the exact finish, 12 reach a
# natural residual of 1e-11 on one right-hand side even for more tasks than directions (measured up
# to T = 64), far inside the (T·ε)^(1/3) accuracy of the switch.
_PROJECTION_ITERATIONS = 12

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

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)`` of independent problems, solved together (``w`` is
    ``(..., T)``; each entry as the unbatched call gives it). ``solve(G_normalized, b, phi, max_iter)``
    finds the dual solution of one ``(T, T)`` problem for ``T ≥ 3`` (default: exact up to
    ``_supports.MAX_TASKS`` tasks, the interior-point solver here beyond); the backend passes the fused
    kernel, which takes one problem: for a batch it is ignored and the torch solvers run. Either
    interior point is then finished exactly on its support.
    """
    check_gram(G)
    check_cagrad_options(c, rescale)
    check_reduction(reduction)
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    batch, T = G.shape[:-2], G.shape[-1]
    if G.dim() > 2:
        solve = None
    # One batch dimension (1 for a single problem): an entry of a batch then runs the same kernels as
    # the unbatched call, which keeps the two bit-identical.
    Gn = normalized(G.reshape(-1, T, T))
    b = Gn.sum(dim=-1) / T
    phi = c * Gn.sum(dim=(-2, -1)).clamp_min(0).sqrt() / T
    if T == 2:
        w_star = _solve_two(Gn, b, phi)
    elif solve is None and T <= _supports.MAX_TASKS:
        w_star = _supports.cagrad_dual(Gn, b, phi)
    elif solve is None:
        w_star = _supports.polish_cagrad_dual(Gn, b, phi, _solve(Gn, b, phi, max_iter))
    else:
        # The fused kernel's interior point (one problem), finished exactly on its support.
        w_star = _supports.polish_cagrad_dual(Gn, b, phi, solve(Gn[0], b[0], phi[0], max_iter)[None])
    norm_sq = _quadratic(w_star, Gn).clamp_min(0)
    norm = norm_sq.sqrt()
    lam = torch.where(norm > 0, phi / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    weights = 1 + T * lam[:, None] * w_star  # d = g0 + λ·g_w*, on the sum scale
    if c > 0:  # c = 0 stays exactly naive summation
        weights = _unless_degenerate(weights, Gn, phi, norm_sq, rounding=torch.finfo(G.dtype).eps)
    divisor = {"1+c^2": 1 + c**2, "1+c": 1 + c, None: 1.0}[rescale]
    return to_reduction(weights / divisor, reduction).reshape(*batch, T)


def _quadratic(w: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``wᵀGw`` per entry: ``w`` ``(..., T)``, ``G`` ``(..., T, T)`` → ``(...)``."""
    return dot(w, matvec(G, w))


def _unless_degenerate(
    weights: torch.Tensor, G: torch.Tensor, phi: torch.Tensor, norm_sq: torch.Tensor, *, rounding: float
) -> torch.Tensor:
    """``weights`` (the dual formula's, sum scale), or, where ``‖g_w*‖`` is rounding noise, those of
    ``d = g0 + min(1, φ/r)·(p − g0)`` with ``p`` the projection of ``g0`` onto the dual cone and
    ``r = ‖p − g0‖`` (see the module docstring). ``G`` is normalised (largest diagonal 1, or 0); all
    arguments have one batch dimension (``G`` ``(B, T, T)``), and each entry switches on its own.

    ``‖g_w*‖² = w*ᵀGw*`` sums ``T²`` entries of ``G`` rounded at ``ε`` (of ``G``'s dtype) weighted by
    ``w* ∈ Δ``: it is known to about ``T·ε``, so the dual formula's ``‖d − g0‖ = λ‖g_w*‖ = φ`` holds only
    to a relative ``T·ε/‖g_w*‖²`` (and its value ``min_t g_tᵀd`` degrades likewise), while the projection
    is primal-optimal to within ``|F*| ≤ ‖g_w*‖·(φ + ‖g0‖)``. Switching at ``‖g_w*‖² = η = (T·ε)^(2/3)``
    balances the two at ``(T·ε)^(1/3)`` relative: ``‖g_w*‖ ≈ 1e-5·max‖g_t‖`` in float64, ``7e-3·max‖g_t‖``
    for an fp32 Gram matrix. Any point of the cone inside the ball is primal-optimal there, so ``p`` is
    the projection with a ridge ``η_p = max(T·ε, 1e-10)`` (``_cone.project``): it may conflict by
    ``η_p·v_t`` relative (~1e-9 measured), and its weights ``v`` stay below ``~1/√η_p`` where the exact
    projection's grow without bound (nearly opposite gradients), which a combination in the gradients'
    own precision could not resolve. The floor is for fp32 gradients, which come with an fp64 Gram matrix
    when their squares leave fp32's range (``backend.rescued``): weights below ``1e5`` keep an fp32
    combination's cancellation (``ε·Σ_t|w_t|‖g_t‖``) under ``1e-2`` of the largest gradient."""
    T = G.shape[-1]
    eta = (T * rounding) ** (2 / 3)
    uniform = torch.full((1, T), 1.0 / T, dtype=G.dtype, device=G.device)
    ridge = max(T * rounding, 1e-10)
    if T == 2:
        away = _cone.project_two(G, uniform[0], ridge=ridge) - 0.5  # p − g0, in weights
    else:
        away = _cone.project(G, uniform, ridge=ridge, max_iter=_PROJECTION_ITERATIONS)[:, 0] - 1.0 / T
    distance_sq = _quadratic(away, G).clamp_min(0)
    # min(1, φ/r): all the way to p when it is inside the ball (then it is primal-optimal), else as far
    # as the ball allows (finite and feasible; see the module docstring for when that happens).
    inside = distance_sq <= phi * phi
    fraction = torch.where(inside, 1.0, phi / torch.where(inside, 1.0, distance_sq.sqrt()))
    projected = torch.addcmul(torch.ones_like(weights), (fraction * T)[:, None], away)
    noise = norm_sq <= eta * G.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    return torch.where(noise[:, None], projected, weights)


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
    # G (..., 2, 2), b (..., 2), φ (...): one closed form per entry.
    a = G[..., 0, 0] + G[..., 1, 1] - 2 * G[..., 0, 1]
    beta = G[..., 0, 1] - G[..., 1, 1]
    s = b[..., 1] - b[..., 0]
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    distance_sq = (G[..., 1, 1] - beta * beta / safe_a).clamp_min(0)
    margin = phi * phi * a - s * s
    safe_margin = torch.where(margin > 0, margin, torch.ones_like(margin))
    y = torch.sign(s) * (distance_sq * a / safe_margin).clamp_min(0).sqrt() * s.abs()
    interior = ((y - beta) / safe_a).clamp(0.0, 1.0)
    vertex = torch.where(s > 0, torch.ones_like(s), torch.where(s < 0, torch.zeros_like(s), torch.full_like(s, 0.5)))
    u = torch.where(a > 0, torch.where(margin > 0, interior, vertex), torch.full_like(a, 0.5))
    return torch.stack((u, 1 - u), dim=-1)


def _solve(G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, max_iter: int) -> torch.Tensor:
    """The interior point for ``G`` ``(..., T, T)``, ``b`` ``(..., T)``, ``φ`` ``(...)``: ``(..., T)``."""
    phi = phi[..., None]  # (..., 1) against vectors (..., N) and ladders (..., K)
    size = G.shape[-1]
    G = pad_square(G)  # padded, with b: see minimize_on_simplex
    b = torch.nn.functional.pad(b, (0, G.shape[-1] - size))

    # ‖g_w‖ is smoothed to sqrt(‖g_w‖² + 1/t²): off by at most 1/t, like the barrier at weight t,
    # and its curvature near g_w = 0 (~t) never dwarfs the barrier's.
    def objective(w: torch.Tensor, t: float) -> LocalModel:
        Gw = matvec(G, w)
        norm_sq = dot(w, Gw).unsqueeze(-1) + t**-2  # (..., 1)
        norm = norm_sq.sqrt()
        # ∇f = b + φ·Gw/n, ∇²f = (φ/n)·(G − (Gw/n)(Gw/n)ᵀ)
        scale = phi / norm
        grad = torch.addcmul(b, scale, Gw)
        unit = Gw / norm
        hess = torch.sub(G, unit.unsqueeze(-1) * unit.unsqueeze(-2)).mul_(scale.unsqueeze(-1))

        def slope(d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            # ∇f(w + s·d)·d = b·d + φ·(wᵀGd + s·dᵀGd) / sqrt(n² + 2s·wᵀGd + s²·dᵀGd)
            Gd = matvec(G, d)
            wGd = dot(w, Gd).unsqueeze(-1)
            along = torch.addcmul(wGd, steps, dot(d, Gd).unsqueeze(-1))  # wᵀGd + s·dᵀGd
            moved_sq = torch.addcmul(norm_sq, steps, along + wGd)
            return torch.addcmul(dot(b, d).unsqueeze(-1), along / moved_sq.clamp_min(t**-2).sqrt(), phi)

        return LocalModel(grad, hess, slope)

    return minimize_on_simplex(objective, size, like=G, iterations=max_iter)


METHOD = Method(
    name="CAGrad",
    function="cagrad",
    weights=cagrad_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("c", 0.4, finite_number("c", low=0.0), "radius of the ball around the mean gradient, relative to its norm"),
        Option("rescale", "1+c^2", one_of("rescale", RESCALES), "what the update is divided by"),
        Option("max_iter", DEFAULT_ITERATIONS, positive_int("max_iter"), "iterations of the interior-point solve (T > 10, and the Triton solve)"),
    ),
    solve="cagrad",
)
