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
kernels per iteration, independent of the number of parameters. A batch of problems (``(..., T)``
iterates) runs in the same kernels, each entry with its own Newton steps and its own rung of the
ladder: an entry gets what it would get alone, bit for bit.

After the last iteration the Frank–Wolfe gap ``wᵀ∇f − min_i ∇f_i`` bounds ``f(w) − f*`` (convexity);
the barrier keeps it near ``T / t_final`` on a problem normalised to ``O(1)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._cone import dot, solve


class LocalModel(NamedTuple):
    """``f`` around the current iterate ``w``."""

    grad: torch.Tensor  # ∇f(w), (..., T)
    hess: torch.Tensor  # ∇²f(w), (..., T, T)
    # (d, steps) ↦ ∇f(w + s_k·d)·d per step s_k, (..., K)
    slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    """Return ``w ∈ Δ`` (float64, on ``like``'s device) approximately minimising ``f``: ``(..., T)`` for a
    batch of independent problems, ``T = size``.

    ``like`` is ``(..., N, N)`` with ``N = _cone.padded(T)`` (the problem's matrix, padded: see ``_cone``'s
    batched linear algebra), and the iterate has ``N`` entries, those beyond ``T`` zero. ``objective(w, t)``
    returns ``f``'s gradient ``(..., N)`` and Hessian ``(..., N, N)`` at ``w`` ``(..., N)``, both zero beyond
    ``T`` (as they are when computed from a zero-padded matrix), and the slope ``∇f(w + s_k d)·d``
    ``(..., K)`` along a direction ``d`` ``(..., N)`` for every step length ``s_k`` (``steps``, ``(..., K)``)
    at once (the objectives here give it in closed form from a few scalars, far cheaper than gradients at
    every candidate). ``f`` must be convex on the simplex; a nonsmooth ``f`` may be smoothed to accuracy
    ``O(1/t)`` at barrier weight ``t`` (the barrier's own accuracy), so that its curvature never
    outgrows the barrier's while the path is followed. The barrier schedule is the same for every
    entry and each takes its own step on the ladder, so the entries of a batch never interact.
    """
    with torch.inference_mode():  # ~35 tiny ops per iteration: skipping autograd bookkeeping saves ~20%
        w = _barrier_path(objective, size, like.shape[:-2], like.shape[-1], like.device, iterations)
    return w.clone()  # an ordinary tensor again, usable anywhere outside inference mode


def _barrier_path(
    objective: Objective, size: int, batch: torch.Size, padded: int, device: torch.device, iterations: int
) -> torch.Tensor:
    # Every iteration is a few dozen kernels on T-sized tensors, so their count is the cost (a few µs
    # each on a CPU): constants are built once and fused ops (addcmul) stand in for pairs. They are built
    # on the device, never from Python data: on CUDA that copy would wait for the device. Vectors are
    # (..., N): the padding (zero weights, an identity block in the Newton matrix, so x = (1, 0) there
    # and the direction 0) rides along, and every product gives each entry of a batch what it would
    # give the entry alone (see _cone's batched linear algebra).
    w = torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
    if size == 1:
        return w.expand(*batch, 1).clone()
    w = torch.nn.functional.pad(w, (0, padded - size)).expand(*batch, padded)
    eye = torch.eye(padded, dtype=torch.float64, device=device)
    ones = torch.ones(padded, dtype=torch.float64, device=device)
    halvings = torch.full((len(_STEP_LADDER),), 0.5, dtype=torch.float64, device=device).cumprod(0)
    ladder = torch.nn.functional.pad(halvings * (-2 * _SHORTEN), (0, 1))  # −0.99·_STEP_LADDER, then 0
    last_rung = torch.zeros(len(ladder), dtype=torch.bool, device=device)
    last_rung[-1].fill_(True)
    t = 1.0
    for _ in range(iterations):
        local = objective(w, t)
        chol, info = torch.linalg.cholesky_ex(torch.addcmul(eye, local.hess, w.unsqueeze(-1) * w.unsqueeze(-2), value=t))
        # ∇f − (wᵀ∇f)·1 gives the same step along 1ᵀΔw = 0 without the common part, which, multiplied
        # by t ≈ 1e14, would cancel catastrophically against the constraint.
        centered = local.grad - dot(local.grad, w).unsqueeze(-1)
        # Right-hand sides [1 − t·w ⊙ centered, w]: the first is the Newton right-hand side negated, so
        # that eliminating the multiplier below leaves Δw/w itself rather than its negative.
        rhs = torch.stack((torch.addcmul(ones, w, centered, value=-t), w), dim=-1)
        xa, xb = solve(chol, rhs).unbind(-1)
        wxa, wxb = dot(w, xa), dot(w, xb)
        # Δw = w ⊙ relative (each weight's relative change), the multiplier of 1ᵀΔw = 0 eliminated. A
        # failed factorisation leaves a finite but meaningless partial factor (LAPACK and cuSOLVER
        # differ): it, like a NaN, yields no step. (The padding's relative change is 1: it never
        # lowers the minimum, which is ≤ 0 since wᵀrelative = 0.)
        relative = torch.addcmul(xa, (wxa / wxb).unsqueeze(-1), xb, value=-1)
        relative = torch.where(info.unsqueeze(-1) == 0, torch.nan_to_num(relative, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
        direction = w * relative
        # Longest step keeping every weight positive (shortened to stay strictly inside), at most 1.
        steps = ladder / relative.amin(dim=-1, keepdim=True).clamp_max(-_SHORTEN)  # (..., K)
        candidates = torch.addcmul(w.unsqueeze(-2), steps.unsqueeze(-1), direction.unsqueeze(-2))  # (..., K, N)
        # The barrier's slope along the ray at each step, negated: Σ Δw_i / w_i − t·∇f·Δw (over the tasks:
        # the padding's 0/0 is left out).
        moves = (direction.narrow(-1, 0, size).unsqueeze(-2) / candidates.narrow(-1, 0, size)).sum(dim=-1)
        descent = torch.sub(moves, local.slope(direction, steps), alpha=t)
        # The ladder descends, ending at 0; pick the first (longest) step where the barrier still descends.
        chosen = (descent >= 0).logical_or_(last_rung).to(torch.uint8).argmax(dim=-1, keepdim=True)
        # A gather: indexing with a tensor would read it back.
        w = candidates.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, padded)).squeeze(-2)
        w = w.div_(w.sum(dim=-1, keepdim=True))
        t = min(t * GROWTH, T_MAX)
    return w[..., :size]


def frank_wolfe_gap(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``wᵀ∇f − min_i ∇f_i``: an upper bound on ``f(w) − min_Δ f`` for convex ``f`` (per entry of a batch)."""
    return (w * grad).sum(dim=-1) - grad.amin(dim=-1)
