"""Runs the studies as units of work on the worker processes, filing each result as it finishes.

The parent registers the studies, hands the units to :class:`~bench.study.pool.Pool`, folds every
finished unit into the report (rewritten at once: a Ctrl-C keeps what is done), draws a study's
figures when its last unit is in, and prints one line per unit (a bar on a terminal).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from . import conflict, multidigits, timing, toy, tradeoff
from .config import StudyConfig, tradeoff_entries
from .methods import label
from .pool import Done, Pool, Unit
from .progress import Progress
from .report import Report

EXIT_INTERRUPTED = 130
OUTPUTS = ("results.json", "results.md", "results.tex")
# The instruction-set extensions that change which kernels torch (and its BLAS) runs on x86, hence
# the last bits of every float result.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")


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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_description() -> dict[str, Any]:
    """The CPU and the instruction set the numbers were computed with.

    The study's results are bit-for-bit repeatable on one machine, but torch picks its CPU kernels by
    instruction set (``torch.backends.cpu.get_cpu_capability()``: ``DEFAULT``, ``AVX2``, ``AVX512``, …)
    and so does its BLAS: another CPU rounds differently, and trained networks drift apart from there.
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id"),
        "architecture": platform.machine(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS} if flags else None,
        "torch_cpu_capability": capability,
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "mkl": bool(torch.backends.mkl.is_available()),  # type: ignore[no-untyped-call]
        "mkldnn": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]
    }


def isa_summary(cpu: dict[str, Any]) -> str:
    """``"AMD EPYC, torch kernels AVX512 (avx2, avx512f, avx512_bf16; no amx)"``."""
    isa = cpu.get("isa")
    if isa is None:
        return f"{cpu['model']} ({cpu['architecture']}), torch kernels {cpu['torch_cpu_capability']}"
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if isa.get(f)]
    amx = "" if isa.get("amx_tile") else "; no amx"
    return f"{cpu['model']}, torch kernels {cpu['torch_cpu_capability']} ({', '.join(shown) or 'no avx2'}{amx})"


def collect_meta(config: StudyConfig, command: str, workers: int) -> dict[str, Any]:
    """Everything needed to trace the numbers back to a run: versions, machine, revision, settings."""
    import gradsurgery

    device = torch.device(config.device)
    cpu = cpu_description()
    return {
        "command": command,
        "preset": config.preset,
        "methods": list(config.methods),
        "seeds": list(config.seeds),
        "tradeoff": config.tradeoff,
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
            "cpu": cpu["model"],
            "cpu_isa": cpu,
            "cpu_count": os.cpu_count(),
            "workers": workers,
            "torch_threads_per_worker": 1,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu["model"],
            # Step times are only as steady as the machine: a load above the core count inflates them.
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "reproducibility": (
            "Deterministic on this machine (every unit seeds itself and runs on one thread, whichever worker runs it); "
            "another CPU or instruction set (machine.cpu_isa) rounds differently and moves the last digits."
        ),
    }


def claim_folder(folder: Path) -> str | None:
    """Make ``folder`` ready for a new run. A complete earlier run there is moved to ``<folder>.previous``
    (replacing the one kept there before) and an incomplete one is replaced; returns what was done, to
    be said before the run starts, or ``None`` when the folder held no run."""
    results = folder / "results.json"
    if not results.exists():
        folder.mkdir(parents=True, exist_ok=True)
        return None
    try:
        meta = json.loads(results.read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        meta = {}
    if meta.get("status") == "complete":
        aside = folder.with_name(folder.name + ".previous")
        if aside.exists():
            shutil.rmtree(aside)
        folder.rename(aside)
        folder.mkdir(parents=True)
        return (f"note: {folder}/ held the complete run of {meta.get('started', '?')} (`{meta.get('command', '?')}`): "
                f"moved to {aside}/")
    for path in [*(folder / name for name in OUTPUTS), *folder.glob("*.png")]:
        path.unlink(missing_ok=True)
    return f"note: replacing the {meta.get('status', 'unreadable')} run in {folder}/"


class _Studies:
    """The registered studies, their units, and what to do with each finished one."""

    def __init__(self, config: StudyConfig, report: Report) -> None:
        self.config, self.report = config, report
        device = torch.device(config.device)
        seeds, methods = config.seeds, config.methods
        self.units: list[Unit] = []
        self.pending: Counter[str] = Counter()
        self.file: dict[str, Callable[[Done], str]] = {}
        self.draw: dict[str, Callable[[], None]] = {}
        self.drawn: set[str] = set()

        chosen, pareto, target = toy.prepare(config.toy, methods, report) if any(toy.runs_on_toy(m) for m in methods) else ([], None, None)
        if chosen:
            toy_data = report.data["studies"]["toy"]
            for group in toy.units(chosen):
                self._add("toy", Unit(("toy", group), f"toy {' + '.join(label(m) for m in group)}, {config.toy.steps:,} steps × "
                                      f"{len(toy.STARTS)} starts", toy.run_unit, (config.toy, group, pareto, target)))
            self.file["toy"] = lambda done: toy.store(toy_data, done.result, done.seconds, done.cpu_seconds)
            self.draw["toy"] = lambda: toy.draw(toy_data, report)

        extra = tradeoff_entries() if config.tradeoff else ()
        variants = {
            multidigits.TWO.key: multidigits.prepare(multidigits.TWO, config.digits, methods, (), seeds, device, report),
            multidigits.FOUR.key: multidigits.prepare(multidigits.FOUR, config.digits, methods, extra, seeds, device, report),
        }
        trade = tradeoff.prepare(extra, report) if config.tradeoff else None
        conflict_data = conflict.prepare(config.conflict, methods, seeds, device, report)

        short = {multidigits.TWO.key: "2 tasks", multidigits.FOUR.key: "4 tasks"}
        for seed in seeds:
            for key in (multidigits.FOUR.key, multidigits.TWO.key):
                for entry in variants[key]["entries"]:
                    self._add(key, Unit((key, entry, seed), f"MultiDigits {short[key]}: {label(entry)}, seed {seed}",
                                        multidigits.run_unit, (key, config.digits, entry, seed, config.device)))
        for key, variant in variants.items():
            self._add(key, Unit(("timing", key), f"MultiDigits {short[key]}: interleaved step times", timing.run_unit,
                                (key, config.digits, variant["entries"], config.timing.rounds, config.timing.budget_s,
                                 config.device)))
            self.file[key] = self._filer_digits(variant, trade)
            self.draw[key] = (lambda d: lambda: multidigits.draw(d, report))(variant)
        if trade is not None:
            self.draw["tradeoff"] = lambda: tradeoff.draw(trade, report)
        for seed in seeds:
            for method in ("stl", *methods):
                self._add("conflict", Unit(("conflict", method, seed), f"conflict sweep: {label(method)}, seed {seed}",
                                           conflict.run_unit, (config.conflict, method, seed, config.device)))
        self.file["conflict"] = lambda done: conflict.store(conflict_data, done.unit.key[1], done.unit.key[2], done.result)
        self.draw["conflict"] = lambda: conflict.draw(conflict_data, report)

    def _add(self, study: str, unit: Unit) -> None:
        self.units.append(unit)
        self.pending[study] += 1

    def _filer_digits(self, data: dict[str, Any], trade: dict[str, Any] | None) -> Callable[[Done], str]:
        def file(done: Done) -> str:
            if done.unit.key[0] == "timing":
                multidigits.store_timing(data, done.result)
                text = timing.headline(done.result)
            else:
                _, entry, seed = done.unit.key
                multidigits.store(data, entry, seed, done.result)
                text = multidigits.headline(data, entry, done.result)
            if trade is not None and data["variant"] == multidigits.FOUR.key:
                tradeoff.refresh(trade, data)
            return text

        return file

    @staticmethod
    def study_of(unit: Unit) -> str:
        """The study a unit belongs to: its key's first entry (a timing unit's: the variant, its second)."""
        study: str = unit.key[1] if unit.key[0] == "timing" else unit.key[0]
        return study

    def finish(self, done: Done) -> str:
        """File a finished unit; draw its study's figures if it was the last. Returns the log line's result."""
        study = self.study_of(done.unit)
        text = self.file[study](done)
        self.pending[study] -= 1
        self.report.flush()
        if self.pending[study] == 0:
            self.draw_study(study)
            if study == multidigits.FOUR.key and "tradeoff" in self.draw:
                self.draw_study("tradeoff")
        return text

    def draw_study(self, study: str) -> None:
        if study in self.draw and study not in self.drawn:
            self.draw[study]()
            self.drawn.add(study)
            self.report.flush()

    def draw_rest(self) -> None:
        """The figures of the studies not drawn yet, from their finished units (an interrupted run)."""
        for study in list(self.draw):
            self.draw_study(study)


def run(config: StudyConfig, command: str) -> int:
    """Run the studies into ``config.out``; returns the process exit status."""
    torch.set_num_threads(1)
    workers = max(1, min(2, os.cpu_count() or 1))
    notice = claim_folder(config.out)
    report = Report(config.out, collect_meta(config, command, workers))
    meta = report.data["meta"]
    began, cpu_began = time.perf_counter(), time.process_time()
    studies = _Studies(config, report)
    report.flush()
    progress = Progress(len(studies.units))
    progress.say(f"{command}: {config.preset} preset, {len(studies.units)} units on {workers} worker process(es); "
                 f"results go to {config.out}/ (results.json, results.md, results.tex, *.png), rewritten as units finish")
    if notice:
        progress.say(notice)
    unit_log: list[dict[str, Any]] = []
    meta["units"] = unit_log
    status, code = "complete", 0
    try:
        with Pool(workers) as pool:
            for done in pool.run(studies.units):
                unit_log.append({"study": studies.study_of(done.unit), "unit": done.unit.label, "seconds": round(done.seconds, 2),
                                 "cpu_seconds": round(done.cpu_seconds, 2), "worker": done.worker})
                text = studies.finish(done)
                progress.finished(done.unit.label, text, done.seconds)
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_INTERRUPTED
    except BaseException:
        status, code = "failed", 1
        raise
    finally:
        progress.close()
        meta["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        by_study: Counter[str] = Counter()
        for entry in unit_log:
            by_study[entry["study"]] += entry["cpu_seconds"]
        meta.update(
            status=status,
            elapsed_s=round(time.perf_counter() - began, 1),
            # CPU seconds: the units' in the workers, by study, and the parent's own (set-up, report, figures).
            cpu_s={**{study: round(seconds, 1) for study, seconds in by_study.items()},
                   "parent": round(time.process_time() - cpu_began, 1)},
        )
        report.flush()
        if status != "complete":
            studies.draw_rest()
    progress.say(f"{status}: results in {config.out}/ (results.json, results.md, results.tex, *.png) "
                 f"after {meta['elapsed_s']:.0f} s")
    return code
