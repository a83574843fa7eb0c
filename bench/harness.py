"""The one timing harness of the speed suites: interleaved rounds, medians, same-run ratios, JSON lines.

Timings are wall-clock ``time.perf_counter`` intervals around one call (CPU tensors: the call returns
when the work is done, so no synchronisation is needed; a CUDA caller must synchronise inside ``fn``).
Compared variants run **interleaved** — one call of each per round, the order shuffled every round
(A B C, B C A, C A B, …) — so that load from other processes hits all of them alike and no variant
always runs right after the same neighbour. Reported are medians over the rounds, and ratios taken in
the same run: the ratio of the medians and, less sensitive to slow drifts of the load, the median of
the per-round ratios (each round's two timings are seconds apart).

:func:`peak_memory_during` measures the resident-set high-water mark of a step in a fresh
interpreter: the peak RSS (``VmHWM``) while the step runs, minus the RSS just before it, after the
model, data and imports were built and the high-water mark was reset. It counts every page the process
touched (torch's CPU allocations, Python objects, library workspaces), at page granularity; memory
that the allocator frees but keeps mapped is not double-counted, and the peak is exact whatever
happens between two samples because the kernel keeps it.
"""

from __future__ import annotations

import datetime as _datetime
import functools
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LIBRARY_DIRS = ("gradsurgery", "kernels")


# ---------------------------------------------------------------------- timing


_ORDER_RNG = random.Random(0)

def measure(fn: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleave(
    variants: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    rounds: int,
    min_rounds: int = 3,
    budget_s: float | None = None,
    inner: Mapping[str, int] | None = None,
) -> dict[str, list[float]]:
    """Per variant, one time per round (seconds), the variants interleaved as the module says.

    ``warmup`` untimed rounds come first. After ``min_rounds`` timed rounds, no new round starts once
    ``budget_s`` seconds of timed rounds have passed. ``inner[name] = k`` times ``k`` back-to-back calls
    of a fast variant in each round and keeps their median, so that sub-millisecond variants are not
    one timer tick each.
    """
    names = list(variants)
    inner = dict(inner or {})
    for _ in range(warmup):
        for name in names:
            for _ in range(inner.get(name, 1)):
                variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and budget_s is not None and time.perf_counter() - started > budget_s:
            break
        # A fresh order every round (seeded): a rotation would keep each variant behind the same
        # neighbour, whose cache and allocator state it then inherits every time.
        for name in _ORDER_RNG.sample(names, len(names)):
            fn = variants[name]
            calls = []
            for _ in range(inner.get(name, 1)):
                start = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - start)
            times[name].append(statistics.median(calls))
    return times


def summarize(times: Mapping[str, list[float]], *, baselines: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Median, quartiles and minimum per variant; ``ratio_to[b]`` for every baseline name ``b``.

    ``baselines`` maps a label to a variant name, e.g. ``{"naive": "naive-sum"}``; each variant gets
    ``ratio_to[label] = {"of_medians": …, "median_paired": …}`` against that variant of the same run.
    """
    out: dict[str, dict] = {}
    for name, samples in times.items():
        q = _quartiles(samples)
        entry: dict[str, Any] = {
            "median_s": statistics.median(samples),
            "q1_s": q[0],
            "q3_s": q[1],
            "min_s": min(samples),
            "rounds": len(samples),
            "samples_s": [round(s, 9) for s in samples],
            "ratio_to": {},
        }
        for label, base in (baselines or {}).items():
            entry["ratio_to"][label] = ratio(times, name, base)
        out[name] = entry
    return out


def ratio(times: Mapping[str, list[float]], name: str, base: str) -> dict[str, float]:
    """``name ÷ base`` in the same run: ratio of the medians and median of the per-round ratios."""
    a, b = times[name], times[base]
    paired = [x / y for x, y in zip(a, b)]
    return {"of_medians": statistics.median(a) / statistics.median(b), "median_paired": statistics.median(paired)}


def _quartiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


# ---------------------------------------------------------------------- memory


def peak_memory_during(
    factory: Callable[[], Callable[[], object]],
    *,
    calls: int = 2,
    threads: int | None = None,
    steady_calls: int = 0,
    mmap_threshold: int | None = None,
) -> dict[str, int]:
    """Peak extra resident memory (bytes) of ``calls`` calls of ``factory()``, in a fresh interpreter.

    ``factory`` must be picklable (a module-level function or a ``functools.partial`` of one): the
    child process imports it, builds the step with it (model, data, imports), resets the kernel's
    high-water mark (``/proc/self/clear_refs``), then runs the step. Returns ``baseline_rss`` (bytes
    resident before the first call), ``peak_rss`` and ``peak_extra = peak_rss − baseline_rss``; the
    extra includes whatever the first calls allocate for good (optimizer state, a wrapper's buffers).

    ``steady_calls > 0`` then resets the high-water mark again and runs that many more calls:
    ``steady_peak_rss`` and ``steady_peak_extra`` (still over the same ``baseline_rss``, so what the
    first calls kept counts) are the peak of a later step, without what only the first calls needed
    for a while.

    ``mmap_threshold`` (bytes) starts the child with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed: every
    allocation from that size up gets its own mapping, returned to the system when freed. By default
    glibc raises the threshold after the first large free and serves later large tensors from its heap,
    which it keeps resident after they are freed, so the resident set then depends on the order of
    earlier allocations; with a fixed threshold it follows the live large tensors. Linux (glibc) only.
    """
    context = multiprocessing.get_context("spawn")
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    try:
        with context.Pool(1) as pool:
            return pool.apply(_peak_memory_child, (factory, calls, threads, steady_calls))
    finally:
        if mmap_threshold is not None:
            if saved is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def _peak_memory_child(
    factory: Callable[[], Callable[[], object]], calls: int, threads: int | None, steady_calls: int = 0
) -> dict[str, int]:
    import gc

    if threads is not None:
        torch.set_num_threads(threads)
    step = factory()
    gc.collect()
    _reset_peak_rss()
    baseline = _proc_status_bytes("VmRSS")
    for _ in range(calls):
        step()
    peak = _proc_status_bytes("VmHWM")
    result = {"baseline_rss": baseline, "peak_rss": peak, "peak_extra": peak - baseline}
    if steady_calls > 0:
        gc.collect()
        _reset_peak_rss()
        for _ in range(steady_calls):
            step()
        steady = _proc_status_bytes("VmHWM")
        result.update(steady_peak_rss=steady, steady_peak_extra=steady - baseline)
    return result


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


# ---------------------------------------------------------------------- provenance


@functools.cache
def context() -> dict[str, Any]:
    """Machine, versions and source revision, attached to every recorded row."""
    return {"machine": _machine(), "versions": _versions(), "git": _git()}


def record(path: str | os.PathLike, row: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``row`` plus timestamp, threads, machine, versions and git revision as one JSON line."""
    full = {
        "timestamp": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        **row,
        "torch_threads": torch.get_num_threads(),
        **context(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(full, sort_keys=False) + "\n")
    return full


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": load,
    }


def _versions() -> dict[str, str | None]:
    import gradsurgery

    versions: dict[str, str | None] = {"torch": torch.__version__, "gradsurgery": gradsurgery.__version__}
    for dist in ("torchjd", "pytorch_optimizer", "cvxpy", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _git() -> dict[str, Any]:
    """``rev``: short HEAD; ``dirty``: tracked changes anywhere; ``library_dirty``: tracked or untracked
    changes under the library folders; ``library_digest``: SHA-256 of the library's ``.py`` files, which
    pins the measured code even before it is committed."""

    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    rev = run("rev-parse", "--short", "HEAD")
    tracked = run("status", "--porcelain", "--untracked-files=no")
    library = run("status", "--porcelain", "--", *_LIBRARY_DIRS)
    digest = hashlib.sha256()
    for folder in _LIBRARY_DIRS:
        for file in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(file.relative_to(REPO_ROOT)).encode())
            digest.update(file.read_bytes())
    return {
        "rev": rev.strip() if rev else None,
        "dirty": bool(tracked.strip()) if tracked is not None else None,
        "library_dirty": bool(library.strip()) if library is not None else None,
        "library_digest": digest.hexdigest()[:16],
    }


# ---------------------------------------------------------------------- printing


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned columns (left-aligned first column)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
