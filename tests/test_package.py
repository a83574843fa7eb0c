"""Packaging: the import surface, kernels installed as gradsurgery.kernels, no Triton (nor numpy,
Lightning, Accelerate) needed, the metadata, an sdist that carries its test suite, citations."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
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
        "print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('triton', 'matplotlib', 'scipy')))\n"
        "print('torch._dynamo' in sys.modules)"  # most of a second: imported by torch.compile, not by us
    )
    assert _python(code, tmp_path).splitlines() == ["torch.Size([10])", "False", "[]", "False"]


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
    assert "gradsurgery/integrations/lightning.py" in names and "gradsurgery/integrations/accelerate.py" in names
    assert "gradsurgery/py.typed" in names
    assert {"gradsurgery/__init__.pyi", "gradsurgery/functional.pyi"} <= set(names)  # the wrappers' types
    assert not any(name.startswith(("kernels/", "tests/", "bench/")) for name in names)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    _check_metadata(zipfile.ZipFile(wheel).read(metadata).decode())


def _check_metadata(text: str) -> None:
    """PKG-INFO / METADATA: an SPDX licence, the torch floor CI tests, no numpy, typed (NotRequired and
    TypeIs come from typing_extensions, which torch requires at the same floor)."""
    meta = email.message_from_string(text)
    assert meta["License-Expression"] == "MIT" and "LICENSE" in meta.get_all("License-File")
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.11" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # the SPDX expression replaces them
    required = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert required == ["torch<3,>=2.13", "typing-extensions>=4.10"]
    test_extra = [r.split(";")[0].split(">")[0].strip() for r in meta.get_all("Requires-Dist") if "extra == \"test\"" in r]
    assert {"lightning", "accelerate", "numpy"} <= set(test_extra)


# What the suite reads besides the package: the sdist must carry all of it for its tests to run
# (pip install -e ".[test,triton]" && python -m pytest in the unpacked folder).
SDIST_MUST_HOLD = ("tests", "bench", "examples", "docs")


def test_sdist_carries_the_test_suite_and_what_it_reads(tmp_path: Path) -> None:
    # Built from a copy without *.egg-info: setuptools adds the files an old SOURCES.txt lists, which
    # would hide a MANIFEST.in that leaves them out.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "build", "dist", "__pycache__", "bench_out"))
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (sdist,) = tmp_path.glob("gradsurgery-*.tar.gz")
    with tarfile.open(sdist) as archive:
        top = f"{sdist.name[: -len('.tar.gz')]}/"
        names = {name[len(top) :] for name in archive.getnames() if name.startswith(top)}
        pkg_info = archive.extractfile(top + "PKG-INFO").read().decode()  # type: ignore[union-attr]
    expected = set()
    for folder in SDIST_MUST_HOLD:
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            expected |= {(Path(dirpath) / f).relative_to(ROOT).as_posix() for f in filenames if not f.endswith(".pyc")}
    assert {"tests/__init__.py", "tests/conftest.py", "tests/helpers.py", "tests/reference.py"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"{len(missing)} files of the suite's folders are not in the sdist: {missing[:20]}"
    for name in ("CITATION.cff", "LICENSE", "README.md", "pyproject.toml", "gradsurgery/py.typed", "gradsurgery/__init__.pyi", "kernels/gram.py"):
        assert name in names, name
    _check_metadata(pkg_info)


def test_the_library_needs_no_numpy(tmp_path: Path) -> None:
    # torch does not require numpy, so gradsurgery must not either: a wrapper step and its diagnostics.
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, gradsurgery as gs\n"
        "m = torch.nn.Linear(3, 2); opt = gs.PCGrad(torch.optim.SGD(m.parameters(), lr=0.1), seed=0)\n"
        "out = m(torch.randn(4, 3)); opt.backward([out[:, 0].mean(), out[:, 1].pow(2).mean()]); opt.step()\n"
        "from gradsurgery.distributed import _generator_hash; _generator_hash(opt.generator)\n"
        "print(sorted(opt.diagnostics(flat=True))[:2])"
    )
    assert _python(code, tmp_path) == "['conflicts', 'cos/0-1']"


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
