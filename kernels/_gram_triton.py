"""Triton kernels behind ``gram``. Imported by the launcher on first use, never at package import:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported."""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton import knobs

# Whether the kernels below were built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)


# Sizes are not specialised on (only strides are, for vector loads): one binary serves every T and P
# with the same tile width, instead of a recompile per divisibility class.
@triton.jit(do_not_specialize=["T", "P"])
def _gram_partials_kernel(
    J,
    partials,
    T,
    P,
    stride_t,
    cols_per_split,
    BT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program s sums J[:, cols] J[:, cols]ᵀ over its own contiguous column range into partials[s]:
    # the split is fixed by the launcher, so the summation order (and the bits) never vary run to run.
    split = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BT)
    row_ptrs = J + rows.to(tl.int64)[:, None] * stride_t
    row_mask = (rows < T)[:, None]
    start = split * cols_per_split
    stop = tl.minimum(start + cols_per_split, P)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for col in range(start, stop, BLOCK_P):
        cols = col + tl.arange(0, BLOCK_P)
        tile = tl.load(row_ptrs + cols[None, :], mask=row_mask & (cols < stop)[None, :], other=0.0)
        if UPCAST:
            # The interpreter multiplies bf16 tiles as raw uint16 bits (triton-lang/triton#11584, not
            # supported there); bf16 products are exact in fp32, so upcasting computes the same thing.
            tile = tile.to(tl.float32)
        # "ieee": TF32 would round fp32 inputs to 10 mantissa bits; for 16-bit inputs it changes nothing.
        acc = tl.dot(tile, tl.trans(tile), acc, input_precision="ieee")
    out = partials + split * BT * BT + rows[:, None] * BT + rows[None, :]
    tl.store(out, acc)


@triton.jit(do_not_specialize=["T", "num_splits"])
def _gram_reduce_kernel(partials, G, T, num_splits, BT: tl.constexpr, ROWS: tl.constexpr):
    # Second stage: G = Σ_s partials[s], in split order. Every (i, j) reads the upper-triangle entry
    # (min, max), so G is exactly symmetric whatever rounding the first stage did.
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, BT)[None, :]
    upper = tl.minimum(i, j) * BT + tl.maximum(i, j)
    acc = tl.zeros((ROWS, BT), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(partials + s * BT * BT + upper)
    tl.store(G + i * T + j, acc, mask=(i < T) & (j < T))


@functools.cache
def tuned_partials_kernel() -> triton.runtime.Autotuner:
    """The first stage autotuned over warps and pipeline depth only.

    The column split and ``BLOCK_P`` stay with the launcher: they set the summation order, and letting the
    autotuner pick them would make the result's last bits depend on which config won in this process.
    """
    configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps in (4, 8) for stages in (3, 4)]
    # Keyed on the tile width (and, implicitly, J's dtype), not on T or P: a handful of tunings per process.
    return triton.autotune(configs=configs, key=["BT"])(_gram_partials_kernel)
