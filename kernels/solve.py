"""The T×T weight solves on the device: PCGrad's projection chains, MGDA's min-norm point and CAGrad's dual.

Each launcher runs one single-program Triton kernel (kernels in ``_solve_triton``, loaded on first use)
on the ``(T, T)`` Gram matrix and returns float64 weights on its device, so that Gram → weights →
combine runs without a host sync and can be captured in a CUDA graph. Their pure-PyTorch references,
and the definitions they reproduce, are the solvers of ``gradsurgery.methods`` (``pcgrad_coefficients``,
``_simplex.minimize_on_simplex`` with MGDA's and CAGrad's objectives); this package imports nothing from
``gradsurgery``, so the launchers take plain tensors and the callers there do the option handling.

float64 throughout, as the torch path: the barrier weight ``t`` reaches ``1e14``, where fp32 could not
resolve the Newton system. A solve is one program walking a dependent chain of ``2T`` Cholesky and
substitution steps per iteration (``iterations · 2T`` in all, each a few tile-wide reductions), so its
latency, not its arithmetic, sets its cost; it replaces the torch path's hundreds of tiny launches.
"""

from __future__ import annotations

import contextlib

import torch

from ._checks import check_triton_device

# The whole (BT, BT) float64 problem lives in one program's registers: G and the Hessian with its
# Cholesky factor, two 64×64 tiles of doubles at most. What ptxas makes of it depends on the Triton
# release (sm_90, bench/gpu_resources.py): at BT = 64 (T = 33–64) with 8 warps, Triton 3.9 uses 250–255
# registers per thread and spills ≤ 84 bytes (MGDA; CAGrad and PCGrad none), while Triton 3.6 — the
# H200 image's — uses 255 and spills 320–600 bytes per thread in both simplex kernels. BT ≤ 32 spills
# ≤ 24 bytes on either. BT = 128 would spill kilobytes per thread.
SOLVE_MAX_TASKS = 64
SOLVE_DTYPES = (torch.float32, torch.float64)
# Separately rounded multiplies and adds, as the torch path computes them (no fused multiply-add).
_FP_FUSION = False


def _block(T: int) -> int:
    """T padded to a power of two ≥ 16."""
    return max(16, 1 << (T - 1).bit_length())


def _num_warps(block: int) -> int:
    return 4 if block <= 32 else 8


def _device_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_gram(G: torch.Tensor, name: str) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{name} must be a square (T, T) matrix, got shape {tuple(G.shape)}")
    T = G.shape[0]
    if not 1 <= T <= SOLVE_MAX_TASKS:
        raise ValueError(f"{name} has T={T} tasks; the Triton solves serve 1 <= T <= {SOLVE_MAX_TASKS}")
    if G.dtype not in SOLVE_DTYPES:
        raise ValueError(f"{name} has dtype {G.dtype}; the Triton solves take one of {SOLVE_DTYPES}")
    check_triton_device(G, name)


def _check_iterations(iterations: int) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an int ≥ 1, got {iterations!r}")


def _check_vector(v: torch.Tensor, name: str, T: int, device: torch.device) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != T:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length T={T}, got {shape}")
    if v.dtype not in SOLVE_DTYPES:
        raise ValueError(f"{name} has dtype {v.dtype}; the Triton solves take one of {SOLVE_DTYPES}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but G is on {device}")


def pcgrad_weights_triton(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``w = Σ_i c_i`` of the PCGrad chains (float64, shape ``(T,)``), as ``pcgrad_coefficients(G, orders).sum(0)``.

    ``G`` is the ``(T, T)`` Gram matrix (fp32 or fp64, any strides), symmetrised in float64 as the torch
    path does; ``orders`` is the ``(T, T − 1)`` int64 visiting order on G's device (``random_orders``).
    Its values are not checked (that would read them on the host): entries outside ``[0, T)`` give
    unspecified weights, never an out-of-bounds access.
    """
    _check_gram(G, "G")
    T = G.shape[0]
    if not isinstance(orders, torch.Tensor):
        raise TypeError(f"orders must be a torch.Tensor, got {type(orders).__name__}")
    if tuple(orders.shape) != (T, T - 1):
        raise ValueError(f"orders must have shape (T, T - 1) = {(T, T - 1)}, got {tuple(orders.shape)}")
    if orders.dtype != torch.int64:
        raise ValueError(f"orders must have dtype torch.int64, got {orders.dtype}")
    if orders.device != G.device:
        raise ValueError(f"orders is on {orders.device} but G is on {G.device}")
    from . import _solve_triton as kernels

    w = torch.empty(T, dtype=torch.float64, device=G.device)
    block = _block(T)
    with _device_context(G.device):
        kernels._pcgrad_kernel[(1,)](
            G, orders, w, T, G.stride(0), G.stride(1), orders.stride(0), orders.stride(1) if T > 1 else 0,
            BT=block, num_warps=_num_warps(block), enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return w


def _simplex(G: torch.Tensor, b: torch.Tensor | None, phi: torch.Tensor | None, iterations: int) -> torch.Tensor:
    from . import _solve_triton as kernels

    T = G.shape[0]
    w = torch.empty(T, dtype=torch.float64, device=G.device)
    cagrad = b is not None
    block = _block(T)
    with _device_context(G.device):
        kernels._simplex_kernel[(1,)](
            G, b if b is not None else G, phi if phi is not None else G, w, T, G.stride(0), G.stride(1),
            b.stride(0) if b is not None else 0, iterations,
            BT=block, CAGRAD=cagrad, num_warps=_num_warps(block), enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return w


def min_norm_triton(G_normalized: torch.Tensor, iterations: int) -> torch.Tensor:
    """MGDA's ``argmin_{w ∈ Δ} wᵀ G w`` (float64, shape ``(T,)``) after ``iterations`` barrier steps.

    The same computation as ``gradsurgery.methods.mgda._min_norm``: ``minimize_on_simplex`` with
    ``∇f = 2Gw``, ``∇²f = 2G``. ``G_normalized`` is symmetric with largest diagonal entry 1 (or all ≤ 0),
    as ``_common.normalized`` returns it (the barrier schedule assumes an O(1) problem); fp32 or fp64.
    """
    _check_gram(G_normalized, "G_normalized")
    _check_iterations(iterations)
    return _simplex(G_normalized, None, None, iterations)


def cagrad_dual_triton(
    G_normalized: torch.Tensor, b: torch.Tensor, phi: torch.Tensor | float, iterations: int
) -> torch.Tensor:
    """CAGrad's ``argmin_{w ∈ Δ} wᵀb + φ·sqrt(wᵀGw)`` (float64, shape ``(T,)``) after ``iterations`` steps.

    The same computation as ``gradsurgery.methods.cagrad._solve``, with ``‖g_w‖`` smoothed to
    ``sqrt(wᵀGw + 1/t²)`` along the barrier path. ``G_normalized`` as for ``min_norm_triton``; ``b`` the
    ``(T,)`` vector ``G·1/T``; ``phi`` a one-element tensor on G's device (read there, not on the host)
    or a Python number.
    """
    _check_gram(G_normalized, "G_normalized")
    _check_iterations(iterations)
    T = G_normalized.shape[0]
    _check_vector(b, "b", T, G_normalized.device)
    if isinstance(phi, (int, float)) and not isinstance(phi, bool):
        phi = torch.full((), float(phi), dtype=torch.float64, device=G_normalized.device)
    if not isinstance(phi, torch.Tensor) or phi.numel() != 1:
        shape = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
        raise ValueError(f"phi must be a number or a one-element tensor, got {shape}")
    if phi.dtype not in SOLVE_DTYPES:
        raise ValueError(f"phi has dtype {phi.dtype}; the Triton solves take one of {SOLVE_DTYPES}")
    if phi.device != G_normalized.device:
        raise ValueError(f"phi is on {phi.device} but G_normalized is on {G_normalized.device}")
    return _simplex(G_normalized, b, phi.reshape(()), iterations)
