"""Where the Triton kernels can run. Nothing here imports Triton until a function is called."""

from __future__ import annotations

import functools
import os

import torch

# The largest number of tasks the Triton kernels serve: T is padded to a power of two ≥ 16 and the
# whole (T, T) Gram tile lives in one program's registers.
MAX_TASKS = 128


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (answer cached for the process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken native install fails with OSError/RuntimeError, not only ImportError
        return False
    return True


def interpreter_active() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors that live on ``device``.

    CUDA devices (ROCm included, which PyTorch also calls ``cuda``) need Triton installed; CPU tensors
    additionally need Triton's interpreter, which is slow and meant for tests, never for training.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return triton_available()
    if device.type == "cpu":
        return interpreter_active() and triton_available()
    return False
