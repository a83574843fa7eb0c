"""pytest plugin of ``bench/gpu_check.sh``: the session must test the staged copy of the package.

Loaded with ``-p bench.gpu_pytest_plugin`` and ``GPU_CHECK_STAGE=DIR``. The session's first lines name
where ``gradsurgery`` and ``gradsurgery.kernels`` were imported from (also under ``-q``, which hides the
report header), and it stops before any test when either is not under ``DIR``: a test run against
another copy would prove nothing about this one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _origins() -> tuple[Path, Path]:
    import gradsurgery
    import gradsurgery.kernels

    return Path(gradsurgery.__file__).resolve().parent, Path(gradsurgery.kernels.__file__).resolve().parent


def pytest_sessionstart(session: pytest.Session) -> None:
    stage = os.environ.get("GPU_CHECK_STAGE")
    if not stage:
        raise pytest.UsageError("bench.gpu_pytest_plugin needs GPU_CHECK_STAGE (the staged copy's folder)")
    root = Path(stage).resolve()
    package, kernels = _origins()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"gradsurgery from {package}, gradsurgery.kernels from {kernels}")
    for origin in (package, kernels):
        if not origin.is_relative_to(root):
            raise pytest.UsageError(f"gradsurgery was imported from {origin}, not from the staged copy {root}")
