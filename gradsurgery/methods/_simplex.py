"""Minimise a smooth convex function over the probability simplex, on device, in a fixed budget.

A primal log-barrier interior-point method: minimise ``t·f(w) − Σ log w_i`` subject to ``1ᵀw = 1``
with one equality-constrained Newton step per iteration while ``t`` grows geometrically. The Newton
system is solved in the coordinates scaled by ``w`` (``H̃ = t·W∇²fW + I``), which stays well
conditioned when some weights approach zero.

The step length is chosen from a fixed ladder of candidates, all evaluated at once: the longest one
at which the barrier's directional derivative is still non-positive (the barrier is convex along the
line, so it decreases all the way there). Derivatives rather than values, because ``t·f`` grows to
``1e14`` and differences of values would drown in rounding. ``argmax`` picks the step on the device,
so nothing travels to the host. Every operation is on ``T``-sized tensors: the cost is ~35 small
kernels per iteration, independent of the number of parameters.

After the last iteration the Frank–Wolfe gap ``wᵀ∇f − min_i ∇f_i`` bounds ``f(w) − f*`` (convexity);
the barrier keeps it near ``T / t_final`` on a problem normalised to ``O(1)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class LocalModel(NamedTuple):
    """``f`` around the current iterate ``w``."""

    grad: torch.Tensor  # ∇f(w)
    hess: torch.Tensor  # ∇²f(w)
    slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (d, steps) ↦ ∇f(w + s_k·d)·d per step s_k


Objective = Callable[[torch.Tensor, float], LocalModel]

# Barrier weight schedule on a problem normalised to O(1): t_k = GROWTH^k, capped at T_MAX, where the
# duality gap T/t is ~1e-12 for T ≤ 128 and float64 still resolves the Newton system.
GROWTH = 2.0
T_MAX = 1e14
DEFAULT_ITERATIONS = 48
_STEP_LADDER = [2.0**-k for k in range(16)]
# Steps stop short of the boundary by this factor, so that every weight stays positive.
_SHORTEN = 0.99


def minimize_on_simplex(objective: Objective, size: int, *, like: torch.Tensor, iterations: int) -> torch.Tensor:
    """Return ``w ∈ Δ`` (float64, on ``like``'s device) approximately minimising ``f``.

    ``objective(w, t)`` returns ``f``'s gradient and Hessian at ``w`` and the slope ``∇f(w + s_k d)·d``
    along a direction for every step length ``s_k`` at once (the objectives here give it in closed form
    from a few scalars, far cheaper than gradients at every candidate). ``f`` must be convex on the
    simplex; a nonsmooth ``f`` may be smoothed to accuracy ``O(1/t)`` at barrier weight ``t`` (the
    barrier's own accuracy), so that its curvature never outgrows the barrier's while the path is followed.
    """
    with torch.inference_mode():  # ~35 tiny ops per iteration: skipping autograd bookkeeping saves ~20%
        w = _barrier_path(objective, size, like.device, iterations)
    return w.clone()  # an ordinary tensor again, usable anywhere outside inference mode


def _barrier_path(objective: Objective, size: int, device: torch.device, iterations: int) -> torch.Tensor:
    # Every iteration is a few dozen kernels on T-sized tensors, so their count is the cost (a few µs
    # each on a CPU): constants are built once and fused ops (addcmul, addr) stand in for pairs. They
    # are built on the device, never from Python data: on CUDA that copy would wait for the device.
    w = torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
    if size == 1:
        return w
    eye = torch.eye(size, dtype=torch.float64, device=device)
    ones = torch.ones(size, dtype=torch.float64, device=device)
    halvings = torch.full((len(_STEP_LADDER),), 0.5, dtype=torch.float64, device=device).cumprod(0)
    ladder = torch.nn.functional.pad(halvings * (-2 * _SHORTEN), (0, 1))  # −0.99·_STEP_LADDER, then 0
    last_rung = torch.zeros(len(ladder), dtype=torch.bool, device=device)
    last_rung[-1].fill_(True)
    t = 1.0
    for _ in range(iterations):
        local = objective(w, t)
        chol, info = torch.linalg.cholesky_ex(torch.addcmul(eye, local.hess, torch.outer(w, w), value=t))
        # ∇f − (wᵀ∇f)·1 gives the same step along 1ᵀΔw = 0 without the common part, which, multiplied
        # by t ≈ 1e14, would cancel catastrophically against the constraint.
        centered = local.grad - local.grad @ w
        # Right-hand sides [1 − t·w ⊙ centered, w]: the first is the Newton right-hand side negated, so
        # that eliminating the multiplier below leaves Δw/w itself rather than its negative.
        rhs = torch.stack((torch.addcmul(ones, w, centered, value=-t), w), dim=1)
        x = torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, rhs, upper=False), upper=True)
        wx = w @ x
        # Δw = w ⊙ relative (each weight's relative change), the multiplier of 1ᵀΔw = 0 eliminated. A
        # failed factorisation leaves a finite but meaningless partial factor (LAPACK and cuSOLVER
        # differ): it, like a NaN, yields no step.
        relative = torch.addcmul(x[:, 0], wx[0] / wx[1], x[:, 1], value=-1)
        relative = torch.where(info == 0, torch.nan_to_num(relative, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
        direction = w * relative
        # Longest step keeping every weight positive (shortened to stay strictly inside), at most 1.
        steps = ladder / relative.amin().clamp_max(-_SHORTEN)
        candidates = torch.addr(w.expand(len(steps), size), steps, direction)
        # The barrier's slope along the ray at each step, negated: Σ Δw_i / w_i − t·∇f·Δw.
        descent = torch.sub((direction / candidates).sum(dim=1), local.slope(direction, steps), alpha=t)
        # The ladder descends, ending at 0; pick the first (longest) step where the barrier still descends.
        chosen = (descent >= 0).logical_or_(last_rung).to(torch.uint8).argmax(dim=0, keepdim=True)
        w = candidates.index_select(0, chosen).squeeze(0)  # indexing with a tensor would read it back
        w = w.div_(w.sum())
        t = min(t * GROWTH, T_MAX)
    return w


def frank_wolfe_gap(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``wᵀ∇f − min_i ∇f_i``: an upper bound on ``f(w) − min_Δ f`` for convex ``f``."""
    return w @ grad - grad.min()
