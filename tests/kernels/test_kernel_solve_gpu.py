"""What only a GPU can show about the Triton solves: Gram → weights → combine without a host sync,
captured in a CUDA graph and replayed on new data; the compiled kernels against the torch path up to the
largest T; run-to-run determinism with real threads (the interpreter runs one thread of control)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from gradsurgery.kernels import (
    SOLVE_MAX_TASKS,
    cagrad_dual_triton,
    combine,
    gram,
    min_norm_triton,
    pcgrad_weights_triton,
)
from gradsurgery.methods import _simplex, cagrad, mgda
from gradsurgery.methods._common import normalized
from gradsurgery.methods.pcgrad import pcgrad_coefficients, random_orders
from tests.helpers import make_J
from tests.kernels.solve_tolerance import torch_path, weight_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ITERATIONS = _simplex.DEFAULT_ITERATIONS


def _normalized_on_device(G: torch.Tensor) -> torch.Tensor:
    # _common.normalized, written out so that the test does not depend on its staying sync-free.
    G = G.double()
    G = (G + G.T) / 2
    scale = G.diagonal().amax()
    return G / torch.where(scale > 0, scale, torch.ones_like(scale))


def _weights(method: str, G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    if method == "pcgrad":
        return pcgrad_weights_triton(G, orders)
    Gn = _normalized_on_device(G)
    if method == "mgda":
        return min_norm_triton(Gn, ITERATIONS)
    T = G.shape[0]
    return cagrad_dual_triton(Gn, Gn.sum(dim=1) / T, 0.4 * Gn.sum().clamp_min(0).sqrt() / T, ITERATIONS)


def _torch_weights(method: str, G: torch.Tensor, orders: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    if method == "pcgrad":
        return pcgrad_coefficients(G, orders).sum(dim=0)
    Gn = normalized(G)
    if method == "mgda":
        return mgda._min_norm(Gn, iterations)
    T = G.shape[0]
    return cagrad._solve(Gn, Gn.sum(dim=1) / T, 0.4 * Gn.sum().clamp_min(0).sqrt() / T, iterations)


def _expected(method: str, G: torch.Tensor, orders: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The torch path's weights and how far the kernel's may be from them (as in test_kernel_solve.py)."""
    if method == "pcgrad":  # the same float64 chain, T-term sums in another order: ulps of |c_i|·|G|
        expected = _torch_weights(method, G, orders)
        return expected, 1e-12 * (1 + expected.abs().max().item())
    path = torch_path(lambda iterations: _torch_weights(method, G, orders, iterations))
    return path[0], weight_tolerance(path)


def _without_host_sync(fn: Callable[[], object]) -> object:
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "cagrad"])
def test_gram_solve_combine_replays_in_a_cuda_graph(method: str) -> None:
    T, P = 7, 100_003
    gen = torch.Generator(device="cuda").manual_seed(3)
    J = make_J("conflicting", T, P, dtype=torch.float32, seed=1).cuda()
    orders = random_orders(T, generator=gen, device="cuda")
    out = torch.empty(P, device="cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        G = gram(J)
        w = _weights(method, G, orders)
        combine(w, J, out)
        return G, w

    # Compile and autotune outside the graph, on a side stream as torch.cuda.graphs recommends.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    _without_host_sync(step)  # eager: any .item() or host copy in the step path raises here
    eager = out.clone()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G, w = _without_host_sync(step)  # type: ignore[misc]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

    # New gradients and orders in the same buffers: the replay recomputes Gram, weights and update.
    J.copy_(make_J("conflicting", T, P, dtype=torch.float32, seed=2).cuda())
    orders.copy_(random_orders(T, generator=gen, device="cuda"))
    _without_host_sync(graph.replay)
    torch.cuda.synchronize()
    assert torch.equal(G, gram(J))
    expected_w, tolerance = _expected(method, G, orders)
    assert (w - expected_w).abs().max() <= tolerance
    reference = torch.empty_like(out)
    combine(w, J, reference)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("T", [17, 33, SOLVE_MAX_TASKS])
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "zero_row"])
def test_compiled_solves_match_torch_path_up_to_the_largest_T(T: int, kind: str) -> None:
    J = make_J(kind, T, 200, seed=T)
    G = (J @ J.T).cuda()
    orders = random_orders(T, generator=torch.Generator(device="cuda").manual_seed(T), device="cuda")
    for method in ("pcgrad", "mgda", "cagrad"):
        w = _weights(method, G, orders)
        expected, tolerance = _expected(method, G, orders)
        assert (w - expected).abs().max() <= tolerance, method
    Gn = normalized(G)
    alpha, ref = min_norm_triton(Gn, ITERATIONS), mgda._min_norm(Gn, ITERATIONS)
    gap = _simplex.frank_wolfe_gap(alpha, 2 * Gn @ alpha).item()
    assert gap <= max(1e-9, 2 * _simplex.frank_wolfe_gap(ref, 2 * Gn @ ref).item())


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "cagrad"])
def test_solves_are_deterministic(method: str) -> None:
    T = SOLVE_MAX_TASKS
    J = make_J("conflicting", T, 300, seed=5)
    G = (J @ J.T).float().cuda()
    orders = random_orders(T, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")
    first = _weights(method, G, orders)
    for _ in range(5):
        assert torch.equal(_weights(method, G, orders), first)
