"""Test session set-up.

Without CUDA the Triton kernels run under Triton's CPU interpreter, which must be switched on before
anything imports Triton: this file is imported by pytest before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: extra intra-op threads only spin against each other on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
