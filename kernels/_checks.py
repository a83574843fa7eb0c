"""Argument checks shared by the launchers and their references (clear errors, never out-of-bounds access)."""

from __future__ import annotations

import torch

from ._backend import MAX_TASKS, triton_available, triton_runs_on

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton kernels accumulate in fp32, so fp64 would silently lose precision there.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every narrower float accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(J: torch.Tensor, name: str) -> None:
    """``J`` is ``(T, P)``, or ``(..., T, P)``: a batch of independent matrices."""
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() < 2:
        raise ValueError(f"{name} must be (T, P) or (..., T, P), got shape {tuple(J.shape)}")
    if J.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {J.dtype}; expected one of {SUPPORTED_DTYPES}")
    if J.shape[-1] > 1 and J.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1), got strides {J.stride()}")


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """Half-open byte interval ``[start, stop)`` that a non-empty strided tensor can touch."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    a_start, a_stop = _byte_span(a)
    b_start, b_stop = _byte_span(b)
    return a_start < b_stop and b_start < a_stop


def check_combine_args(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor) -> None:
    """``w (..., T)``, ``J (..., T, P)``, ``out (..., P)`` with the same batch shape (none: 1-D, 2-D, 1-D)."""
    check_matrix(J, "J")
    batch, (T, P) = tuple(J.shape[:-2]), J.shape[-2:]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (*batch, T):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        what = f"a 1-D tensor of length T={T}" if not batch else f"of shape {(*batch, T)}"
        raise ValueError(f"w must be {what}, got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"w must have a floating-point dtype, got {w.dtype}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (*batch, P):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"a 1-D tensor of length P={P}" if not batch else f"of shape {(*batch, P)}"
        raise ValueError(f"out must be {what}, got {shape}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out has unsupported dtype {out.dtype}")
    if P > 1 and out.stride(-1) != 1:
        raise ValueError(f"out must be contiguous, got stride {out.stride()}")
    for name, tensor in (("w", w), ("out", out)):
        if tensor.device != J.device:
            raise ValueError(f"{name} is on {tensor.device} but J is on {J.device}")
    # Writing into memory that is still being read gives results that depend on scheduling.
    for name, tensor in (("w", w), ("J", J)):
        if overlaps(out, tensor):
            raise ValueError(f"out must not share memory with {name}")


def check_triton_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype == torch.float64:
        raise ValueError(
            f"{name} has dtype torch.float64, which the Triton kernels do not serve (they accumulate in "
            "fp32); fp64 is served by the torch backend (gram_reference / combine_reference)"
        )
    if tensor.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name} has dtype {tensor.dtype}; the Triton kernels take one of {TRITON_DTYPES}")


def check_triton_matrix(J: torch.Tensor, name: str) -> None:
    """``check_matrix`` plus what the Triton kernels add: dtype, task count, a device Triton runs on."""
    check_matrix(J, name)
    check_triton_dtype(J, name)
    T = J.shape[-2]
    if not 1 <= T <= MAX_TASKS:
        raise ValueError(f"{name} has T={T} rows; the Triton kernels serve 1 <= T <= {MAX_TASKS}")
    check_triton_device(J, name)


def check_triton_device(tensor: torch.Tensor, name: str) -> None:
    """Triton is installed and runs where ``tensor`` lives (CUDA, or the CPU under its interpreter)."""
    if not triton_available():
        raise RuntimeError("Triton is not installed (pip install 'gradsurgery[triton]'); use the torch backend")
    if not triton_runs_on(tensor.device):
        raise ValueError(
            f"{name} is on {tensor.device}, where Triton does not run: it needs a CUDA device, or CPU tensors "
            "under Triton's interpreter (TRITON_INTERPRET=1); use the torch backend"
        )
