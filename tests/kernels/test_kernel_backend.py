"""Where the Triton kernels run, and that importing the package never imports Triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from gradsurgery.kernels import triton_available, triton_runs_on


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_does_not_import_triton() -> None:
    result = _run(
        """
        import sys
        import torch
        before = "triton" in sys.modules  # some torch builds may import it themselves
        import gradsurgery.kernels
        assert before or "triton" not in sys.modules, "importing gradsurgery.kernels imported triton"
        """
    )
    assert result.returncode == 0, result.stderr


def test_package_works_without_triton() -> None:
    # sys.modules["triton"] = None makes every `import triton` raise ImportError, as if not installed.
    result = _run(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import gradsurgery.kernels as k
        assert not k.triton_available()
        assert not k.triton_runs_on(torch.device("cuda")) and not k.triton_runs_on(torch.device("cpu"))
        J = torch.ones(2, 5)
        assert torch.equal(k.gram_reference(J), torch.full((2, 2), 5.0))
        try:
            k.gram(J)
        except RuntimeError as error:
            assert "Triton is not installed" in str(error)
        else:
            raise AssertionError("gram ran without triton")
        """
    )
    assert result.returncode == 0, result.stderr


def test_triton_available_is_cached() -> None:
    assert triton_available() is triton_available()
    assert triton_available.cache_info().hits >= 1


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_runs_on_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_runs_on(torch.device("cpu"))
    assert triton_runs_on("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_runs_on(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_runs_on(torch.device("cpu"))


def test_triton_runs_on_cuda_when_installed() -> None:
    assert triton_runs_on(torch.device("cuda")) == triton_available()
    assert triton_runs_on(torch.device("cuda", 1)) == triton_available()


def test_triton_never_runs_on_meta() -> None:
    assert not triton_runs_on(torch.device("meta"))
