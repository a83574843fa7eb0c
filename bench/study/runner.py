"""Runs the three studies in order, flushing results as they finish; a Ctrl-C keeps what is done."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from . import conflict, multidigits, toy
from .config import StudyConfig
from .report import Report
from .toy_process import BackgroundToy

EXIT_INTERRUPTED = 130


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git unavailable)"
    if rev.returncode != 0:
        return "unknown (no commit)"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def collect_meta(config: StudyConfig, command: str) -> dict[str, Any]:
    """Everything needed to trace the numbers back to a run: versions, machine, revision, settings."""
    import gradsurgery

    device = torch.device(config.device)
    return {
        "command": command,
        "preset": config.preset,
        "methods": list(config.methods),
        "seeds": list(config.seeds),
        "device": config.device,
        "status": "running",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_revision(),
        "versions": {
            "python": platform.python_version(),
            "gradsurgery": getattr(gradsurgery, "__version__", None),
            "torch": torch.__version__,
            **{name: _version(name) for name in ("numpy", "scikit-learn", "matplotlib", "tqdm")},
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device_name": _device_name(device),
            # Step times are only as steady as the machine: a load above the core count inflates them.
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }


def _tqdm(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5, smoothing=0.05)


class _PollingBar:
    """A progress bar whose every update also lets the background toy report in (main thread only)."""

    def __init__(self, bar: Any, background: BackgroundToy) -> None:
        self.bar = bar
        self.background = background

    def __enter__(self) -> _PollingBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.background.poll()

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)


DRAW: dict[str, Callable[[dict[str, Any], Report], None]] = {
    "toy": toy.draw, "multidigits": multidigits.draw, "conflict": conflict.draw,
}


class _Figures:
    """Draws each study's figures once, when the study is done (or when the run stops)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.drawn: set[str] = set()

    def draw(self, key: str) -> None:
        data = self.report.data["studies"].get(key)
        if data and key not in self.drawn:
            DRAW[key](data, self.report)
            self.drawn.add(key)
            self.report.flush()


def run(config: StudyConfig, command: str) -> int:
    """Run the studies into ``config.out``; returns the process exit status."""
    # One intra-op thread: the models are tiny, so threads only add contention and timing noise.
    torch.set_num_threads(1)
    device = torch.device(config.device)
    report = Report(config.out, collect_meta(config, command))
    run_toy = any(toy.runs_on_toy(m) for m in config.methods)
    background_toy = run_toy and (os.cpu_count() or 1) >= 2
    report.data["meta"]["toy_in_second_process"] = background_toy
    report.flush()
    figures = _Figures(report)
    began, cpu_began = time.perf_counter(), time.process_time()
    background: BackgroundToy | None = None

    def make_bar(total: int, desc: str) -> Any:
        bar = _tqdm(total, desc)
        return bar if background is None else _PollingBar(bar, background)

    status, code = "complete", 0
    try:
        if background_toy:
            background = BackgroundToy(config.toy, config.methods, report, _tqdm)
        elif run_toy:
            toy.run_study(config.toy, config.methods, report, _tqdm)
            figures.draw("toy")
        multidigits.run_study(config.digits, config.methods, config.seeds, device, report, make_bar)
        figures.draw("multidigits")
        conflict.run_study(config.conflict, config.methods, config.seeds, device, report, make_bar)
        figures.draw("conflict")
        if background is not None:
            background.finish()
            figures.draw("toy")
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
    except BaseException:
        status, code = "failed", 1
        raise
    finally:
        if background is not None and not background.done:
            background.stop()
        report.data["meta"]["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report.data["meta"].update(
            status=status,
            elapsed_s=round(time.perf_counter() - began, 1),
            # CPU seconds per process: on a busy machine, wall time says little about the run's cost.
            cpu_s={"main": round(time.process_time() - cpu_began, 1),
                   "toy_process": None if background is None or background.cpu_s is None else round(background.cpu_s, 1)},
        )
        report.flush()
        if status == "interrupted":
            # The unfinished studies' figures, from their finished runs.
            for key in DRAW:
                figures.draw(key)
    print(f"\n{status}: results in {config.out}/ (results.json, results.md, results.tex, *.png) "
          f"after {report.data['meta']['elapsed_s']:.0f} s", file=sys.stderr)
    return code
