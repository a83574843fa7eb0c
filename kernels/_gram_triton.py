"""Triton kernels behind ``gram``. Imported by the launcher on first use, never at package import:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported."""

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl
from triton import knobs

from ._jit import jit

# Whether the kernels below were built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)


# Sizes are not specialised on (only strides are, for vector loads): one binary serves every T and P
# with the same tile width, instead of a recompile per divisibility class.
@jit(do_not_specialize=["T", "P", "stride_b"])
def _gram_partials_kernel(
    J,
    partials,
    T,
    P,
    stride_b,
    stride_t,
    cols_per_split,
    BT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (s, b) sums J[b, :, cols] J[b, :, cols]ᵀ over its own contiguous column range into
    # partials[b, s]: the split is fixed by the launcher, so the summation order (and the bits) never
    # vary run to run, and every batch entry is summed exactly as an unbatched matrix would be.
    split = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BT)
    row_ptrs = J + batch * stride_b + rows.to(tl.int64)[:, None] * stride_t
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
    out = partials + (batch * tl.num_programs(0) + split) * BT * BT + rows[:, None] * BT + rows[None, :]
    tl.store(out, acc)


@jit(do_not_specialize=["T", "num_splits"])
def _gram_reduce_kernel(partials, G, T, num_splits, BT: tl.constexpr, BLOCK_E: tl.constexpr, SPLITS: tl.constexpr):
    # Second stage: G[b] = Σ_s partials[b, s]. Program (p, b) owns BLOCK_E entries of the flattened (BT, BT) tile and
    # reads SPLITS partials per iteration as one (SPLITS, BLOCK_E) tile, so up to 4 × #SMs partials take
    # ~33 dependent steps instead of one per partial. The order (blocks of SPLITS in split order, each
    # summed by tl.sum's fixed tree) depends on nothing but num_splits: the same bits on every run.
    # Every (i, j) reads the upper-triangle entry (min, max) and sums it the same way, so G is exactly
    # symmetric whatever rounding the first stage did.
    batch = tl.program_id(1).to(tl.int64)
    partials += batch * num_splits * (BT * BT)
    G += batch * T * T
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    i = e // BT
    j = e % BT
    upper = (tl.minimum(i, j) * BT + tl.maximum(i, j))[None, :]
    splits = tl.arange(0, SPLITS)[:, None]
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for first in range(0, num_splits, SPLITS):
        s = first + splits
        tile = tl.load(partials + s.to(tl.int64) * (BT * BT) + upper, mask=s < num_splits, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(G + i * T + j, acc, mask=(i < T) & (j < T))


def _without_unpipelined_stages(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: object) -> list[triton.Config]:
    """Drop the ``num_stages`` configs that cannot differ for 16-bit ``J``.

    Triton 3.6 and 3.9 software-pipeline the fp32 tile loads (each stage adds a 16 KiB shared buffer) but
    not the fp16/bf16 ones: compiled for sm_90, 3 and 4 stages give byte-identical binaries for every
    tile width and warp count (``bench/gpu_resources.py``), which the autotuner would time twice.
    """
    if named_args["J"].element_size() >= 4:
        return configs
    fewest = min(config.num_stages for config in configs)
    return [config for config in configs if config.num_stages == fewest]


@functools.cache
def tuned_partials_kernel() -> triton.runtime.Autotuner:
    """The first stage autotuned over warps and pipeline depth only.

    The column split and ``BLOCK_P`` stay with the launcher: they set the summation order, and letting the
    autotuner pick them would make the result's last bits depend on which config won in this process.
    (Compiled for sm_90, the fp32 tile at BT = 128 with 4 warps spills 352 bytes per thread with Triton
    3.6 and 56 with 3.9, none with 8 warps on either; the autotuner times it like any other config.)
    """
    configs = [triton.Config({}, num_warps=warps, num_stages=stages) for warps in (4, 8) for stages in (3, 4)]
    # Keyed on the tile width (and, implicitly, J's dtype), not on T or P: a handful of tunings per process.
    return triton.autotune(
        configs=configs, key=["BT"], prune_configs_by={"early_config_prune": _without_unpipelined_stages}
    )(_gram_partials_kernel)
