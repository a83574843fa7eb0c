"""The suite's measurements, each recorded as one JSON line: step times of the variants on one problem,
the tiny problem's per-step overhead, and the peak extra memory of a step in a fresh process."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.methods import CAGRAD_C, engine_in_use
from bench.suite.variants import GRANULARITIES, LR, Spec, make_step, method_of, period_of, period_sample, shared_numel
from bench.tiny import TINY_KINDS, make_tiny_step

MMAP_THRESHOLD = 1 << 17  # glibc's default before it adapts: large tensors mapped alone, unmapped when freed
MEMORY_KINDS = (
    "naive",
    "floor",
    "floor-batched",
    "gs-pcgrad-loop",
    "gs-cagrad-loop",
    "gs-mgda-loop",
    "gs-pcgrad-batched",
    "gs-pcgrad-repr",
    "gs-pcgrad-loop-bf16",
    "torchjd-pcgrad",
    "torchjd-mgda",
    "autogram-pcgrad",
    "pyo-pcgrad",
)
PEERS = (("over_torchjd", "torchjd"), ("over_autogram", "autogram"), ("over_pyo", "pyo"))


def peer_of(kind: str, prefix: str) -> str:
    """The peer variant of the same method: ``gs-cagrad-loop`` → ``torchjd-cagrad``."""
    return f"{prefix}-{method_of(kind)}"


def whole_of(kind: str) -> str | None:
    """The whole-model variant of a per-block one: ``gs-pcgrad-loop-module`` → ``gs-pcgrad-loop``."""
    base, _, option = kind.rpartition("-")
    return base if kind.startswith("gs-") and option in GRANULARITIES else None


def ratios_of(times: dict[str, list[float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant, its same-run ratios: ÷ naive, ÷ floor, ours ÷ each peer of the same method (a
    TorchJD scalarizer for a loss-weighting method), and a per-block variant ÷ its whole-model one."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in times:
        entry = {"over_naive": harness.ratio(times, kind, "naive"), "over_floor": harness.ratio(times, kind, "floor")}
        if kind.startswith("gs-"):
            if "-batched" in kind and "floor-batched" in times:
                entry["over_floor_batched"] = harness.ratio(times, kind, "floor-batched")
            for label, prefix in PEERS:
                if peer_of(kind, prefix) in times:
                    entry[label] = harness.ratio(times, kind, peer_of(kind, prefix))
            whole = whole_of(kind)
            if whole in times:
                entry["over_whole"] = harness.ratio(times, kind, whole)
        out[kind] = entry
    return out


def ideal_every(times: dict[str, list[float]], periods: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per period ``k`` in the run, the ideal ``every=k`` step ÷ the floor: one floor step and ``k − 1``
    naive steps, ``(floor + (k − 1)·naive) / (k·floor)``, from the medians and per round (paired)."""
    out = {}
    for k in sorted(set(periods.values()) - {1}):
        naive, floor = times["naive"], times["floor"]
        paired = [(f + (k - 1) * n) / (k * f) for n, f in zip(naive, floor)]
        medians = (statistics.median(floor) + (k - 1) * statistics.median(naive)) / (k * statistics.median(floor))
        out[f"every{k}"] = {"of_medians": medians, "median_paired": statistics.median(paired)}
    return out


def _engines(variants: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per wrapper variant: the engine asked for and, by the documented rule, the one in use (CPU)."""
    out = {}
    for kind, step in variants.items():
        wrapper = getattr(step, "wrapper", None)
        if wrapper is not None and hasattr(wrapper, "engine"):
            out[kind] = {"requested": wrapper.engine, "in_use": engine_in_use(wrapper, torch.device("cpu"))}
    return out


def bench_time(
    spec: Spec, kinds: tuple[str, ...], *, warmup: int, budget_s: float, out: Path, run_id: str
) -> dict[str, Any]:
    variants = {kind: make_step(spec, kind) for kind in kinds}
    periods = {kind: period_of(step) for kind, step in variants.items()}
    samples = {kind: period_sample(step) for kind, step in variants.items()}
    started = time.perf_counter()
    times = harness.interleave(samples, warmup=warmup, rounds=60, min_rounds=3, budget_s=budget_s)
    elapsed = time.perf_counter() - started
    # An every=k sample is k consecutive steps (one refresh, k − 1 cheap ones): its mean step.
    times = {kind: [t / periods[kind] for t in ts] for kind, ts in times.items()}
    summary = harness.summarize(times)
    row = harness.record(
        out,
        {
            "bench": "suite",
            "run": run_id,
            "kind": "time",
            "model": spec.model,
            "T": spec.T,
            "spec": dataclasses.asdict(spec),
            "description": spec.describe(),
            "shared_params": shared_numel(spec),
            "optimizer": f"SGD(lr={LR})",
            "cagrad_c": CAGRAD_C,
            "ratios": ratios_of(times),
            "periods": {kind: k for kind, k in periods.items() if k > 1},
            "ideal_over_floor": ideal_every(times, periods),
            "gs_engines": _engines(variants),
            "wall_s": elapsed,
            "variants": summary,
        },
    )
    print(
        f"  {spec.label}: {elapsed:.0f}s, {summary['naive']['rounds']} rounds, naive {summary['naive']['median_s'] * 1e3:.1f} ms",
        flush=True,
    )
    del variants
    return row


def bench_tiny(*, rounds: int, budget_s: float, out: Path, run_id: str) -> dict[str, Any]:
    """The tiny problem (``bench.tiny``: x ∈ R², two conflicting losses): µs per step over the 2-backward floor."""
    variants = {kind: make_tiny_step(kind) for kind in TINY_KINDS}
    times = harness.interleave(variants, warmup=20, rounds=rounds, min_rounds=20, budget_s=budget_s)
    summary = harness.summarize(times, baselines={"floor": "floor"})
    overhead = {}
    for kind in TINY_KINDS:
        paired = [a - b for a, b in zip(times[kind], times["floor"])]
        overhead[kind] = {
            "of_medians_us": (summary[kind]["median_s"] - summary["floor"]["median_s"]) * 1e6,
            "median_paired_us": statistics.median(paired) * 1e6,
        }
    return harness.record(
        out,
        {
            "bench": "suite",
            "run": run_id,
            "kind": "tiny",
            "T": 2,
            "problem": "bench.tiny.make_tiny_step: x in R^2, L1=(x.a)^2, L2=sin(x.b), conflicting gradients, SGD(lr=0)",
            "overhead_over_floor": overhead,
            "gs_engines": {kind: engines["in_use"] for kind, engines in _engines(variants).items()},
            "variants": {k: {kk: vv for kk, vv in v.items() if kk != "samples_s"} for k, v in summary.items()},
        },
    )


def bench_memory(spec: Spec, kinds: tuple[str, ...], *, threads: int, out: Path, run_id: str) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        try:
            results[kind] = harness.peak_memory_during(
                functools.partial(make_step, spec, kind),
                calls=2,
                threads=threads,
                steady_calls=2,
                mmap_threshold=MMAP_THRESHOLD,
            )
        except Exception as error:  # noqa: BLE001 — a step that fails in its child is a result, not the end of the run
            results[kind] = {"error": f"{type(error).__name__}: {error}"[:400]}
            print(f"  memory {spec.label} {kind}: {results[kind]['error']}", flush=True)
    print(f"  memory {spec.label}: done", flush=True)
    return harness.record(
        out,
        {
            "bench": "suite",
            "run": run_id,
            "kind": "memory",
            "model": spec.model,
            "T": spec.T,
            "spec": dataclasses.asdict(spec),
            "shared_params": shared_numel(spec),
            "measure": "peak RSS during the first 2 steps minus RSS before them (peak_extra), and during 2 later steps "
            "minus the same baseline (steady_peak_extra); fresh spawned interpreter (harness.peak_memory_during), "
            f"glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
            "mmap_threshold": MMAP_THRESHOLD,
            "variants": results,
        },
    )
