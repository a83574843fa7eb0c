"""Gram matrix ``G = J Jᵀ`` of the ``(T, P)`` task-gradient matrix.

``gram_reference`` is the plain PyTorch definition: the CPU path and the ground truth that the Triton
kernel is tested against. ``gram`` is the Triton launcher (kernels in ``_gram_triton``, loaded on first use).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from ._checks import accumulation_dtype, check_matrix, check_triton_matrix

# Elements converted to the accumulation dtype at a time for half-precision inputs: a 2 MiB fp32
# temporary that stays in cache for the product. Measured on the CPU (bf16, T = 2–16): 2.2–2.8× faster
# than 2^22 (16 MiB), whose peak also ate a third of what bf16 storage saves in a training step.
_CHUNK_ELEMENTS = 1 << 19
# Elements per block of the fp32/fp64 reference (4 MiB of fp32): measured best on the CPU from T = 2
# (2^19 columns) to T = 32 (2^15); one (T × P)·(P × T) product is 2× slower at T = 8, P = 4M.
_BLOCK_ELEMENTS = 1 << 20
# Second stage: entries of the flattened (BT, BT) tile per program, and partial Grams read per step
# (a (16, 256) fp32 tile: 32 registers per thread at 4 warps).
_REDUCE_BLOCK = 256
_REDUCE_SPLITS = 16
# Stated, not left to Triton's default (which 3.10 flips): the default changing would change the bits.
_FP_FUSION = True


def gram_reference(J: torch.Tensor) -> torch.Tensor:
    """Return ``J @ J.T`` accumulated in fp32 (fp64 for fp64 input), shape ``(T, T)`` — or ``(..., T, T)``
    for a batch ``(..., T, P)`` of independent matrices, each summed as the unbatched one would be.

    Summed over column blocks: BLAS runs a ``(T × P)·(P × T)`` product with small ``T`` and large ``P``
    poorly (measured 2× slower at T = 8, P = 4M on the CPU; 1.45× at T = 2, P = 16M), and
    half-precision blocks are converted one at a time instead of copying all of ``J``.
    """
    check_matrix(J, "J")
    acc = accumulation_dtype(J.dtype)
    T, P = J.shape[-2:]
    step = max(1, (_BLOCK_ELEMENTS if J.dtype == acc else _CHUNK_ELEMENTS) // max(T, 1))
    if J.dtype == acc and 0 < P <= step:
        return J @ J.mT  # one block: skip the accumulator (what a small model pays per step)
    G = torch.zeros(*J.shape[:-2], T, T, dtype=acc, device=J.device)
    for start in range(0, P, step):
        block = J[..., start : start + step].to(acc)
        G.add_(block @ block.mT) if J.dim() > 2 else G.addmm_(block, block.mT)
    return G


class GramPlan(NamedTuple):
    """How ``gram`` splits the columns; it fixes the summation order, hence the result's bits."""

    block_t: int  # T padded to a power of two ≥ 16 (tl.dot's smallest tile on GPUs)
    block_p: int  # columns per tl.dot
    cols_per_split: int  # columns summed by one first-stage program (a multiple of block_p)
    num_splits: int  # first-stage programs = partial Grams summed by the second stage


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gram_plan(T: int, P: int, *, interpreted: bool, max_splits: int) -> GramPlan:
    """The column split ``gram`` uses for a ``(T, P)`` matrix (``P >= 1``)."""
    block_t = max(16, 1 << (T - 1).bit_length())
    if interpreted:
        # Each interpreted tl.dot is one NumPy matmul: few, wide tiles keep the Python overhead down.
        block_p = (1 << 16) // block_t
        min_cols = block_p
    else:
        # 16 KiB of fp32 per tile; at least 8·block_t columns per program, so the partial Grams written
        # and re-read (block_t² floats each) stay a small fraction of the traffic over J.
        block_p = 4096 // block_t
        min_cols = 8 * block_t
    blocks = _cdiv(P, block_p)
    blocks_per_split = max(_cdiv(blocks, max_splits), _cdiv(min_cols, block_p))
    cols_per_split = blocks_per_split * block_p
    return GramPlan(block_t, block_p, cols_per_split, _cdiv(P, cols_per_split))


def gram(J: torch.Tensor) -> torch.Tensor:
    """Triton ``J @ J.T`` in fp32, shape ``(T, T)``, exactly symmetric and bit-reproducible; a batch
    ``(..., T, P)`` of independent matrices gives ``(..., T, T)`` in one launch (a grid axis per batch
    entry), each entry's bits those of the unbatched call.

    ``J`` is fp32/fp16/bf16 with ``1 <= T <= 128`` and contiguous rows (``stride(-1) == 1``;
    ``stride(-2) >= P`` is fine). fp32 inputs are multiplied in full fp32 (no TF32). A deterministic
    two-stage split-K: per-program partial Grams over fixed column ranges, then a second kernel sums them
    in a fixed order — no atomics.
    """
    check_triton_matrix(J, "J")
    batch, (T, P) = J.shape[:-2], J.shape[-2:]
    if P == 0:
        return torch.zeros(*batch, T, T, dtype=torch.float32, device=J.device)
    flat = J.reshape(-1, T, P)
    B = flat.shape[0]
    if B == 0:
        return torch.zeros(*batch, T, T, dtype=torch.float32, device=J.device)
    from . import _gram_triton as kernels

    on_cuda = J.device.type == "cuda"
    max_splits = 4 * _multiprocessor_count(J.device.index or 0) if on_cuda else 4
    plan = gram_plan(T, P, interpreted=kernels.INTERPRETED, max_splits=max_splits)
    partials = torch.empty(B, plan.num_splits, plan.block_t, plan.block_t, dtype=torch.float32, device=J.device)
    G = torch.empty(B, T, T, dtype=torch.float32, device=J.device)
    first = kernels._gram_partials_kernel if kernels.INTERPRETED else kernels.tuned_partials_kernel()
    stride_t = flat.stride(1) if T > 1 else 0
    with torch.cuda.device(J.device) if on_cuda else contextlib.nullcontext():
        first[(plan.num_splits, B)](
            flat,
            partials,
            T,
            P,
            flat.stride(0),
            stride_t,
            plan.cols_per_split,
            BT=plan.block_t,
            BLOCK_P=plan.block_p,
            UPCAST=kernels.INTERPRETED and J.dtype == torch.bfloat16,
            enable_fp_fusion=_FP_FUSION,
        )
        kernels._gram_reduce_kernel[(_cdiv(plan.block_t * plan.block_t, _REDUCE_BLOCK), B)](
            partials, G, T, plan.num_splits, BT=plan.block_t, BLOCK_E=_REDUCE_BLOCK, SPLITS=_REDUCE_SPLITS,
            enable_fp_fusion=_FP_FUSION,
        )  # fmt: skip
    return G.reshape(*batch, T, T)

