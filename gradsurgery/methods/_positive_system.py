"""Solve ``G w = w^(−p)`` (elementwise power) for ``w > 0``, on device, in a fixed budget.

Nash-MTL (``p = 1``: ``w_i (Gw)_i = 1``) and FairGrad (``p = 1/α``) choose their weights this way. The
solution is the minimiser of the strictly convex ::

    F(w) = ½ wᵀGw − Σ_i h(w_i),    h'(w) = w^(−p)    (h = log w for p = 1, w^(1−p)/(1−p) otherwise)

on ``w > 0``: its Hessian ``G + diag(p·w^(−p−1))`` is positive definite even when ``G`` is singular. ``F``
has a minimiser exactly when some ``d`` has ``g_i·d > 0`` for every task, i.e. when ``0`` is not in the
convex hull of the gradients (Gordan's alternative; MGDA's min-norm point is then non-zero): then
``vᵀGv > 0`` for every ``v ≥ 0, v ≠ 0`` and ``F`` grows without bound towards every edge of the orthant.
Otherwise some ``v ≥ 0, v ≠ 0`` has ``Gv = 0``, ``F`` decreases without bound along it, and every
``w > 0`` has ``(Gw)_i ≤ 0`` for some ``i``: the system has no solution.

**Scaling.** A zero gradient (``G_ii = 0``) can never have ``(Gw)_i > 0``: such a task is left out (its
row and column are replaced by an identity row, which decouples it) and its weight is 0. The others
are solved on the correlation matrix ``C = D^(−½) G D^(−½)`` (``D = diag G``) with ``w_i = y_i/sqrt(G_ii)``,
which turns the system into ``Cy = κ ⊙ y^(−p)``, ``κ_i = G_ii^((p−1)/2)`` (``κ = 1`` for ``p = 1``: Nash-MTL
does not see the gradients' lengths at all). For ``p ≠ 1``, ``κ`` is computed on ``G / max_i G_ii`` and
the weights multiplied back by the homogeneity factor (``w(sG) = s^(−1/(1+p))·w(G)``).

**Newton.** Start from the exact solution for orthogonal gradients, ``u = κ^(1/(1+p))``, rescaled to
``F``'s minimum along its ray (a closed form). Each iteration takes a Newton step for ``F`` in the
coordinates scaled by ``σ = sqrt(y^(p+1)/κ)``, where the Hessian is ``ΣCΣ + p·I`` (``YCY + I`` for
``p = 1``: well conditioned whatever the weights' range). The step length is chosen on a fixed ladder
of candidates (``8, 4, 2, 1``, then ``1 − 2^−k`` down to ½, then ``2^−k`` down to ``2^−12``, then 0;
shortened so that every weight stays positive), all evaluated at once: ``F`` is convex along the line,
so the longest candidate where its slope is still ``≤ 0`` decreases it. The candidates just below 1
let a nearly exact Newton step be taken nearly whole, which keeps the convergence quadratic. The
choice is made on the device: nothing is read back to the host, and every operation is on ``T``-sized
tensors with any leading batch dimensions (``G`` of shape ``(..., T, T)``). An entry of a batch gets what
it would get alone: bit for bit for ``p = 1`` (Nash-MTL); for other ``p`` (FairGrad) to rounding
(~1e-16 relative), since ``x^p`` (``κ`` and the start) is computed by torch's vectorised or scalar kernel
depending on where an element falls in the batch, and the two round differently.

**Acceptance.** A solve is accepted when (1) its backward error ``max_i |(Cy)_i − κ_i y_i^(−p)| /
(Σ_j |C_ij| y_j + κ_i y_i^(−p))`` is at most ``ACCEPT`` (1e-8; a converged solve is at ~1e-16·T), i.e.
``w`` solves the system for a ``G`` perturbed by that relative amount, and (2) the weighted gradients
do not cancel by more than ``MAX_CANCELLATION`` (1e4): ``Σ_i w_i ‖g_i‖ ≤ 1e4·‖d‖``. A system without a
solution fails (1) or (2) (the iterates diverge and ``d`` shrinks relative to them), and so does one
within about 1e-4 (in angle) of having none, whose weights, ~1e4 times the others, would make
``d = wᵀJ`` lose more than four digits to cancellation. Those, and a solve not accepted within the
budget, return all-zero weights: the update ``d = 0``, which is also MGDA's there (its min-norm point
is 0). NaN or infinite entries in ``G`` give NaN weights.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._common import symmetric64
from ._cone import padded, solve

ACCEPT = 1e-8
MAX_CANCELLATION = 1e4
# The step ladder: 8, 4, 2, 1, then 1 − 2^-k for k = FINE … 1, then 2^-k for k = 2 … COARSE − 1, then 0.
_LONGEST = 8.0
_FINE = 40
_COARSE = 13
# Candidate steps stop short of the boundary by this factor, so that every weight stays positive.
_SHORTEN = 0.99


class PowerSystemSolution(NamedTuple):
    weights: torch.Tensor  # (..., T) float64: w, or zeros where the solve is not accepted
    error: torch.Tensor  # (...,) the backward error of the solve (before the fallback to zeros)
    cancellation: torch.Tensor  # (...,) Σ_i w_i‖g_i‖ / ‖d‖ (NaN or inf when d = 0)


def solve_power_system(G: torch.Tensor, power: float, *, max_iter: int) -> PowerSystemSolution:
    """``w`` (float64) with ``G w = w^(−power)``, ``w > 0``, for ``G`` of shape ``(..., T, T)`` (any float dtype,
    symmetrised in float64): see the module docstring for zero gradients and systems without a solution."""
    batch, size = G.shape[:-2], G.shape[-1]
    # One batch dimension (1 for a single problem): an entry of a batch then runs the same kernels as
    # the unbatched call, which keeps the two bit-identical.
    G = symmetric64(G.reshape(-1, size, size))
    nash = power == 1.0
    eye, ladder, zero, one = _constants(size, G.device)
    diagonal = G.diagonal(dim1=-2, dim2=-1)[..., None]  # vectors are columns, (..., T, 1), throughout
    active = diagonal > 0
    safe = torch.where(active, diagonal, one)
    root = safe.sqrt()
    # (torch.logical_and rather than `&`, whose Python-level wrapper costs ~10 µs a call.)
    C = torch.where(torch.logical_and(active, active.mT), G / (root * root.mT), eye)
    C.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # exactly: G_ii / sqrt(G_ii)² is 1 only up to rounding
    kappa: torch.Tensor | None = None  # None: Nash-MTL's κ = 1
    scale: torch.Tensor | None = None
    if not nash:
        scale = safe.amax(dim=-2, keepdim=True)
        kappa = (safe / scale).pow((power - 1.0) / 2.0)
    if size == 1:
        y = torch.ones_like(root) if kappa is None else kappa.pow(1.0 / (1.0 + power))
    elif size == 2 and nash:
        y = _nash_two(C, one)
    else:
        with torch.inference_mode():  # ~30 tiny ops per iteration: no autograd bookkeeping
            y = _newton(C, kappa, power, max_iter, eye, ladder, one).clone()
    error, cancellation = _diagnose(C, kappa, power, y, active, zero)
    w = y / root if scale is None else y / root * scale.pow((power - 1.0) / (2.0 * (power + 1.0)))
    accepted = torch.logical_and(active, (error <= ACCEPT).logical_and_(cancellation <= MAX_CANCELLATION))
    w = torch.where(accepted, w, zero)
    # NaN (or ±inf) anywhere in G: NaN weights, for the caller's finiteness check.
    poison = G.sum(dim=(-2, -1))[..., None, None] * 0
    return PowerSystemSolution(
        (w + poison).reshape(*batch, size), error.reshape(batch), cancellation.reshape(batch)
    )


def check_max_norm(max_norm: float | None) -> None:
    if max_norm is None:
        return
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not (0 < max_norm < math.inf):
        raise ValueError(f"max_norm must be None or a finite number > 0, got {max_norm!r}")


def check_max_iter(max_iter: int) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")


def clip_to_norm(w: torch.Tensor, G: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``w·min(1, max_norm/‖d‖)`` with ``‖d‖² = wᵀGw`` (``w`` unchanged for ``max_norm=None``)."""
    if max_norm is None:
        return w
    Gw = (symmetric64(G) * w[..., None, :]).sum(dim=-1)
    norm = (w * Gw).sum(dim=-1, keepdim=True).clamp_min(0).sqrt()
    return w * (max_norm / norm.clamp_min(max_norm))  # a factor ≤ 1; 1 for d = 0


def _diagnose(
    C: torch.Tensor, kappa: torch.Tensor | None, power: float, y: torch.Tensor, active: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward error over the active tasks and the cancellation ``Σ_i y_i / sqrt(yᵀCy)`` over them
    (NaN or inf when ``yᵀCy ≤ 0``), both ``(..., 1, 1)``. The inactive tasks' rows of ``C`` are identity rows,
    so zeroing their ``y`` leaves ``Cy`` unchanged on the active rows."""
    push = y.reciprocal() if kappa is None else kappa * y.pow(-power)
    y = torch.where(active, y, zero)
    Cy = _times(C, y)
    error = (Cy - push).abs() / (_times(C.abs(), y) + push)
    error = torch.where(active, error, zero).amax(dim=-2, keepdim=True)
    norm_sq = torch.linalg.vecdot(y, Cy, dim=-2)[..., None]
    mass = y.sum(dim=-2, keepdim=True)
    cancellation = mass / norm_sq.sqrt()  # NaN or inf, never accepted, for norm_sq ≤ 0
    return error, cancellation


def _nash_two(C: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    # y_1(y_1 + c·y_2) = 1 = y_2(y_2 + c·y_1) ⇒ (y_1 − y_2)(y_1 + y_2) = 0 ⇒ y_1 = y_2 = 1/sqrt(1 + c);
    # no solution when c = −1 (antiparallel), and the acceptance test rejects what is within
    # rounding of it.
    margin = 1 + C[..., :1, 1:]
    return torch.where(margin > 0, margin, one).rsqrt().expand(*C.shape[:-1], 1)


@functools.lru_cache(maxsize=64)
def _constants(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The identity, the step ladder (a row, longest first, negated and scaled by 0.99/8: see
    ``_newton``), 0 and 1, built once per size and device (never from Python data, which on CUDA
    would wait for the device)."""
    eye = torch.eye(size, dtype=torch.float64, device=device)
    halvings = torch.full((_FINE,), 0.5, dtype=torch.float64, device=device).cumprod(0)  # 2^-1 … 2^-FINE
    long = torch.full((4,), 2.0, dtype=torch.float64, device=device).cumprod(0) / 2  # 1, 2, 4, 8
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rungs = torch.cat((long.flip(0), (1 - halvings).flip(0), halvings[1 : _COARSE - 1], zero[None]))
    return eye, (rungs * (-_SHORTEN / _LONGEST))[None, :], zero, zero + 1


def _newton(
    C: torch.Tensor,
    kappa: torch.Tensor | None,
    power: float,
    iterations: int,
    eye: torch.Tensor,
    ladder: torch.Tensor,
    one: torch.Tensor,
) -> torch.Tensor:
    # Every iteration is ~30 kernels on T-sized tensors, so their count is the cost (~1 µs each on a
    # CPU): vectors stay columns (no reshaping) and the constants come built.
    # The Newton matrix is factorised padded to N = _cone.padded(T) rows (an identity block beyond T),
    # where every entry of a batch is solved as it would be alone (see _cone's batched linear algebra).
    size = C.shape[-1]
    extra = padded(size) - size
    eye_p = torch.nn.functional.pad(eye if kappa is None else eye * power, (0, extra, 0, extra))
    eye_p.diagonal()[size:].fill_(1.0)
    C_p = torch.nn.functional.pad(C, (0, extra, 0, extra))
    # The start: the solution for orthogonal gradients, u = κ^(1/(1+p)), times F's minimiser along its
    # ray, c: c·uᵀCu = c^(−p)·Σ_i κ_i u_i^(1−p), i.e. c^(1+p) = Σ_i u_i² / uᵀCu (κ_i = u_i^(1+p)).
    if kappa is None:
        curvature = C.sum(dim=(-2, -1), keepdim=True)  # u = 1
        y = (C.shape[-1] / torch.where(curvature > 0, curvature, one)).sqrt().expand_as(C[..., :1])
    else:
        u = kappa.pow(1.0 / (1.0 + power))
        curvature = torch.linalg.vecdot(u, _times(C, u), dim=-2)[..., None]
        length_sq = torch.linalg.vecdot(u, u, dim=-2)[..., None]
        y = u * (length_sq / torch.where(curvature > 0, curvature, one)).pow(1.0 / (1.0 + power))
    for _ in range(iterations):
        Cy = _times(C, y)
        push = y.reciprocal() if kappa is None else kappa * y.pow(-power)  # κ·h'(y): the barrier's push outwards
        sigma = y if kappa is None else (y / push).sqrt()  # sqrt(y^(p+1)/κ), where the Hessian is ΣCΣ + p·I
        # K = ΣCΣ + p·I ⪰ p·I. Two triangular solves rather than cholesky_solve, which checks for
        # errors (a host read). A failed factorisation (C indefinite by rounding, with huge weights)
        # leaves a meaningless partial factor: its direction is taken only as far as F descends.
        sigma_p = torch.nn.functional.pad(sigma, (0, 0, 0, extra))
        chol, _ = torch.linalg.cholesky_ex(torch.addcmul(eye_p, C_p, sigma_p * sigma_p.mT))
        rhs = sigma * (push - Cy)  # −Σ∇F
        step = sigma * solve(chol, rhs).nan_to_num_(0.0, 0.0, 0.0)
        # The ladder's steps, the longest stopping at most 0.99 of the way to the boundary y > 0.
        steps = ladder / (step / y).amin(dim=-2, keepdim=True).clamp_max(-_SHORTEN / _LONGEST)
        candidates = torch.addcmul(y, step, steps)  # (..., T, K)
        # F's slope along the step at each candidate y + sΔ: Δᵀ(C(y + sΔ)) − Σ_i κ_i Δ_i (y_i + sΔ_i)^(−p).
        pushed = candidates.reciprocal() if kappa is None else kappa * candidates.pow(-power)
        slopes = torch.linalg.vecdot(_times(C, step), candidates, dim=-2) - torch.linalg.vecdot(step, pushed, dim=-2)
        slopes = slopes.unsqueeze(-2)
        # F is convex along the line, so the slopes fall along the ladder, and the longest candidate
        # whose slope is still ≤ 0 (the first after those > 0; the last, step 0, has slope ∇F·Δ ≤ 0)
        # decreases F.
        first = (slopes[..., :-1] > 0).sum(dim=-1, keepdim=True)
        y = torch.addcmul(y, steps.gather(-1, first), step)
    return y


def _times(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M v`` for a column ``v`` ``(..., T, 1)``: products and a sum per row, which give each entry of a batch
    what it would give the entry alone (BLAS need not: see ``_cone``'s batched linear algebra)."""
    product: torch.Tensor = torch.linalg.vecdot(M, v.mT)
    return product.unsqueeze(-1)
