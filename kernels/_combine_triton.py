"""Triton kernel behind ``combine``. Imported by the launcher on first use, never at package import:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported."""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton import knobs

# Whether the kernel below was built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _combine_kernel(
    w,
    J,
    out,
    T,
    P,
    stride_w,
    stride_t,
    p_bucket,  # only an autotuning key: a config tuned on a tiny P need not suit a huge one
    ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Each program owns BLOCK_P columns and walks the T rows in order, so every out[p] is the same
    # sequential fp32 sum whatever BLOCK_P the autotuner picks: no cross-program reduction at all.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cols < P
    row_ptrs = J + cols
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in range(0, T):
        weight = tl.load(w + t * stride_w).to(tl.float32)
        acc += weight * tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Advancing the pointer (64-bit) instead of computing t * stride_t keeps offsets past 2^31 exact.
        row_ptrs += stride_t
    if ACCUMULATE:
        acc += tl.load(out + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + cols, acc.to(out.dtype.element_ty), mask=mask)


@functools.cache
def tuned_combine_kernel() -> triton.runtime.Autotuner:
    """Autotuned over ``BLOCK_P`` and warps (neither changes any out[p]'s summation order).

    ``restore_value`` puts ``out`` back after every timing run, or ``accumulate=True`` would add the
    combination once per benchmark repetition.
    """
    configs = [
        triton.Config({"BLOCK_P": block}, num_warps=warps) for block in (1024, 2048, 4096) for warps in (4, 8)
    ]
    return triton.autotune(configs=configs, key=["T", "p_bucket", "ACCUMULATE"], restore_value=["out"])(
        _combine_kernel
    )
