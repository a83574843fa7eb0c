"""Triton kernels behind ``graddrop``. Imported by the launcher on first use, never at package import:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported.

The hash is ``graddrop.uniform_bits`` in uint32 arithmetic (which wraps, as the PyTorch version's
masked int64 arithmetic does by construction): the same function, so the same bits.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
from triton import knobs

from ._jit import jit

# Whether the kernels below were built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)


@jit
def _mix32(x):
    # Wellons' lowbias32 on uint32 (constants as in graddrop.MIX_MULTIPLIERS).
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@jit
def _uniform_bits(cols, seed):
    # u_p in [0, 2^24) as int32, from int64 column indices and the int64 seed.
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x = _mix32((cols & 0xFFFFFFFF).to(tl.uint32) ^ low)
    x = _mix32(x ^ high ^ (cols >> 32).to(tl.uint32))
    return (x >> 8).to(tl.int32)


# Sizes are not specialised on (only J's row stride is, for vector loads): no recompile per T or P.
@jit(do_not_specialize=["T", "P", "scale", "size_class"])
def _graddrop_kernel(
    J,
    seed_ptr,
    leak,
    out,
    T,
    P,
    stride_t,
    scale,
    size_class,  # only an autotuning key
    HAS_LEAK: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Every out[p] depends on column p alone, summed over the rows in order: the result is the same
    # whatever BLOCK_P the autotuner picks.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cols < P
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    magnitude = tl.zeros((BLOCK_P,), dtype=tl.float32)
    row_ptrs = J + cols
    for t in range(0, T):
        x = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
        total += x
        magnitude += tl.abs(x)
        row_ptrs += stride_t  # 64-bit pointer steps: offsets past 2^31 stay exact
    # U < ½(1 + S/A) as (2u − 2^24)·A < 2^24·S, exact in float64 (module docstring of graddrop.py).
    centred = (2 * _uniform_bits(cols, tl.load(seed_ptr)) - 16777216).to(tl.float64)
    positive = centred * magnitude.to(tl.float64) < total.to(tl.float64) * 16777216.0
    sign = tl.where(positive, 1.0, -1.0)
    # Σ of the kept entries = sign·Σ_t max(sign·x_t, 0), as the reference computes it.
    kept = tl.zeros((BLOCK_P,), dtype=tl.float32)
    row_ptrs = J + cols
    for t in range(0, T):
        aligned = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32) * sign
        if HAS_LEAK:
            kept += tl.maximum(aligned, 0.0) + tl.minimum(aligned, 0.0) * tl.load(leak + t).to(tl.float32)
        else:
            kept += tl.maximum(aligned, 0.0)
        row_ptrs += stride_t
    if SCALED:
        result = kept * (sign * scale)
    else:
        result = kept * sign
    # A − A: 0 for a finite Σ|x|, NaN for a column with a NaN or Inf entry (as the reference).
    result = result + (magnitude - magnitude)
    tl.store(out + cols, result.to(out.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["start", "P"])
def _uniforms_kernel(seed_ptr, out, start, P, BLOCK_P: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    bits = _uniform_bits(offsets + start, tl.load(seed_ptr))
    tl.store(out + offsets, bits.to(tl.float64) * (1.0 / 16777216.0), mask=offsets < P)


@functools.cache
def tuned_graddrop_kernel() -> triton.runtime.Autotuner:
    """Autotuned over ``BLOCK_P`` and warps (neither changes any ``out[p]``)."""
    configs = [triton.Config({"BLOCK_P": block}, num_warps=warps) for block in (512, 1024, 2048) for warps in (4, 8)]
    # Keyed on a coarse size class (and, implicitly, the dtypes and constexprs), not on T or exact P.
    return triton.autotune(configs=configs, key=["size_class"])(_graddrop_kernel)


def size_class(P: int) -> int:
    """0: fits in cache, launch-bound; 1: mid-sized; 2: bandwidth-bound streaming."""
    return 0 if P < 1 << 16 else 1 if P < 1 << 22 else 2
