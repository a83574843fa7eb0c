"""Fused kernels over the flattened ``(T, P)`` task-gradient matrix, each beside its PyTorch reference.

``gram`` / ``combine`` are the Triton launchers; ``gram_reference`` / ``combine_reference`` are the same
functions written plainly (the CPU path and the tests' ground truth). ``triton_runs_on(device)`` says
whether the launchers can serve tensors on ``device``.

Importing this package never imports Triton: the Triton kernels load on first use.
"""

from ._backend import MAX_TASKS, triton_available, triton_runs_on
from .combine import combine, combine_reference
from .gram import gram, gram_reference
from .solve import SOLVE_MAX_TASKS, cagrad_dual_triton, min_norm_triton, pcgrad_weights_triton

__all__ = [
    "MAX_TASKS",
    "SOLVE_MAX_TASKS",
    "cagrad_dual_triton",
    "combine",
    "combine_reference",
    "gram",
    "gram_reference",
    "min_norm_triton",
    "pcgrad_weights_triton",
    "triton_available",
    "triton_runs_on",
]
