"""Minimise a smooth convex function over the probability simplex, on device, in a fixed budget.

A primal log-barrier interior-point method: minimise ``t·f(w) − Σ log w_i`` subject to ``1ᵀw = 1``
with one equality-constrained Newton step per iteration while ``t`` grows geometrically. The Newton
system is solved in the coordinates scaled by ``w`` (``H̃ = t·W∇²fW + I``), which stays well
conditioned when some weights approach zero.

The step length is chosen from a fixed ladder of candidates, all evaluated at once: the longest one
at which the barrier's directional derivative is still non-positive (the barrier is convex along the
line, so it decreases all the way there). Derivatives rather than values, because ``t·f`` grows to
``1e14`` and differences of values would drown in rounding. ``argmax`` picks the step on the device,
so nothing travels to the host. Every operation is on ``T``-sized tensors: the cost is ~40 small
kernels per iteration, independent of the number of parameters.

After the last iteration the Frank–Wolfe gap ``wᵀ∇f − min_i ∇f_i`` bounds ``f(w) − f*`` (convexity);
the barrier keeps it near ``T / t_final`` on a problem normalised to ``O(1)``.
"""

from __future__ import annotations

from typing import Callable

import torch

Derivatives = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Slope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# Barrier weight schedule on a problem normalised to O(1): t_k = GROWTH^k, capped at T_MAX, where the
# duality gap T/t is ~1e-12 for T ≤ 128 and float64 still resolves the Newton system.
GROWTH = 2.0
T_MAX = 1e14
DEFAULT_ITERATIONS = 48
_STEP_LADDER = [2.0**-k for k in range(16)]


def minimize_on_simplex(
    derivatives: Derivatives, slope: Slope, size: int, *, like: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Return ``w ∈ Δ`` (float64, on ``like``'s device) approximately minimising ``f``.

    ``derivatives(w, t)`` returns ``(∇f(w), ∇²f(w))``; ``slope(w, d, s, t)`` returns ``∇f(w + s_k d)·d``
    for each step length ``s_k`` (the objectives here give it in closed form from a few scalars, far
    cheaper than gradients at every candidate). ``f`` must be convex on the simplex; a nonsmooth ``f``
    may be smoothed to accuracy ``O(1/t)`` at barrier weight ``t`` (the barrier's own accuracy), so that
    its curvature never outgrows the barrier's while the path is followed.
    """
    with torch.inference_mode():  # ~45 tiny ops per iteration: skipping autograd bookkeeping saves ~20%
        w = _barrier_path(derivatives, slope, size, like.device, iterations)
    return w.clone()  # an ordinary tensor again, usable anywhere outside inference mode


def _barrier_path(derivatives: Derivatives, slope: Slope, size: int, device: torch.device, iterations: int) -> torch.Tensor:
    w = torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
    if size == 1:
        return w
    eye = torch.eye(size, dtype=torch.float64, device=device)
    ladder = torch.tensor(_STEP_LADDER + [0.0], dtype=torch.float64, device=device)
    t = 1.0
    for _ in range(iterations):
        grad, hess = derivatives(w, t)
        chol, info = torch.linalg.cholesky_ex(torch.addcmul(eye, hess, torch.outer(w, w), value=t))
        rhs = torch.stack((w * (t * _centered(grad, w)) - 1.0, w), dim=1)
        a, b = torch.cholesky_solve(rhs, chol).unbind(1)
        # Δw = −w ⊙ relative. A failed factorisation leaves a finite but meaningless partial factor
        # (LAPACK and cuSOLVER differ): it, like a NaN, yields no step.
        relative = torch.nan_to_num(a - (w @ a) / (w @ b) * b, nan=0.0, posinf=0.0, neginf=0.0)
        relative = torch.where(info == 0, relative, torch.zeros_like(relative))
        direction = -w * relative
        # Longest step keeping every weight positive (shortened to stay strictly inside), at most 1.
        steps = ladder * (0.99 / relative.amax().clamp_min(0.99))
        candidates = torch.addr(w.expand(len(steps), size), steps, direction)
        barrier_slope = t * slope(w, direction, steps, t) - (direction / candidates).sum(dim=1)
        # The ladder descends, ending at 0; pick the first (longest) step with slope ≤ 0.
        chosen = ((barrier_slope <= 0) | (steps == 0)).to(torch.uint8).argmax(dim=0, keepdim=True)
        w = candidates.index_select(0, chosen).squeeze(0)  # indexing with a tensor would read it back
        w = w / w.sum()
        t = min(t * GROWTH, T_MAX)
    return w


def _centered(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``∇f − (wᵀ∇f)·1``: the same Newton step and slope along ``1ᵀΔw = 0``, without the common part.

    Multiplied by ``t ≈ 1e14``, the common part would cancel catastrophically against the constraint.
    """
    return grad - (grad * w).sum(dim=-1, keepdim=True)


def frank_wolfe_gap(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``wᵀ∇f − min_i ∇f_i``: an upper bound on ``f(w) − min_Δ f`` for convex ``f``."""
    return w @ grad - grad.min()
