"""The one dispatch point between the PyTorch references and the Triton kernels.

``backend="auto"`` runs Triton for CUDA tensors when Triton imports (fp64 and more than
``kernels.MAX_TASKS`` tasks stay on PyTorch), PyTorch otherwise; ``"triton"``
where Triton cannot run raises instead of falling back; ``"torch"`` always runs the references.
"""

from __future__ import annotations

import torch

from . import kernels

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` for an unknown backend, or for ``"triton"`` where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not kernels.triton_available():
            raise ValueError('backend="triton" needs Triton: pip install "gradsurgery[triton]"')
        if device is not None and not kernels.triton_runs_on(torch.device(device)):
            raise ValueError(
                f'backend="triton" cannot run on {device}: Triton needs a CUDA device '
                "(or its interpreter, TRITON_INTERPRET=1, for CPU tensors)"
            )


def resolve(backend: str, J: torch.Tensor) -> str:
    """The backend that will process ``J``: ``"torch"`` or ``"triton"``."""
    check_backend(backend, J.device)
    if backend != "auto":
        return backend
    use_triton = (
        J.is_cuda and J.dtype != torch.float64 and J.shape[0] <= kernels.MAX_TASKS and kernels.triton_available()
    )
    return "triton" if use_triton else "torch"


def gram(J: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``J Jᵀ`` as a ``(T, T)`` matrix accumulated in fp32 (fp64 for fp64 ``J``)."""
    if resolve(backend, J) == "triton":
        return kernels.gram(J)
    return kernels.gram_reference(J)


def combine(
    w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """``out (+)= wᵀJ`` with fp32 accumulation; returns ``out``."""
    if resolve(backend, J) == "triton":
        return kernels.combine(w, J, out, accumulate=accumulate)
    return kernels.combine_reference(w, J, out, accumulate=accumulate)
