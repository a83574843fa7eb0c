"""GradDrop's masked sum ``out[p] = scale · Σ_t coef_tp · J[t, p]`` in one pass over ``J``.

Per column ``p``, with ``S = Σ_t J[t, p]`` and ``A = Σ_t |J[t, p]|`` (fp32 sums over the rows in order;
fp64 for fp64 ``J``) and a uniform draw ``U_p`` on ``[0, 1)``, the column keeps its positive entries
when ``U_p < ½(1 + S/A)`` and its negative entries otherwise; a kept entry has ``coef = 1``, a dropped
one ``coef = leak[t]`` (0 without a leak). The method's semantics are in ``gradsurgery.methods.graddrop``.

Randomness. ``U_p`` is a counter-based hash of ``(seed, p)``: no random state, no tensor of draws
(which would be a second pass over ``P`` values), and the same function in PyTorch and in Triton, so
the two backends choose the same sign for every column, bit for bit. ``seed`` is a one-element int64
tensor on ``J``'s device (``graddrop_seed`` draws it from a ``torch.Generator`` without a host sync;
the kernel loads it). The hash takes the column index's two 32-bit halves and the seed's two 32-bit
halves through two rounds of Wellons' ``lowbias32`` integer mixer (one keyed by each seed half) and
keeps the top 24 bits: ``U_p = u_p · 2⁻²⁴`` with ``u_p`` an integer in ``[0, 2²⁴)``.

Exactness. The sign choice is made as ``(2u_p − 2²⁴)·A < 2²⁴·S`` in float64: for fp32 sums this
product of a 25-bit integer and a 24-bit significand is exact, so the comparison is exact, never
depends on how a backend rounds a division, and equals ``U_p < ½(1 + S/A)``. A column whose entries
share one sign therefore always keeps all of them (``S = ±A`` exactly); for an all-zero column the
choice does not matter. The kept entries are summed as ``sign·Σ_t max(sign·J[t, p], 0)`` (the same
sums as adding the kept entries, with the sign flipped exactly), both backends in the same order with
separately rounded multiplies and adds, so for fp32/fp16/bf16 ``J`` with an fp32 ``out`` the kernel and
``graddrop_reference`` agree bit for bit. A column with a NaN or Inf entry (or whose ``Σ|J|`` overflows)
gets ``out[p] = NaN``: non-finite gradients reach ``out`` for the caller's finiteness check instead of
being dropped with the other sign.

``graddrop_reference`` is the plain PyTorch definition: the CPU path and the ground truth the Triton
launcher ``graddrop`` (kernel in ``_graddrop_triton``, loaded on first use) is tested against.
"""

from __future__ import annotations

import contextlib

import torch

from ._checks import (
    accumulation_dtype,
    check_combine_args,
    check_matrix,
    check_triton_device,
    check_triton_dtype,
    check_triton_matrix,
)

# The mixer's multipliers (Wellons, "lowbias32"); the Triton kernel spells the same constants.
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
UNIFORM_BITS = 24
_MASK32 = 0xFFFFFFFF
# Columns per chunk of the reference: its int64 hash temporaries and fp32 rows (~20 arrays of
# 2^16 elements) stay in cache.
_CHUNK_COLUMNS = 1 << 16
_INTERPRETED_BLOCK_P = 1 << 14
# Separately rounded multiply and add, as the reference computes `coef * x` then `acc + ...`.
_FP_FUSION = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def graddrop_seed(
    generator: torch.Generator | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """One int64 seed (shape ``(1,)``) drawn from ``generator`` (torch's default generator when ``None``).

    Drawn on the generator's device and moved to ``device``: with a generator on ``J``'s device the draw
    is asynchronous (no host sync). Advances the generator by exactly one draw.
    """
    source = generator.device if generator is not None else device
    info = torch.iinfo(torch.int64)
    seed = torch.randint(info.min, info.max, (1,), generator=generator, device=source, dtype=torch.int64)
    return seed.to(device) if device is not None else seed


def _mul32_(x: torch.Tensor, multiplier: int, scratch: torch.Tensor) -> None:
    # x ← x·m mod 2^32 in place, for x in [0, 2^32), without int64 overflow: m ≥ 2^31 is split as
    # (m − 2^31) + 2^31, and x·2^31 mod 2^32 is (x & 1)·2^31. Every intermediate stays below 2^63.
    if multiplier < 1 << 31:
        x.mul_(multiplier)
    else:
        torch.bitwise_and(x, 1, out=scratch).bitwise_left_shift_(31)
        x.mul_(multiplier - (1 << 31)).add_(scratch)
    x.bitwise_and_(_MASK32)


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    # Wellons' lowbias32, in place. x is non-negative, so int64's arithmetic right shift is the
    # logical shift of the uint32 original.
    first, second = MIX_MULTIPLIERS
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))
    _mul32_(x, first, scratch)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=scratch))
    _mul32_(x, second, scratch)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))


def uniform_bits(columns: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``u_p`` in ``[0, 2²⁴)`` (int64) for int64 column indices ``columns ≥ 0`` and a ``(1,)`` int64 seed.

    Two rounds of ``lowbias32``: ``mix(mix(lo(p) ^ lo(seed)) ^ hi(seed) ^ hi(p))``, top 24 bits.
    """
    scratch = torch.empty_like(columns)
    x = torch.bitwise_and(columns, _MASK32).bitwise_xor_(seed & _MASK32)
    _mix32_(x, scratch)
    x.bitwise_xor_((seed >> 32) & _MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(columns, 32, out=scratch))
    _mix32_(x, scratch)
    return x.bitwise_right_shift_(32 - UNIFORM_BITS)


def graddrop_uniforms(seed: torch.Tensor, P: int, *, start: int = 0) -> torch.Tensor:
    """The draws ``U_p = u_p · 2⁻²⁴`` (float64, exact) for columns ``start … start + P − 1``."""
    _check_seed(seed, seed.device)
    if start < 0 or P < 0:
        raise ValueError(f"start and P must be ≥ 0, got start={start}, P={P}")
    columns = torch.arange(start, start + P, dtype=torch.int64, device=seed.device)
    return uniform_bits(columns, seed).to(torch.float64) * 2.0**-UNIFORM_BITS


def check_graddrop_args(
    J: torch.Tensor, seed: torch.Tensor, out: torch.Tensor, leak: torch.Tensor | None, scale: float
) -> None:
    _check_out(J, out)
    T = J.shape[0]
    if T == 0:
        raise ValueError("J is empty: T = 0 tasks")
    _check_seed(seed, J.device)
    if leak is not None:
        if not isinstance(leak, torch.Tensor) or leak.dim() != 1 or leak.shape[0] != T:
            shape = tuple(leak.shape) if isinstance(leak, torch.Tensor) else type(leak).__name__
            raise ValueError(f"leak must be a 1-D tensor of length T={T}, got {shape}")
        if not leak.is_floating_point():
            raise ValueError(f"leak must have a floating-point dtype, got {leak.dtype}")
        if leak.device != J.device:
            raise ValueError(f"leak is on {leak.device} but J is on {J.device}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


def _check_out(J: torch.Tensor, out: torch.Tensor) -> None:
    # combine's checks with a stand-in weight vector: J's layout and dtype, out's length, contiguity,
    # device and dtype, and out not overlapping J.
    check_matrix(J, "J")
    check_combine_args(torch.empty(J.shape[0], device=J.device), J, out)


def _check_seed(seed: torch.Tensor, device: torch.device) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or seed.dim() != 1:
        is_tensor = isinstance(seed, torch.Tensor)
        described = f"{seed.dtype} of shape {tuple(seed.shape)}" if is_tensor else type(seed).__name__
        raise ValueError(f"seed must be a (1,) int64 tensor (graddrop_seed), got {described}")
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but J is on {device}")


def graddrop_reference(
    J: torch.Tensor,
    seed: torch.Tensor,
    out: torch.Tensor,
    *,
    leak: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Write GradDrop's masked column sums of ``J`` (times ``scale``) into ``out``; return ``out``.

    ``J`` is ``(T, P)`` with contiguous rows, any supported float dtype; ``seed`` a ``(1,)`` int64 tensor
    on J's device; ``leak`` an optional ``(T,)`` float tensor (values in ``[0, 1]``, not checked: that
    would read them back); ``out`` a contiguous ``(P,)`` tensor. Accumulates in fp32 (fp64 for fp64
    ``J``), ``scale`` applied once at the end, one rounding into ``out``'s dtype.
    """
    check_graddrop_args(J, seed, out, leak, scale)
    acc = accumulation_dtype(J.dtype)
    T, P = J.shape
    leaks = None if leak is None else leak.to(acc)
    for start in range(0, P, _CHUNK_COLUMNS):
        stop = min(start + _CHUNK_COLUMNS, P)
        rows = [J[t, start:stop].to(acc) for t in range(T)]
        # S and A summed over the rows in order, as the kernel does: the same fp32 sums, bit for bit.
        total = rows[0].clone()
        magnitude = rows[0].abs()
        scratch = torch.empty_like(total)
        for row in rows[1:]:
            total += row
            magnitude += torch.abs(row, out=scratch)
        bits = uniform_bits(torch.arange(start, stop, dtype=torch.int64, device=J.device), seed)
        centred = bits.mul_(2).sub_(1 << UNIFORM_BITS).to(torch.float64)
        positive = centred.mul_(magnitude.to(torch.float64)) < total.to(torch.float64) * float(1 << UNIFORM_BITS)
        sign = positive.to(acc).mul_(2).sub_(1)
        # Σ of the kept entries = sign·Σ_t max(sign·x_t, 0): the same sums, sign flipped exactly. A
        # dropped entry adds leak·min(sign·x_t, 0) (one of the two terms is always zero).
        kept = torch.zeros_like(total)
        for t, row in enumerate(rows):
            aligned = torch.mul(row, sign, out=scratch)
            if leaks is None:
                kept += aligned.clamp_min_(0)
            else:
                leaked = aligned.clamp_max(0).mul_(leaks[t])
                kept += aligned.clamp_min_(0).add_(leaked)
        result = kept.mul_(sign if scale == 1.0 else sign.mul_(scale))
        # A − A is 0 for a finite Σ|x| and NaN for a column with a NaN or Inf entry (or one whose
        # magnitudes overflow): those columns report NaN instead of dropping the bad entry.
        result += magnitude.sub_(magnitude)
        out[start:stop].copy_(result)
    return out


def graddrop(
    J: torch.Tensor,
    seed: torch.Tensor,
    out: torch.Tensor,
    *,
    leak: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Triton GradDrop: ``graddrop_reference`` fused into one pass over ``J``; return ``out``.

    Each program owns a block of columns: it sums them over the rows (``S``, ``A``), hashes the column
    indices with the seed it loads from ``seed``, and walks the rows again, adding the kept entries.
    The second walk re-reads the block it has just read (from cache: DRAM sees one read of ``J``).
    ``J`` fp32/fp16/bf16 with ``1 <= T <= 128``; ``out`` any supported dtype except fp64.
    """
    check_graddrop_args(J, seed, out, leak, scale)
    check_triton_matrix(J, "J")
    check_triton_dtype(out, "out")
    check_triton_device(seed, "seed")
    T, P = J.shape
    if P == 0:
        return out
    from . import _graddrop_triton as kernels

    leak_arg = leak if leak is not None else seed  # never read when HAS_LEAK is False
    stride_t = J.stride(0) if T > 1 else 0
    args = (J, seed, leak_arg, out, T, P, stride_t, float(scale), kernels.size_class(P))
    meta = {"HAS_LEAK": leak is not None, "SCALED": scale != 1.0, "enable_fp_fusion": _FP_FUSION}
    on_cuda = J.device.type == "cuda"
    with torch.cuda.device(J.device) if on_cuda else contextlib.nullcontext():
        if kernels.INTERPRETED:
            block = _INTERPRETED_BLOCK_P
            kernels._graddrop_kernel[(_cdiv(P, block),)](*args, BLOCK_P=block, **meta)
        else:
            kernels.tuned_graddrop_kernel()[lambda m: (_cdiv(P, m["BLOCK_P"]),)](*args, **meta)
    return out


def graddrop_uniforms_triton(seed: torch.Tensor, P: int, *, start: int = 0) -> torch.Tensor:
    """``graddrop_uniforms`` computed by the kernel's own hash (a test hook: the two must agree exactly)."""
    check_triton_device(seed, "seed")
    _check_seed(seed, seed.device)
    if start < 0 or P < 0:
        raise ValueError(f"start and P must be ≥ 0, got start={start}, P={P}")
    out = torch.empty(P, dtype=torch.float64, device=seed.device)
    if P == 0:
        return out
    from . import _graddrop_triton as kernels

    block = _INTERPRETED_BLOCK_P if kernels.INTERPRETED else 1024
    on_cuda = seed.device.type == "cuda"
    with torch.cuda.device(seed.device) if on_cuda else contextlib.nullcontext():
        kernels._uniforms_kernel[(_cdiv(P, block),)](seed, out, start, P, BLOCK_P=block)
    return out
