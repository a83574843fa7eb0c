"""Weighted combination ``out = wᵀ J`` of the task-gradient rows.

``combine_reference`` is the plain PyTorch definition: the CPU path and the ground truth that the
Triton kernel is tested against. ``combine`` is the Triton launcher (kernel in ``_combine_triton``,
loaded on first use).
"""

from __future__ import annotations

import contextlib

import torch

from ._checks import accumulation_dtype, check_combine_args, check_triton_dtype, check_triton_matrix

# Half-precision rows are converted this many elements at a time (a 2 MiB fp32 temporary that stays in
# cache): measured on the CPU (bf16, T = 2–16) 1.9–3.5× faster than 2^22.
_CHUNK_ELEMENTS = 1 << 19
_INTERPRETED_BLOCK_P = 1 << 14
# w[t]·J[t, p] + acc as one fused multiply-add (one rounding), stated rather than left to Triton's
# default, which 3.10 flips: the default changing would change the bits.
_FP_FUSION = True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def combine_reference(
    w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
) -> torch.Tensor:
    """Write ``Σ_t w[t]·J[t]`` into ``out`` (``+=`` with ``accumulate``), fp32 accumulation; return ``out``.
    A batch — ``w (..., T)``, ``J (..., T, P)``, ``out (..., P)`` — combines each entry independently."""
    check_combine_args(w, J, out)
    return combine_reference_unchecked(w, J, out, accumulate=accumulate)


def combine_reference_unchecked(
    w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
) -> torch.Tensor:
    """``combine_reference`` without its argument checks, for callers that built the arguments
    themselves (the optimizer wrappers' own buffers): on a small model the checks cost as much as
    the product."""
    acc = accumulation_dtype(J.dtype)
    if J.dim() > 2:
        # A batch: (..., 1, T) @ (..., T, P) per entry, converted a chunk of columns at a time.
        T, P = J.shape[-2:]
        weights = w.to(acc).unsqueeze(-2)
        step = max(1, _CHUNK_ELEMENTS // max(T, 1))
        for start in range(0, P, step):
            part = (weights @ J[..., start : start + step].to(acc)).squeeze(-2)
            if accumulate:
                part += out[..., start : start + step].to(acc)
            out[..., start : start + step].copy_(part)
        return out
    if J.dtype == acc and out.dtype == acc:
        weights = w.to(acc)
        if accumulate:
            out.addmv_(J.mT, weights)
        else:
            torch.mv(J.mT, weights, out=out)
        return out
    T, P = J.shape
    weights = w.to(acc)
    step = max(1, _CHUNK_ELEMENTS // max(T, 1))
    for start in range(0, P, step):
        stop = min(start + step, P)
        part = weights @ J[:, start:stop].to(acc)
        if accumulate:
            part += out[start:stop].to(acc)
        out[start:stop].copy_(part)
    return out


def combine(
    w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
) -> torch.Tensor:
    """Triton ``out[p] = Σ_t w[t]·J[t, p]`` (``+=`` with ``accumulate``); return ``out``. A batch
    (``w (..., T)``, ``J (..., T, P)``, ``out (..., P)``, ``out`` a view of a contiguous batch) runs in one
    launch, a grid axis per entry, each entry's bits those of the unbatched call.

    Accumulates in fp32 (``w`` of any float dtype, fp64 included, is cast to fp32 in the kernel) and
    rounds once, on the store into ``out``'s dtype. ``out`` is written in place, so it can be the flat
    buffer that the parameters' ``.grad`` tensors are views of. Shapes and devices as in
    ``combine_reference``; ``J`` and ``out`` fp32/fp16/bf16 and ``1 <= T <= 128``.
    """
    check_combine_args(w, J, out)
    check_triton_matrix(J, "J")
    check_triton_dtype(out, "out")
    T, P = J.shape[-2:]
    if P == 0 or J.numel() == 0:  # (nothing to write; and a reshape to (-1, T, 0) is ambiguous)
        return out
    flat_J, flat_w, flat_out = J.reshape(-1, T, P), w.reshape(-1, T), out.view(-1, P)
    B = flat_J.shape[0]
    from . import _combine_triton as kernels

    args = (
        flat_w, flat_J, flat_out, T, P, flat_w.stride(1), flat_J.stride(1),
        flat_w.stride(0), flat_J.stride(0), flat_out.stride(0), kernels.size_class(P),
    )  # fmt: skip
    on_cuda = J.device.type == "cuda"
    with torch.cuda.device(J.device) if on_cuda else contextlib.nullcontext():
        if kernels.INTERPRETED:
            # One wide fixed block: interpreted programs run one after another, so fewer is faster.
            block = _INTERPRETED_BLOCK_P
            kernels._combine_kernel[(_cdiv(P, block), B)](
                *args, ACCUMULATE=accumulate, BLOCK_P=block, enable_fp_fusion=_FP_FUSION
            )
        else:
            kernels.tuned_combine_kernel()[lambda meta: (_cdiv(P, meta["BLOCK_P"]), B)](
                *args, ACCUMULATE=accumulate, enable_fp_fusion=_FP_FUSION
            )
    return out
