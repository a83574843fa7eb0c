"""``python -m bench``: the end-to-end smoke run, bad input, interruption, and the report writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.study.methods import parse_methods
from bench.study.report import Section, Table, jsonable, latex, markdown, tex

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("toy_trajectories.png", "multidigits_accuracy.png", "multidigits_conflicts.png", "multidigits_cosine.png",
           "conflict_sweep.png")
# A hang guard, not a speed test: --quick takes well under a minute on 2 idle cores.
HANG_GUARD_S = 300


def _bench(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = _bench("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert meta["status"] == "complete"
    assert meta["preset"] == "quick" and meta["seeds"] == [0, 1]
    assert {"torch", "gradsurgery", "numpy"} <= set(meta["versions"])
    assert {"git", "machine", "command", "started", "elapsed_s"} <= set(meta)
    studies = results["studies"]
    assert set(studies) == {"toy", "multidigits", "conflict"}
    assert studies["toy"]["steps"] > 0 and studies["toy"]["paper_steps"] == 100_000
    assert set(studies["toy"]["runs"]) == {"sum", "pcgrad", "cagrad", "mgda"}
    assert set(studies["multidigits"]["summary"]) == {"stl", "sum", "mean", "pcgrad", "cagrad", "mgda", "mgda-ub"}

    md = (out / "results.md").read_text()
    assert "| Method |" in md and "|:--|" in md
    assert "lower is better" in md
    for name in FIGURES:
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    tex_text = (out / "results.tex").read_text()
    assert tex_text.count("\\begin{tabular}") == 3
    assert tex_text.count("\\toprule") == tex_text.count("\\bottomrule") == 3
    assert "\\begin{tabular}" in tex_text and "\\end{tabular}" in tex_text


def _usage_error(proc: subprocess.CompletedProcess[str], fragment: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--methods", "sum,pcgard"], "unknown method(s) 'pcgard'", id="unknown-method"),
        pytest.param(["--methods", ","], "no method given", id="empty-methods"),
        pytest.param(["--methods", "pcgrad,,cagrad"], "empty entry in 'pcgrad,,cagrad'", id="empty-entry"),
        pytest.param(["--methods", "pcgrad,"], "empty entry in 'pcgrad,'", id="trailing-comma"),
        pytest.param(["--methods", "PCGrad,pcgrad"], "method 'pcgrad' given twice", id="duplicate-method"),
        pytest.param(["--seeds", "0"], "--seeds must be at least 1, got 0", id="zero-seeds"),
        pytest.param(["--seeds", "-2"], "--seeds must be at least 1", id="negative-seeds"),
        pytest.param(["--quick", "--full"], "not allowed with argument", id="quick-and-full"),
        pytest.param(["--device", "tpu"], "--device", id="bad-device"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    _usage_error(_bench(*args, "--out", str(out), timeout=60), fragment, out)


def test_every_registered_method_is_accepted_by_its_function_and_wrapper_names() -> None:
    from gradsurgery.methods import REGISTRY

    for method in REGISTRY:
        name = method.function or method.name.lower()
        assert parse_methods(name) == [name]
        assert parse_methods(method.name) == [name]
        assert parse_methods(f" {method.name.upper()} ") == [name]
    assert parse_methods("sum,pcgrad,nash_mtl,graddrop") == ["sum", "pcgrad", "nash_mtl", "graddrop"]
    # The canonical order is the registry's (MGDA-UB after MGDA), whatever the order given.
    assert parse_methods("RLW,MGDA-UB,mgda,Sum") == ["sum", "mgda", "mgda-ub", "random"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "no method given", id="empty"),
        pytest.param(" , ", "no method given", id="blank-entries"),
        pytest.param(",pcgrad", "empty entry", id="leading-comma"),
        pytest.param("pcgrad,,cagrad", "empty entry", id="double-comma"),
        pytest.param("nash_mtl,NashMTL", "method 'nash_mtl' given twice (as 'nash_mtl' and 'NashMTL')", id="duplicate"),
        pytest.param("pcgrad;cagrad", "unknown method(s) 'pcgrad;cagrad'", id="wrong-separator"),
        pytest.param("upgard,mgda_ub", "unknown method(s) 'upgard', 'mgda_ub'", id="two-unknown"),
    ],
)
def test_malformed_method_lists_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_methods(text)
    assert fragment in str(info.value)


def test_a_registered_method_beyond_the_default_runs_end_to_end(tmp_path: Path) -> None:
    # Nash-MTL (a Gram-space solve) and GradDrop (elementwise: diagnostics without weights) through
    # every study, one seed.
    out = tmp_path / "study"
    proc = _bench("--quick", "--seeds", "1", "--methods", "NashMTL,graddrop", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["methods"] == ["nash_mtl", "graddrop"]
    studies = results["studies"]
    assert set(studies["toy"]["runs"]) == {"nash_mtl", "graddrop"}
    assert set(studies["multidigits"]["summary"]) == {"stl", "nash_mtl", "graddrop"}
    assert set(studies["conflict"]["summary"]) == {"stl", "nash_mtl", "graddrop"}
    md = (out / "results.md").read_text()
    assert "| NashMTL |" in md and "| GradDrop |" in md
    assert "no panel for GradDrop (no conflicts or weights)" in md
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_unwritable_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "study"
    _usage_error(_bench("--quick", "--out", str(out), timeout=60), "cannot write to output folder", out)


def test_missing_cuda_is_reported(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    _usage_error(_bench("--device", "cuda", "--out", str(out), timeout=60), "CUDA is not available", out)


def _finished_digit_runs(out: Path) -> int:
    try:
        runs = json.loads((out / "results.json").read_text())["studies"]["multidigits"]["runs"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(len(seeds) for seeds in runs.values())


def test_interrupt_keeps_finished_results(tmp_path: Path) -> None:
    out = tmp_path / "study"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--methods", "sum,mgda", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while _finished_digit_runs(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before any MultiDigits result could be seen"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["status"] == "interrupted"
    digits = results["studies"]["multidigits"]
    assert digits["runs"] and digits["summary"]
    # The conflict sweep (the last study) had not finished.
    assert len(results["studies"].get("conflict", {}).get("points", {}).get("mgda", {})) < 3
    assert (out / "multidigits_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "interrupted" in (out / "results.md").read_text()
    assert "\\begin{tabular}" in (out / "results.tex").read_text()


def test_tex_escapes_and_symbols() -> None:
    assert tex("a_b & 50% #1") == r"a\_b \& 50\% \#1"
    assert tex("1.0 ± 0.2") == r"1.0 $\pm$ 0.2"
    assert tex("Δm% ↓") == r"$\Delta$m\% $\downarrow$"
    assert tex("−3") == "$-$3"


def test_markdown_and_latex_tables() -> None:
    table = Table(label="t", caption="Cap_1", columns=["A", "B"], rows=[["x", "1.0"], ["y", "2.0"]], align="lr",
                  bold=frozenset({(1, 1)}))
    section = Section("S", lambda data: ([], []), notes=["note"], tables=[table])
    md = markdown("Title", ["header"], [section])
    assert "| A | B |\n|:--|--:|\n| x | 1.0 |\n| y | **2.0** |" in md
    tex_text = latex(["header"], [section])
    assert "\\begin{tabular}{lr}" in tex_text and "\\caption{Cap\\_1}" in tex_text
    assert "y & \\textbf{2.0} \\\\" in tex_text


def test_json_has_no_nan() -> None:
    assert jsonable({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")}) == {"a": None, "b": [1.0, None], "c": [2, "x"]}
    assert json.dumps(jsonable({"x": float("-inf")}), allow_nan=False) == '{"x": null}'


def test_cli_module_does_not_import_torch() -> None:
    # Bad names must be rejected without paying for the torch import.
    code = "import sys, bench.__main__; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
