"""Fused kernels over the flattened ``(T, P)`` task-gradient matrix, each beside its PyTorch reference.

``gram`` / ``combine`` are the Triton launchers; ``gram_reference`` / ``combine_reference`` are the same
functions written plainly (the CPU path and the tests' ground truth). ``triton_runs_on(device)`` says
whether the launchers can serve tensors on ``device``.

Importing this package never imports Triton: the Triton kernels load on first use.

CUDA graphs. The first call of a launcher for a new tile width or dtype compiles its kernel, and the
first ``gram``/``combine`` call per key also autotunes it (timing every config, with host syncs); either
inside ``torch.cuda.graph`` aborts the capture. So warm up first: run a few eager steps with the shapes
and dtypes the graph will see, on a side stream as ``torch.cuda.graphs`` recommends, then capture::

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            opt.backward(compute_losses())
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        opt.backward(compute_losses())
        opt.step()

with ``nonfinite="propagate"`` on the wrapper (the other policies read flags back to the host, which a
capture forbids) and, for PCGrad, ``graph.register_generator_state(opt.generator)`` before capturing, so
that each replay draws new visiting orders. ``tests/kernels/test_kernel_capture_gpu.py`` runs this recipe.
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
