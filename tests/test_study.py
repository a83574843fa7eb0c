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

from bench.study.methods import METHODS, parse_methods
from bench.study.report import Section, Table, jsonable, latex, markdown, tex

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("toy_trajectories.png", "multidigits_accuracy.png", "multidigits_conflicts.png", "multidigits4_accuracy.png",
           "multidigits4_conflicts.png", "conflict_sweep.png")
# A hang guard, not a speed test: --quick takes well under a minute on 2 idle cores.
HANG_GUARD_S = 300


def _bench(*args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_every_output(tmp_path: Path) -> None:
    proc = _bench("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "quick"  # the configuration's own subfolder
    assert [p.name for p in tmp_path.iterdir()] == ["quick"]
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert meta["status"] == "complete"
    assert meta["preset"] == "quick" and meta["seeds"] == [0, 1]
    assert {"torch", "gradsurgery", "numpy"} <= set(meta["versions"])
    assert {"git", "machine", "command", "started", "elapsed_s", "units", "cpu_s"} <= set(meta)
    studies = results["studies"]
    assert set(studies) == {"toy", "multidigits", "multidigits4", "conflict"}
    assert studies["toy"]["steps"] > 0 and studies["toy"]["paper_steps"] == 100_000
    assert set(studies["toy"]["runs"]) == {"sum", "pcgrad", "cagrad", "mgda"}
    assert set(studies["toy"]["paths"].values()) == {"batched functional"}
    for run in studies["toy"]["runs"]["cagrad"]:
        assert run["distance_to_pareto_set"] >= 0 and run["distance_to_average_loss_minimum"] >= 0
    expected = {"stl", "sum", "mean", "pcgrad", "cagrad", "mgda", "mgda-ub"}
    for key, tasks in (("multidigits", ["left", "right"]), ("multidigits4", ["left", "right", "carry", "greater"])):
        assert studies[key]["tasks"] == tasks
        summary = studies[key]["summary"]
        assert set(summary) == expected
        # Step time ÷ Sum from the interleaved timing unit, for every entry.
        timing = studies[key]["timing"]
        assert timing["rounds"] >= 5 and set(timing["entries"]) == expected | {"naive"}
        assert summary["sum"]["step_ratio_to_sum"] == 1.0
        assert all(summary[m]["step_ratio_to_sum"] > 0 for m in expected)

    md = (out / "results.md").read_text()
    assert "| Method |" in md and "|:--|" in md
    assert "lower is better" in md and "| Sum ≥ 10 ↑ |" in md
    for name in FIGURES:
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    tex_text = (out / "results.tex").read_text()
    assert tex_text.count("\\begin{tabular}") == 4
    assert tex_text.count("\\toprule") == tex_text.count("\\bottomrule") == 4

    # The log, written to a pipe: where the results go first, a line per finished unit, no bar.
    lines = proc.stderr.splitlines()
    assert f"results go to {out}/" in lines[0]
    units = [line for line in lines if line.startswith("[")]
    assert len(units) == len(meta["units"]) and units[-1].startswith(f"[{len(units)}/{len(units)}]")
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
    assert lines[-1].startswith(f"complete: results in {out}/")


def test_the_cpu_and_its_instruction_set_are_recorded(tmp_path: Path) -> None:
    import platform

    from bench.study.runner import cpu_description

    cpu = cpu_description()
    assert cpu["torch_cpu_capability"]  # DEFAULT, AVX2, AVX512, ...: the kernels torch chose
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert set(cpu["isa"]) >= {"avx2", "avx512f", "amx_tile"}
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].splitlines()[0].split()
        assert cpu["isa"]["avx2"] == ("avx2" in flags) and cpu["isa"]["avx512f"] == ("avx512f" in flags)


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
    # Nash-MTL (a Gram-space solve), GradDrop (elementwise: diagnostics without weights) and UW (loss
    # weighting: no per-task gradients; the toy through the wrapper) through every study, one seed.
    proc = _bench("--quick", "--seeds", "1", "--methods", "NashMTL,graddrop,uw", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "quick-nash_mtl+graddrop+uw-1seeds"
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["methods"] == ["nash_mtl", "graddrop", "uw"]
    studies = results["studies"]
    assert set(studies["toy"]["runs"]) == {"nash_mtl", "graddrop", "uw"}
    assert studies["toy"]["paths"] == {"nash_mtl": "batched functional", "graddrop": "batched functional", "uw": "wrapper"}
    for key in ("multidigits", "multidigits4", "conflict"):
        assert set(studies[key]["summary"]) == {"stl", "nash_mtl", "graddrop", "uw"}
    md = (out / "results.md").read_text()
    assert "| NashMTL |" in md and "| GradDrop |" in md and "| UW |" in md
    assert "UW: no per-task gradients, not shown" in md
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_tradeoff_writes_its_table_and_figure(tmp_path: Path) -> None:
    from bench.methods import names_of

    proc = _bench("--quick", "--tradeoff", "--seeds", "1", "--methods", "sum", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "quick-sum-1seeds-tradeoff"
    results = json.loads((out / "results.json").read_text())
    trade = results["studies"]["tradeoff"]
    expected = {"stl", "sum", "pcgrad", "pcgrad@4", "cagrad", "cagrad@4", "mgda", "mgda@4", *names_of("loss")}
    assert set(trade["summary"]) == expected
    for entry in expected - {"stl"}:
        row = trade["summary"][entry]
        assert row["delta_m_mean"] is not None and row["step_ratio_to_sum"] > 0
    # The 4-task table keeps the --methods; the trade-off's entries are its own section.
    assert set(results["studies"]["multidigits4"]["methods"]) == {"stl", "sum"}
    md = (out / "results.md").read_text()
    assert "## Does it still help?" in md and "| PCGrad (every 4) |" in md and "| FAMO |" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "](tradeoff.png)" in md


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
    """Finished 2-task MultiDigits runs, once the single-task reference is among them."""
    try:
        runs = json.loads((out / "results.json").read_text())["studies"]["multidigits"]["runs"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(len(seeds) for seeds in runs.values()) if "stl" in runs else 0


def test_interrupt_keeps_finished_results(tmp_path: Path) -> None:
    out = tmp_path / "quick-sum+mgda"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--methods", "sum,mgda", "--out", str(tmp_path)],
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


def test_configuration_names() -> None:
    from bench.study.config import configuration_name

    default = {"methods": METHODS, "seeds": 3, "tradeoff": False, "device": "cpu"}
    assert configuration_name("default", **default) == "default"
    assert configuration_name("quick", **{**default, "seeds": 2}) == "quick"
    assert configuration_name("default", **{**default, "methods": ("sum", "pcgrad")}) == "default-sum+pcgrad"
    assert configuration_name("default", **{**default, "seeds": 5, "tradeoff": True}) == "default-5seeds-tradeoff"
    assert configuration_name("full", **{**default, "seeds": 5, "tradeoff": True, "device": "cuda:1"}) == "full-cuda1"
    many = configuration_name("default", **{**default, "methods": tuple(f"method{i}" for i in range(12))})
    assert many.startswith("default-12methods-") and len(many) < 40


def _write_run(folder: Path, status: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"status": status, "started": "2026-01-01T00:00:00+00:00", "command": "python -m bench"}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "studies": {}}))
    (folder / "toy_trajectories.png").write_bytes(PNG_SIGNATURE)


def test_a_complete_run_is_never_overwritten(tmp_path: Path) -> None:
    from bench.study.runner import claim_folder

    folder = tmp_path / "default"
    assert claim_folder(folder) is None and folder.is_dir()
    _write_run(folder, "complete")
    notice = claim_folder(folder)
    assert notice is not None and "held the complete run of 2026-01-01" in notice and "default.previous" in notice
    kept = tmp_path / "default.previous"
    assert json.loads((kept / "results.json").read_text())["meta"]["status"] == "complete"
    assert (kept / "toy_trajectories.png").exists() and list(folder.iterdir()) == []
    # An interrupted run is replaced (and said so); the complete one kept aside stays.
    _write_run(folder, "interrupted")
    notice = claim_folder(folder)
    assert notice is not None and "replacing the interrupted run" in notice
    assert not (folder / "results.json").exists() and not (folder / "toy_trajectories.png").exists()
    assert (kept / "results.json").exists()


def test_progress_lines_when_not_a_terminal() -> None:
    import io

    from bench.study.progress import Progress

    stream = io.StringIO()  # isatty() is False, as for a file or a pipe
    progress = Progress(3, stream=stream)
    progress.say("results go to out/")
    for i in range(3):
        progress.finished(f"unit {i}", "fine", 1.25)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "results go to out/", "[1/3] unit 0 (1.2 s): fine", "[2/3] unit 1 (1.2 s): fine", "[3/3] unit 2 (1.2 s): fine",
    ]


def test_progress_bar_on_a_terminal() -> None:
    import io

    from bench.study.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(2, stream=stream)
    progress.finished("unit 0", "fine", 1.0)
    progress.close()
    assert "\r" in stream.getvalue() and "[1/2]" not in stream.getvalue()
