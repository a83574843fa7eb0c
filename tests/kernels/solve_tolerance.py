"""How close a Triton weight solve must end to the torch path it reproduces, on any machine.

Kernel and torch path run the same float64 barrier iteration (``gradsurgery.methods._simplex``) in
another summation order, so rounding alone keeps them within ulps. But every iteration also picks the
longest rung of the step ladder whose barrier slope is ≤ 0, and where that slope is within rounding of
0 the two can pick neighbouring rungs (seen at T = 3 with MKL and NumPy restricted to SSE4.2: CAGrad's
weights then ended 1.1e-10 apart, against ulps on this machine's AVX-512 path). Neighbouring rungs are
the same direction scaled by 2^-k and 2^-(k±1), so a flip moves that iterate by at most the step taken
there, and the Newton steps after it contract the difference.

So the bounds are read off the torch path itself: twice the larger of its last two moves (in the
weights, the objective or the Frank–Wolfe gap) plus rounding. They follow the problem's conditioning
(an ill-conditioned problem moves more per iteration near the end) rather than one machine's BLAS, and
still fail a kernel that takes any other step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradsurgery.methods import _simplex

ITERATIONS = _simplex.DEFAULT_ITERATIONS
U64 = 2.0**-53  # float64 unit roundoff


def torch_path(solve: Callable[[int], torch.Tensor], iterations: int = ITERATIONS) -> list[torch.Tensor]:
    """``solve(iterations − k)`` for k = 0, 1, 2: the torch path's result and the two iterates before it."""
    return [solve(iterations - k) for k in range(3)]


def last_moves(values: list[float] | list[torch.Tensor]) -> float:
    """Twice the larger of the last two moves along a path (``values[k]`` after ``iterations − k`` steps):
    how far a rung flip in the last two iterations can move the result."""
    moves = [(torch.as_tensor(values[k]) - torch.as_tensor(values[k + 1])).abs().max().item() for k in range(2)]
    return 2 * max(moves)


def weight_tolerance(path: list[torch.Tensor]) -> float:
    """Rung flips, plus γ_T-scale rounding of the T-term sums behind each weight (weights ≤ 1), twice."""
    T = path[0].shape[0]
    return last_moves(path) + 2 * T * U64


def barrier_floor(T: int) -> float:
    """The Frank–Wolfe gap the barrier schedule can be held to at its last weight ``t = T_MAX``.

    An exactly centred point at weight t has gap ≤ T/t (with ∇f_i = (1/w_i + ν)/t on the central path,
    wᵀ∇f − min_i ∇f_i ≤ T/t); one within a unit Newton decrement of it, ≤ (T + √T)/t; and the schedule can
    leave the last iterate one doubling of t behind its centre. Below this the gap is rounding noise:
    rank-deficient Grams sit there (~1e-13), where a machine's BLAS alone moves it by 2×.
    """
    return 2 * (T + T**0.5) / _simplex.T_MAX
