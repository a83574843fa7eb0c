"""``bench/gpu_check.sh`` works the first time it meets a GPU: rehearsed here on the CPU.

The rehearsal (``--rehearse --quick``) copies the working tree as the GPU machine receives it, runs a
python with nothing installed, and goes through every step with Triton's interpreter: GPU-only tests
skipped, toy benchmarks. What it leaves in ``$OUT`` must come back from the GPU machine: at most 8
files, at most 2 folders deep, names of letters, digits and ``._-``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench.gpu_environment import problems

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash and git")


STEPS = ("environment", "pytest_gpu", "pytest_kernels", "bench_kernels", "bench_step")


def _env(out: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    return {**env, "OUT": str(out), "PYTHON": sys.executable, **(extra or {})}


def _check(out: Path, *args: str, extra_env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=_env(out, extra_env), capture_output=True, text=True, timeout=timeout
    )


def _steps(summary: str) -> dict[str, str]:
    """Step → status, read off the summary's fixed-width table (a status can hold a space)."""
    return {line[:15].strip(): line[16:30].strip() for line in summary.splitlines() if line[:15].strip() in STEPS}


def _returnable(out: Path) -> list[Path]:
    """Every entry under ``out``, asserting what the GPU machine sends back."""
    entries = sorted(out.rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert len(files) <= 8, files
    for entry in entries:
        relative = entry.relative_to(out)
        assert len(relative.parts) <= 3, relative  # $OUT/a/b/file at most
        assert all(PLAIN_NAME.match(part) for part in relative.parts), relative
        assert not entry.is_symlink(), relative
    return files


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return _check(out, "--rehearse", "--quick"), out


def test_rehearsal_runs_every_step(rehearsal: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = rehearsal
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert _steps(summary) == dict.fromkeys(STEPS, "ok"), summary


def test_rehearsal_output_comes_back_from_the_gpu_machine(rehearsal: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = rehearsal
    names = {p.name for p in _returnable(out)}
    assert names == {"summary.txt", "logs.tar.gz", "kernels_smoke.jsonl", "step_smoke.jsonl"}


def test_rehearsal_tests_the_staged_copy_with_nothing_installed(rehearsal: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = rehearsal
    summary = (out / "summary.txt").read_text()
    assert "staged copy: True" in summary
    assert "outside the stage gradsurgery does not import" in summary
    with tarfile.open(out / "logs.tar.gz") as archive:
        logs = {Path(m.name).name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}
    facts = json.loads(logs["environment.json"])
    assert facts["gradsurgery_staged"] and facts["gradsurgery_kernels_from"].endswith("stage/gradsurgery/kernels")
    assert str(ROOT) not in facts["gradsurgery_from"]
    # Every pytest session says where it imported the package from (bench/gpu_pytest_plugin.py).
    for step in ("pytest_gpu", "pytest_kernels"):
        assert re.search(r"gradsurgery from \S+/stage/gradsurgery, gradsurgery\.kernels from \S+/stage/gradsurgery/kernels", logs[f"{step}.log"])
    # GPU-only tests are collected and reported as skipped, none run and none errored.
    gpu = logs["pytest_gpu.log"]
    assert re.search(r"\b\d+ skipped\b", gpu) and not re.search(r"\b\d+ (passed|failed|errors?)\b", gpu)
    assert "test_kernel_capture_gpu.py" in gpu


def test_rehearsal_benchmarks_record_every_field(rehearsal: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = rehearsal
    kernels = [json.loads(line) for line in (out / "kernels_smoke.jsonl").read_text().splitlines()]
    bandwidth = [r for r in kernels if r["kind"] == "bandwidth"]
    assert {(r["op"], r["impl"], r["dtype"]) for r in bandwidth} >= {
        ("copy", "torch", "fp32"), ("gram", "triton", "bf16"), ("combine", "triton", "fp32"), ("gram+combine", "triton", "bf16")
    }  # fmt: skip
    for row in bandwidth:
        assert row["smoke"] and row["GBps"] > 0 and row["fraction_of_copy_GBps"] > 0 and row["versions"]["torch"]
    assert {r["op"] for r in kernels if r["kind"] == "solve"} == {"solve-pcgrad", "solve-mgda", "solve-cagrad"}
    (step,) = [json.loads(line) for line in (out / "step_smoke.jsonl").read_text().splitlines()]
    assert step["T"] == 3 and step["backend"] == "triton"  # the Triton path a GPU takes, interpreted
    for kind in ("gs-mgda-loop", "gs-pcgrad-batched", "floor-batched"):
        assert step["ratios"][kind]["over_naive"]["of_medians"] > 0 and step["ratios"][kind]["over_floor"]["of_medians"] > 0
    assert set(step["loop_over_batched"]) == {"pcgrad", "cagrad", "mgda"}
    assert step["engines"]["gs-cagrad-batched"] == "batched" and step["engines"]["gs-mgda-loop"] == "loop"
    assert step["kind"] == "eager" and step["cuda_graphs"] == "not attempted: no CUDA device"
    assert "not timed here" in step["peers"]


def test_a_step_past_its_limit_is_recorded_and_the_next_steps_run(tmp_path: Path) -> None:
    # pytest_gpu gets 1 s (its imports alone take longer): the summary says TIMEOUT, keeps the step
    # before, and pytest_kernels still runs after it; the check fails.
    out = tmp_path / "out"
    result = _check(
        out, "--rehearse", "--quick",
        extra_env={"GPU_CHECK_SKIP": "bench_kernels,bench_step", "GPU_CHECK_LIMITS": "pytest_gpu=1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    steps = _steps((out / "summary.txt").read_text())
    assert steps == {"environment": "ok", "pytest_gpu": "TIMEOUT", "pytest_kernels": "ok",
                     "bench_kernels": "skipped", "bench_step": "skipped"}  # fmt: skip
    assert {p.name for p in _returnable(out)} == {"summary.txt", "logs.tar.gz"}


def test_a_check_stopped_from_outside_leaves_its_summary_and_logs(tmp_path: Path) -> None:
    # TERM while the kernel benchmark runs (as a runner's time limit would send it): the step is marked
    # interrupted, its log so far is bundled, the rows it appended stay.
    out = tmp_path / "out"
    process = subprocess.Popen(
        ["bash", str(SCRIPT), "--rehearse"],
        env=_env(out, {"GPU_CHECK_SKIP": "pytest_gpu,pytest_kernels,bench_step"}),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    summary, running = out / "summary.txt", out / "running.log"
    try:
        deadline = time.monotonic() + 120
        # Until the benchmark has written its first line (the step's process is up and logging).
        while not (
            summary.exists() and _steps(summary.read_text()).get("bench_kernels") == "running"
            and running.exists() and running.stat().st_size > 0
        ):  # fmt: skip
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        if process.poll() is None:
            process.kill()
    assert _steps(summary.read_text())["bench_kernels"] == "interrupted"
    with tarfile.open(out / "logs.tar.gz") as archive:
        log = archive.extractfile("logs/bench_kernels.log").read().decode()
    assert "smoke run under Triton's CPU interpreter" in log  # what the step printed before the stop
    _returnable(out)


def test_without_a_gpu_the_check_refuses_instead_of_passing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _check(out, timeout=120)
    assert result.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "no CUDA device visible to torch" in summary
    assert _steps(summary) == {"environment": "FAILED rc=1", **dict.fromkeys(STEPS[1:], "not run")}
    _returnable(out)


def test_out_must_start_empty(tmp_path: Path) -> None:
    (tmp_path / "left_over.txt").write_text("x")
    result = _check(tmp_path, "--rehearse", timeout=30)
    assert result.returncode == 2 and "not empty" in result.stderr


def test_pytest_plugin_stops_a_session_on_another_copy(tmp_path: Path) -> None:
    # Here gradsurgery comes from the checkout: against any other "stage" the plugin must refuse.
    env = {**os.environ, "GPU_CHECK_STAGE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.gpu_pytest_plugin", "-p", "no:cacheprovider", "-q",
         "tests/kernels/test_kernel_backend.py::test_triton_never_runs_on_meta"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"not from the staged copy {tmp_path.resolve()}" in result.stdout + result.stderr


def test_environment_problems_name_what_is_wrong() -> None:
    good = {"gradsurgery_staged": True, "triton": "3.6.0", "triton_missing_apis": [], "cuda_available": True}
    assert problems(good, require_cuda=True) == []
    assert problems({**good, "cuda_available": False}, require_cuda=False) == []
    found = problems(
        {**good, "gradsurgery_staged": False, "gradsurgery_from": "/repo/gradsurgery", "gradsurgery_kernels_from": "?",
         "triton_missing_apis": ["triton.knobs.runtime.interpret"], "cuda_available": False},
        require_cuda=True,
    )  # fmt: skip
    assert len(found) == 3 and "/repo/gradsurgery" in found[0] and "knobs" in found[1] and "CUDA" in found[2]


class _StandInStream:
    def wait_stream(self, other: object) -> None:
        del other


class _StandInGraph:
    """Records what gpu_step asks of a CUDA graph; its "capture" runs the step once, replays run nothing."""

    def __init__(self) -> None:
        self.generators: list[object] = []
        self.replays = 0

    def register_generator_state(self, generator: object) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        self.replays += 1


def test_the_graph_path_runs_with_a_stand_in_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # The capture code cannot run without a GPU; with torch.cuda's graph calls stood in for, every line
    # of it runs here: warm-up, generator registration, capture, replays against the eager twin, timing.
    import argparse
    import contextlib

    import torch

    from bench import gpu_step
    from bench.bench_suite import Spec

    graphs: list[_StandInGraph] = []

    def new_graph() -> _StandInGraph:
        graphs.append(_StandInGraph())
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "Stream", _StandInStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _StandInStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    problem = gpu_step.Problem(Spec("mlp", 3, 4, width=8, inputs=4), torch.device("cpu"), torch.float32)
    args = argparse.Namespace(backend="torch", smoke=True, budget=0.0)
    _, eager = gpu_step.measure_eager(problem, args)
    row = gpu_step.measure_graphs(problem, args, eager)
    assert set(row["captures"]) == {"naive", *(f"gs-{m}-{e}" for m in gpu_step.METHODS for e in gpu_step.ENGINES)}
    for kind, info in row["captures"].items():
        assert info["captured"], (kind, info)
        # The stand-in replays step nothing, so the graphed model ends a few steps behind its eager twin.
        assert info["max_abs_diff_vs_eager"] > 0
    assert [len(g.generators) for g in graphs] == [0, 1, 1, 0, 0, 0, 0]  # PCGrad's, for both engines
    assert all(g.replays >= gpu_step.CHECK_STEPS + 2 for g in graphs)  # the check, then the timed rounds
    assert set(row["ratios"]) == {f"graph-{kind}" for kind in row["captures"]}
