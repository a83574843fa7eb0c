"""Triton kernel behind ``combine``. Imported by the launcher on first use, never at package import:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported."""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton import knobs

from ._jit import jit

# Whether the kernel below was built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)


# Sizes are not specialised on (only J's row stride is, for vector loads): no recompile per T or P.
@jit(do_not_specialize=["T", "P", "stride_w", "stride_wb", "stride_jb", "stride_ob", "size_class"])
def _combine_kernel(
    w,
    J,
    out,
    T,
    P,
    stride_w,
    stride_t,
    stride_wb,
    stride_jb,
    stride_ob,
    size_class,  # only an autotuning key: a config tuned on a tiny P need not suit a huge one
    ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Each program owns BLOCK_P columns of one batch entry and walks the T rows in order, so every
    # out[b, p] is the same sequential fp32 sum whatever BLOCK_P the autotuner picks: no cross-program
    # reduction at all, and a batch entry is combined exactly as an unbatched matrix would be.
    batch = tl.program_id(1).to(tl.int64)
    w += batch * stride_wb
    J += batch * stride_jb
    out += batch * stride_ob
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
    configs = [triton.Config({"BLOCK_P": block}, num_warps=warps) for block in (1024, 4096) for warps in (4, 8)]
    # Keyed on a coarse size class (and, implicitly, the dtypes of w, J and out), not on T or exact P:
    # a handful of tunings per process rather than one per parameter-buffer size.
    return triton.autotune(configs=configs, key=["size_class"], restore_value=["out"])(_combine_kernel)


def size_class(P: int) -> int:
    """0: fits in cache, launch-bound; 1: mid-sized; 2: bandwidth-bound streaming."""
    return 0 if P < 1 << 16 else 1 if P < 1 << 22 else 2
