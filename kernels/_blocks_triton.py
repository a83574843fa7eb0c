"""Triton kernels behind ``gram_blocks`` and ``combine_blocks``. Imported by the launchers on first use,
never at package import: ``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported."""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from ._jit import jit

INTERPRETED: bool = bool(knobs.runtime.interpret)


@jit(do_not_specialize=["T"])
def _segment_partials_kernel(
    J,
    partials,
    split_start,
    split_stop,
    T,
    stride_t,
    BT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program s sums J[:, start:stop] J[:, start:stop]ᵀ over the column range the plan gave it (one
    # block's, never two): the first stage of ``gram``, with the ranges read from the plan.
    split = tl.program_id(0).to(tl.int64)
    start = tl.load(split_start + split)
    stop = tl.load(split_stop + split)
    rows = tl.arange(0, BT)
    row_ptrs = J + rows.to(tl.int64)[:, None] * stride_t
    row_mask = (rows < T)[:, None]
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for col in range(start, stop, BLOCK_P):
        cols = col + tl.arange(0, BLOCK_P)
        tile = tl.load(row_ptrs + cols[None, :], mask=row_mask & (cols < stop)[None, :], other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)  # the interpreter's bf16 tl.dot: see _gram_triton
        acc = tl.dot(tile, tl.trans(tile), acc, input_precision="ieee")
    out = partials + split * BT * BT + rows[:, None] * BT + rows[None, :]
    tl.store(out, acc)


@jit(do_not_specialize=["T"])
def _block_reduce_kernel(
    partials, G, block_first, block_count, T, BT: tl.constexpr, BLOCK_E: tl.constexpr, SPLITS: tl.constexpr
):
    # Second stage per block: G[b] = Σ partials[first_b : first_b + count_b], SPLITS at a time in split
    # order (a fixed order: the same bits on every run), reading the upper triangle so that each G[b] is
    # exactly symmetric.
    block = tl.program_id(1).to(tl.int64)
    first = tl.load(block_first + block)
    count = tl.load(block_count + block)
    partials += first * (BT * BT)
    G += block * T * T
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    i = e // BT
    j = e % BT
    upper = (tl.minimum(i, j) * BT + tl.maximum(i, j))[None, :]
    splits = tl.arange(0, SPLITS)[:, None]
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for done in range(0, count, SPLITS):
        s = done + splits
        tile = tl.load(partials + s.to(tl.int64) * (BT * BT) + upper, mask=s < count, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(G + i * T + j, acc, mask=(i < T) & (j < T))


@jit(do_not_specialize=["T", "stride_w"])
def _combine_tiles_kernel(
    W,
    J,
    out,
    tile_start,
    tile_stop,
    tile_block,
    T,
    stride_w,
    stride_t,
    ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Each program owns one tile of columns inside one block and combines them with that block's row
    # of W, walking the T rows in order: the same sequential fp32 sum as ``combine``.
    tile = tl.program_id(0).to(tl.int64)
    start = tl.load(tile_start + tile)
    stop = tl.load(tile_stop + tile)
    weights = W + tl.load(tile_block + tile) * stride_w
    cols = start + tl.arange(0, BLOCK_P)
    mask = cols < stop
    row_ptrs = J + cols
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in range(0, T):
        acc += tl.load(weights + t).to(tl.float32) * tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
        row_ptrs += stride_t
    if ACCUMULATE:
        acc += tl.load(out + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + cols, acc.to(out.dtype.element_ty), mask=mask)
