"""Packaging: the import surface, kernels installed as gradsurgery.kernels, no Triton needed, citations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gradsurgery as gs

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_works_without_triton_and_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, gradsurgery as gs\n"
        "print(gs.functional.mgda(torch.randn(3, 10)).shape)\n"
        "print(gs.kernels.triton_available())\n"
        "print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('triton', 'matplotlib', 'scipy')))"
    )
    assert _python(code, tmp_path).splitlines() == ["torch.Size([10])", "False", "[]"]


def test_kernels_are_installed_inside_the_package_only(tmp_path: Path) -> None:
    code = "import importlib.util as u; print(u.find_spec('gradsurgery.kernels') is not None, u.find_spec('kernels'))"
    assert _python(code, tmp_path) == "True None"


def test_wheel_contains_the_kernels_subpackage_and_no_top_level_kernels(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"no wheel backend in this environment: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("gradsurgery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradsurgery/kernels/__init__.py" in names and "gradsurgery/kernels/gram.py" in names
    assert "gradsurgery/methods/cagrad.py" in names
    assert not any(name.startswith(("kernels/", "tests/", "bench/")) for name in names)


def test_cite_prints_the_library_and_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    gs.cite()
    text = capsys.readouterr().out
    for key in ("@software{gradsurgery", "yu2020gradient", "liu2021conflict", "sener2018multi", "desideri2012multiple"):
        assert key in text
    assert gs.bibtex("CAGrad").startswith("@inproceedings{liu2021conflict")
    with pytest.raises(ValueError, match="unknown method"):
        gs.bibtex("Nash-MTL")
    assert (ROOT / "CITATION.cff").read_text().startswith("cff-version:")


def test_public_names_of_the_design() -> None:
    for name in ("GradSurgery", "PCGrad", "CAGrad", "MGDA", "Sum", "Mean", "cite", "functional"):
        assert hasattr(gs, name)
    for name in ("pcgrad", "cagrad", "mgda", "pcgrad_weights", "cagrad_weights", "mgda_weights"):
        assert callable(getattr(gs.functional, name))
