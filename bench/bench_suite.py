"""The speed suite, CPU: every way of training a shared model on T losses, one interleaved run, one table.

Two models, each with one head per task reading the shared encoder's output ``z``:

- ``mlp``: trunk ``256 → 1024 → 1024 → 1024`` (ReLU after each layer, 2.36M shared parameters), one
  ``Linear(1024, 1)`` head per task, batch 256, MSE losses, ``T ∈ {2, 4, 8, 16}``;
- ``conv``: ``conv 3→32`` (3×3), ``conv 32→64`` (3×3, stride 2), ``conv 64→64`` (3×3, stride 2), ReLU after
  each, global average pool → 64 features (56k shared parameters), one ``Linear(64, 10)`` head per task
  with cross-entropy, ``3 × 32 × 32`` inputs, batch 128, ``T = 3``.

Variants of one step (forward included, SGD, each on its own copy of the same initial model):

- ``naive``: ``sum(losses).backward(); step``;
- ``floor``: ``T × torch.autograd.grad`` of all parameters and nothing else — what any method that
  needs the T task gradients pays at least; ``floor-batched``: the same T gradients from one vmapped
  backward (the floor of a batched engine);
- ``gs-{pcgrad,cagrad,mgda}-{loop,batched}``: our wrappers in parameter mode, ``engine="loop"`` / ``"batched"``;
  ``gs-{…}-repr``: representation mode, ``opt.backward(losses, features=z)``; ``gs-pcgrad-loop-bf16``: the
  loop with ``storage_dtype=torch.bfloat16``;
- ``torchjd-{…}``: TorchJD's autojac path, ``mtl_backward(losses, features=z)`` then
  ``jac_to_grad(encoder params, aggregator)``;
- ``autogram-{…}``: TorchJD's autogram engine, ``Engine(encoder, batch_dim=None)`` built once;
  ``G = engine.compute_gramian(stack(losses))``, ``w = weighting(G)``, ``stack(losses).backward(w)``. The
  losses are per task (means over the batch), so ``batch_dim=None`` (``batch_dim=0`` needs per-sample
  losses: instance-wise risk). The heads get ``w_t``-weighted gradients here, not their plain ones;
- ``pyo-pcgrad``: ``pytorch_optimizer.PCGrad(opt, reduction="sum").pc_backward(losses)``, step.

Also: the tiny-problem overhead over the 2-backward floor (``bench.tiny``, with ``minimal-pcgrad``: the
same PCGrad step written by hand with no library, the design's lower bound),
and, for the MLP at T = 8 and the conv model, the peak extra resident memory in a fresh process
(``harness.peak_memory_during``, glibc's mmap threshold fixed) of the first 2 steps and of 2 later ones.
Every target of the issue is checked against the run (``targets``).

    python -m bench.bench_suite            # ~7 minutes on 1 thread; records, writes the tables and the plot
    python -m bench.bench_suite --quick    # a smoke run (< 1 min) into /tmp/gradsurgery-bench-suite/
    python -m bench.bench_suite --report   # rewrite suite.md and the plot from the last recorded run
    python -m bench.bench_suite --profile gs-pcgrad-loop --model mlp --T 8   # where one variant's time goes

Rows are appended to ``bench/results/suite.jsonl``; ``bench/results/suite.md`` (the tables; the notes
below its marker line are kept) and ``bench/results/step_time_vs_T.png`` are rewritten from the run.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import datetime
import functools
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import gradsurgery as gs
from bench import harness
from bench.peers import CAGRAD_C, torchjd_aggregator, torchjd_weighting
from bench.tiny import TINY_KINDS, make_tiny_step

LR = 1e-4
METHODS = ("pcgrad", "cagrad", "mgda")
MMAP_THRESHOLD = 1 << 17  # glibc's default before it adapts: large tensors mapped alone, unmapped when freed
BF16_MIN_SAVING = 16 * 2**20  # below this, the RSS differences between fresh processes (a few MiB) hide the saving
MODES = ("loop", "batched", "repr")
KINDS = (
    "naive",
    "floor",
    "floor-batched",
    *(f"gs-{m}-{mode}" for mode in MODES for m in METHODS),
    "gs-pcgrad-loop-bf16",
    *(f"torchjd-{m}" for m in METHODS),
    *(f"autogram-{m}" for m in METHODS),
    "pyo-pcgrad",
)
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
NOTES_MARKER = "<!-- Hand-written notes below this line are kept when bench_suite rewrites the file above it. -->"
PLOT_KINDS = (
    "naive",
    "floor",
    "gs-pcgrad-loop",
    "gs-cagrad-loop",
    "gs-mgda-loop",
    "gs-pcgrad-repr",
    "gs-mgda-repr",
    "torchjd-pcgrad",
    "torchjd-mgda",
    "autogram-pcgrad",
    "pyo-pcgrad",
)


# ---------------------------------------------------------------------- the two models


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmark problem (picklable: the memory runs rebuild it in a fresh interpreter)."""

    model: str  # "mlp" or "conv"
    T: int
    batch: int
    width: int = 1024  # mlp only
    inputs: int = 256  # mlp only

    @property
    def label(self) -> str:
        return f"{self.model} T={self.T}"

    def describe(self) -> str:
        if self.model == "mlp":
            w = self.width
            return f"trunk {self.inputs}→{w}→{w}→{w} ReLU, one Linear({w}, 1) head per task, MSE, batch {self.batch}"
        return (
            "conv 3→32, 32→64 s2, 64→64 s2 (3×3, ReLU), avg pool → 64; one Linear(64, 10) head per task, CE, "
            f"batch {self.batch}, 3×32×32"
        )


class MultiTaskMLP(nn.Module):
    def __init__(self, num_tasks: int, *, width: int, inputs: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))


class MultiTaskConvNet(nn.Module):
    def __init__(self, num_tasks: int, *, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(64, classes) for _ in range(num_tasks))


def _new_model(spec: Spec) -> nn.Module:
    if spec.model == "mlp":
        return MultiTaskMLP(spec.T, width=spec.width, inputs=spec.inputs)
    return MultiTaskConvNet(spec.T)


@functools.cache
def _problem(spec: Spec) -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _new_model(spec)
    if spec.model == "mlp":
        x, y = torch.randn(spec.batch, spec.inputs), torch.randn(spec.T, spec.batch)
    else:
        x, y = torch.randn(spec.batch, 3, 32, 32), torch.randint(0, 10, (spec.T, spec.batch))
    return model.state_dict(), x, y


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A fresh model with the same initial weights, and the batch, for every variant."""
    state, x, y = _problem(spec)
    model = _new_model(spec)
    model.load_state_dict(copy.deepcopy(state))
    return model, x, y


def forward(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z = model.trunk(x)
    if spec.model == "mlp":
        return z, [nn.functional.mse_loss(head(z).squeeze(-1), y[t]) for t, head in enumerate(model.heads)]
    return z, [nn.functional.cross_entropy(head(z), y[t]) for t, head in enumerate(model.heads)]


def shared_numel(spec: Spec) -> int:
    return sum(p.numel() for p in _new_model(spec).trunk.parameters())


# ---------------------------------------------------------------------- the variants


def _ours(kind: str, opt: torch.optim.Optimizer) -> tuple[gs.GradSurgery, bool]:
    """Our wrapper for ``gs-{method}-{mode}[-bf16]``, and whether it runs in representation mode."""
    _, method, mode, *rest = kind.split("-")
    options: dict[str, Any] = {}
    if mode in ("loop", "batched"):
        options["engine"] = mode
    if rest == ["bf16"]:
        options["storage_dtype"] = torch.bfloat16
    if method == "pcgrad":
        wrapper = gs.PCGrad(opt, seed=0, **options)
    elif method == "cagrad":
        wrapper = gs.CAGrad(opt, c=CAGRAD_C, **options)
    else:
        wrapper = gs.MGDA(opt, **options)
    return wrapper, mode == "repr"


def make_step(spec: Spec, kind: str) -> Callable[[], None]:
    """One training step of variant ``kind`` on its own model (module-level: picklable for memory runs)."""
    model, x, y = build(spec)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    T = spec.T

    if kind == "naive":

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(spec, model, x, y)
            sum(losses).backward()
            opt.step()

    elif kind == "floor":

        def step() -> None:
            _, losses = forward(spec, model, x, y)
            for t, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=t < T - 1, allow_unused=True)

    elif kind == "floor-batched":
        eye = torch.eye(T)

        def step() -> None:
            _, losses = forward(spec, model, x, y)
            torch.autograd.grad(torch.stack(losses), params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)

    elif kind.startswith("gs-"):
        wrapper, representation = _ours(kind, opt)

        def step() -> None:
            wrapper.zero_grad()
            z, losses = forward(spec, model, x, y)
            wrapper.backward(losses, features=z if representation else None)
            wrapper.step()

        step.wrapper = wrapper  # type: ignore[attr-defined]

    elif kind.startswith("torchjd-"):
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = torchjd_aggregator(kind.split("-", 1)[1])
        shared = list(model.trunk.parameters())

        def step() -> None:
            opt.zero_grad()
            z, losses = forward(spec, model, x, y)
            mtl_backward(losses, features=z)
            jac_to_grad(shared, aggregator)
            opt.step()

    elif kind.startswith("autogram-"):
        from torchjd.autogram import Engine

        weighting = torchjd_weighting(kind.split("-", 1)[1])
        engine = Engine(model.trunk, batch_dim=None)  # once, before the forward passes it hooks

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(spec, model, x, y)
            stacked = torch.stack(losses)
            gramian = engine.compute_gramian(stacked)
            stacked.backward(weighting(gramian))
            opt.step()

    elif kind == "pyo-pcgrad":
        from pytorch_optimizer import PCGrad

        wrapper = PCGrad(opt, reduction="sum")

        def step() -> None:
            wrapper.zero_grad()
            _, losses = forward(spec, model, x, y)
            wrapper.pc_backward(losses)
            wrapper.step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return step


def _peer(kind: str, prefix: str) -> str:
    return f"{prefix}-{kind.split('-')[1]}"


def ratios_of(times: dict[str, list[float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant, its same-run ratios: ÷ naive, ÷ floor, and ours ÷ each peer of the same method."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in times:
        entry = {"over_naive": harness.ratio(times, kind, "naive"), "over_floor": harness.ratio(times, kind, "floor")}
        if kind.startswith("gs-"):
            if "-batched" in kind and "floor-batched" in times:
                entry["over_floor_batched"] = harness.ratio(times, kind, "floor-batched")
            for label, prefix in (("over_torchjd", "torchjd"), ("over_autogram", "autogram"), ("over_pyo", "pyo")):
                if _peer(kind, prefix) in times:
                    entry[label] = harness.ratio(times, kind, _peer(kind, prefix))
        out[kind] = entry
    return out


# ---------------------------------------------------------------------- runs


def bench_time(
    spec: Spec, kinds: tuple[str, ...], *, warmup: int, budget_s: float, out: Path, run_id: str
) -> dict[str, Any]:
    variants = {kind: make_step(spec, kind) for kind in kinds}
    started = time.perf_counter()
    times = harness.interleave(variants, warmup=warmup, rounds=60, min_rounds=3, budget_s=budget_s)
    elapsed = time.perf_counter() - started
    summary = harness.summarize(times)
    ratios = ratios_of(times)
    engines = {}
    buffers = {}
    for kind, step in variants.items():
        wrapper = getattr(step, "wrapper", None)
        if wrapper is None:
            continue
        engines[kind] = {"requested": wrapper.engine, "ran": wrapper._engine}
        if wrapper._buffer is not None:
            matrix = wrapper._buffer.matrix
            buffers[kind] = {"dtype": str(matrix.dtype), "shape": list(matrix.shape), "bytes": matrix.nbytes}
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
            "ratios": ratios,
            "gs_engines": engines,
            "gs_buffers": buffers,
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
    engines = {
        k: getattr(getattr(v, "wrapper", None), "_engine", None) for k, v in variants.items() if hasattr(v, "wrapper")
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
            "gs_engines": engines,
            "variants": {k: {kk: vv for kk, vv in v.items() if kk != "samples_s"} for k, v in summary.items()},
        },
    )


def bench_memory(spec: Spec, kinds: tuple[str, ...], *, threads: int, out: Path, run_id: str) -> dict[str, Any]:
    results = {}
    for kind in kinds:
        results[kind] = harness.peak_memory_during(
            functools.partial(make_step, spec, kind),
            calls=2,
            threads=threads,
            steady_calls=2,
            mmap_threshold=MMAP_THRESHOLD,
        )
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


# ---------------------------------------------------------------------- tables, targets, plot


def _r(row: dict[str, Any], kind: str, label: str, key: str = "of_medians") -> float | None:
    entry = row["ratios"].get(kind, {}).get(label)
    return None if entry is None else entry[key]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ratio_table(rows: list[dict[str, Any]], label: str) -> tuple[list[str], list[list[str]]]:
    header = ["variant"] + [f"{r['model']} T={r['T']}" for r in rows]
    body = []
    for kind in KINDS:
        cells = []
        for r in rows:
            a, b = _r(r, kind, label), _r(r, kind, label, "median_paired")
            cells.append("—" if a is None else f"{a:.2f} ({b:.2f})")
        body.append([kind, *cells])
    return header, body


def peer_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["ours", "÷"] + [f"{r['model']} T={r['T']}" for r in rows]
    body = []
    for mode in ("loop", "batched", "repr"):
        for method in METHODS:
            kind = f"gs-{method}-{mode}"
            for label, peer in (
                ("over_torchjd", "TorchJD autojac"),
                ("over_autogram", "TorchJD autogram"),
                ("over_pyo", "pytorch-optimizer"),
            ):
                cells = [_fmt(_r(r, kind, label)) for r in rows]
                if any(c != "—" for c in cells):
                    body.append([kind, peer, *cells])
    return header, body


def memory_table(mems: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["variant"]
    for m in mems:
        header += [f"{m['model']} T={m['T']}: first 2 steps, MiB (÷ naive)", "later steps"]
    body = []
    for kind in [k for k in MEMORY_KINDS if any(k in m["variants"] for m in mems)]:
        cells = []
        for m in mems:
            v = m["variants"]
            for key in ("peak_extra", "steady_peak_extra"):
                if kind not in v or key not in v[kind]:
                    cells.append("—")
                    continue
                value, base = v[kind][key], v["naive"][key]
                cells.append(f"{value / 2**20:.1f} ({value / base:.2f})" if base > 0 else f"{value / 2**20:.1f}")
        body.append([kind, *cells])
    return header, body


def targets(
    rows: list[dict[str, Any]], mems: list[dict[str, Any]], tiny: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each target of the issue, per case: the measured figure(s), the bound, met or not.

    Timing checks carry both same-run estimates: ``value`` (ratio of the medians) and ``paired`` (median
    of the per-round ratios); ``met`` is ``"yes"`` when both are within the bound, ``"no"`` when neither
    is, ``"mixed"`` otherwise (the load moved more than the margin).
    """
    out: list[dict[str, Any]] = []

    def add(
        target: str, case: str, value: float | None, bound: float, unit: str = "×", paired: float | None = None
    ) -> None:
        if value is None:
            return
        within = [v >= bound if unit == "≥" else v <= bound for v in (value, paired) if v is not None]
        met = "yes" if all(within) else ("no" if not any(within) else "mixed")
        out.append(
            {"target": target, "case": case, "value": value, "paired": paired, "bound": bound, "unit": unit, "met": met}
        )

    def add_ratio(target: str, case: str, row: dict[str, Any], kind: str, label: str, bound: float) -> None:
        add(target, case, _r(row, kind, label), bound, paired=_r(row, kind, label, "median_paired"))

    for r in rows:
        case = f"{r['model']} T={r['T']}"
        for engine in ("loop", "batched"):
            for method in METHODS:
                kind = f"gs-{method}-{engine}"
                if r["T"] >= 4:
                    add_ratio(
                        f"parameter mode ({engine}) ≤ 1.10× the T-backward floor (T ≥ 4)",
                        f"{case} {kind}",
                        r,
                        kind,
                        "over_floor",
                        1.10,
                    )
                    add_ratio(
                        f"parameter mode ({engine}) ≤ 0.75× TorchJD autojac (T ≥ 4)",
                        f"{case} {kind}",
                        r,
                        kind,
                        "over_torchjd",
                        0.75,
                    )
                    add_ratio(
                        f"parameter mode ({engine}) ≤ 0.75× TorchJD autogram (T ≥ 4)",
                        f"{case} {kind}",
                        r,
                        kind,
                        "over_autogram",
                        0.75,
                    )
        for method in METHODS:
            if r["T"] <= 8:
                kind = f"gs-{method}-repr"
                add_ratio("representation mode ≤ 1.3× naive (T ≤ 8)", f"{case} {kind}", r, kind, "over_naive", 1.3)
    for m in mems:
        case = f"{m['model']} T={m['T']}"
        v = m["variants"]
        for kind in v:
            if kind.startswith("gs-") and not kind.endswith("-repr"):
                for prefix, name in (("torchjd", "autojac"), ("autogram", "autogram")):
                    peer = _peer(kind, prefix) if _peer(kind, prefix) in v else f"{prefix}-pcgrad"
                    if peer in v:
                        steady = _steady_ratio(v[kind], v[peer])
                        add(
                            f"parameter-mode peak memory ≤ TorchJD {name}'s (first steps; later steps)",
                            f"{case} {kind} ÷ {peer}",
                            v[kind]["peak_extra"] / v[peer]["peak_extra"],
                            1.0,
                            paired=steady,
                        )
        half_buffer = m["T"] * m["shared_params"] * 2  # bytes that bf16 storage saves on the fp32 (T, P) buffer
        if "gs-pcgrad-loop-bf16" in v and "gs-pcgrad-loop" in v and half_buffer >= BF16_MIN_SAVING:
            saved = [
                v["gs-pcgrad-loop"][key] - v["gs-pcgrad-loop-bf16"][key]
                for key in ("peak_extra", "steady_peak_extra")
                if key in v["gs-pcgrad-loop"]
            ]
            add(
                "bf16 storage: peak extra drops by the saved half buffer (saving ÷ T·P·2 bytes; first steps; later steps)",
                f"{case} gs-pcgrad-loop-bf16",
                saved[0] / half_buffer,
                0.9,
                "≥",
                paired=saved[1] / half_buffer if len(saved) > 1 else None,
            )
    for r in rows:
        buffers = r.get("gs_buffers", {})
        if "gs-pcgrad-loop-bf16" in buffers and "gs-pcgrad-loop" in buffers:
            ratio = buffers["gs-pcgrad-loop-bf16"]["bytes"] / buffers["gs-pcgrad-loop"]["bytes"]
            add("bf16 storage: (T, P) buffer = ½ of fp32's", f"{r['model']} T={r['T']}", ratio, 0.5)
    if tiny is not None:
        for kind in TINY_KINDS:
            if kind.startswith("gs-"):
                o = tiny["overhead_over_floor"][kind]
                add(
                    "tiny problem: overhead ≤ 150 µs over the floor",
                    kind,
                    o["of_medians_us"],
                    150.0,
                    "µs",
                    paired=o["median_paired_us"],
                )
    return out


def _steady_ratio(a: dict[str, int], b: dict[str, int]) -> float | None:
    if "steady_peak_extra" not in a or "steady_peak_extra" not in b:
        return None
    return a["steady_peak_extra"] / b["steady_peak_extra"]


def target_summary(checks: list[dict[str, Any]]) -> list[list[str]]:
    """Per target: how many cases meet it (both estimates), are mixed, miss it; the range of the figures."""
    rows = []
    for target in dict.fromkeys(c["target"] for c in checks):
        cs = [c for c in checks if c["target"] == target]
        counts = {k: sum(c["met"] == k for c in cs) for k in ("yes", "mixed", "no")}
        values = [c["paired"] if c["paired"] is not None else c["value"] for c in cs]
        unit = cs[0]["unit"]
        rows.append(
            [
                target,
                str(counts["yes"]),
                str(counts["mixed"]),
                str(counts["no"]),
                f"{_fmt_check(min(values), unit)} – {_fmt_check(max(values), unit)}",
            ]
        )
    return rows


def _fmt_check(value: float, unit: str) -> str:
    return f"{value:.0f} µs" if unit == "µs" else (f"{value:.3g}" if unit == "≥" else f"{value:.3g}×")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    mlp = sorted((r for r in rows if r["model"] == "mlp"), key=lambda r: r["T"])
    if not mlp:
        return
    Ts = [r["T"] for r in mlp]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_ms, ax_ratio = fig.subplots(1, 2)
    styles = {"naive": ("k", "-"), "floor": ("0.45", "--")}
    colours = {"pcgrad": "tab:blue", "cagrad": "tab:orange", "mgda": "tab:green"}
    for kind in PLOT_KINDS:
        ms = [r["variants"][kind]["median_s"] * 1e3 for r in mlp]
        ratio = [_r(r, kind, "over_naive") for r in mlp]
        if kind in styles:
            colour, line = styles[kind]
            marker = "o"
        else:
            colour = colours.get(kind.split("-")[1], "tab:red")
            line = {"gs": "-", "torchjd": ":", "autogram": "-.", "pyo": (0, (1, 3))}[kind.split("-")[0]]
            marker = "s" if kind.endswith("-repr") else ("^" if not kind.startswith("gs-") else "o")
            if kind.startswith("pyo"):
                colour = "tab:purple"
        for ax, values in ((ax_ms, ms), (ax_ratio, ratio)):
            ax.plot(Ts, values, color=colour, linestyle=line, marker=marker, label=kind, linewidth=1.5, markersize=4)
    ax_ms.set(
        xscale="log",
        yscale="log",
        xlabel="T (tasks)",
        ylabel="ms per step (median)",
        title="MLP step time, CPU, 1 thread",
    )
    ax_ratio.set(
        xscale="log",
        yscale="log",
        xlabel="T (tasks)",
        ylabel="÷ naive summation (same run)",
        title="ratio to naive summation",
    )
    for ax in (ax_ms, ax_ratio):
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    ax_ratio.legend(fontsize=7, loc="upper left", ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(
    rows: list[dict[str, Any]],
    mems: list[dict[str, Any]],
    tiny: dict[str, Any] | None,
    checks: list[dict[str, Any]],
    *,
    command: str,
    wall_s: float,
    plot_name: str,
) -> str:
    ctx = rows[0]
    m, v, g = ctx["machine"], ctx["versions"], ctx["git"]
    load = ", ".join(f"{x:.1f}" for x in m["loadavg_at_start"] or [])

    def table(header: list[str], body: list[list[Any]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)

    parts = [
        "# Speed suite (CPU)",
        "",
        f"`{command}` — run {ctx['timestamp']}, {wall_s / 60:.1f} min. Machine: {m['cpu']}, {m['nproc']} CPUs "
        f"(load average at start {load}), torch {v['torch']} on {ctx['torch_threads']} intra-op thread, "
        f"torchjd {v['torchjd']}, pytorch_optimizer {v['pytorch_optimizer']}; gradsurgery at `{g['rev']}` "
        f"(library changes uncommitted: {g['library_dirty']}, digest `{g['library_digest']}`). Every number below is in "
        "`suite.jsonl` with its per-round times. The machine is shared and noisy: the variants run interleaved "
        "(one call of each per round, order rotated) and the tables give **ratios measured in the same run** — "
        "ratio of the medians, with the median of the per-round ratios in brackets.",
        "",
        "Models: "
        + "; ".join(
            f"**{r['model']}**: {Spec(**r['spec']).describe()}, " f"{r['shared_params'] / 1e6:.2f}M shared parameters"
            for r in {r["model"]: r for r in rows}.values()
        )
        + ". Timed rounds: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['naive']['rounds']}" for r in rows)
        + ".",
        "",
        "Variants: `naive` = `sum(losses).backward(); step`; `floor` = T × `autograd.grad` and nothing else; "
        "`floor-batched` = the same T gradients from one vmapped backward; `gs-{method}-{loop,batched}` = ours in "
        "parameter mode with that engine; `gs-{method}-repr` = ours in representation mode "
        "(`opt.backward(losses, features=z)`); `gs-pcgrad-loop-bf16` = `storage_dtype=torch.bfloat16`; "
        "`torchjd-*` = `mtl_backward(losses, features=z)` + `jac_to_grad(encoder, aggregator)`; `autogram-*` = "
        "TorchJD's `autogram.Engine(encoder, batch_dim=None)` → `compute_gramian` → weighting → `losses.backward(w)`; "
        "`pyo-pcgrad` = pytorch-optimizer's `PCGrad.pc_backward`.",
        "",
        f"![step time vs T]({plot_name})",
        "",
        "## Step time ÷ naive summation",
        "",
        "Naive step, ms: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['naive']['median_s'] * 1e3:.1f}" for r in rows)
        + ".",
        "",
        table(*ratio_table(rows, "over_naive")),
        "",
        "## Step time ÷ the T-backward floor",
        "",
        "Floor, ms: "
        + ", ".join(f"{r['model']} T={r['T']}: {r['variants']['floor']['median_s'] * 1e3:.1f}" for r in rows)
        + ".",
        "",
        table(*ratio_table(rows, "over_floor")),
        "",
        "## Ours ÷ peers (same method, same run, ratio of medians)",
        "",
        table(*peer_table(rows)),
        "",
    ]
    if mems:
        parts += [
            "## Peak extra memory",
            "",
            "Peak resident memory minus the resident memory before the first step, each variant in a fresh "
            "process (`harness.peak_memory_during`): during the first 2 steps (the process's high-water mark: what "
            "a run must fit in), and during 2 later steps (the high-water mark reset after the first 2; what the "
            "first steps kept, such as the `(T, P)` buffer, still counts). The children run with glibc's "
            f"`MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}` fixed, so every tensor from 128 KiB up is mapped on its own and "
            "unmapped when freed: the resident set follows the live tensors instead of what glibc's heap keeps "
            "from earlier steps (without it, repeated runs of one variant differed by ±15 MiB). "
            + "; ".join(
                f"{mm['model']} T={mm['T']}: the fp32 `(T, P)` matrix J is {mm['T'] * mm['shared_params'] * 4 / 2**20:.1f} MiB"
                for mm in mems
            )
            + ".",
            "",
            table(*memory_table(mems)),
            "",
        ]
    if tiny is not None:
        ov = tiny["overhead_over_floor"]
        parts += [
            "## Tiny problem: overhead per step over the 2-backward floor",
            "",
            "The tiny problem (`bench/tiny.py`: x ∈ R², two conflicting losses); "
            f"floor {tiny['variants']['floor']['median_s'] * 1e6:.0f} µs, {tiny['variants']['floor']['rounds']} rounds. "
            f"`gs-{{method}}` use the default engine (it ran: {sorted(set(tiny['gs_engines'].values()))}); "
            "`minimal-pcgrad` is the same PCGrad step written by hand with nothing to orchestrate "
            "(rows of J, Gram, non-finite check, closed-form weights, combine, inner step): "
            "the least any wrapper of this design pays here.",
            "",
            table(
                ["variant", "µs/step", "overhead µs", "overhead µs (paired)"],
                [
                    [
                        k,
                        f"{tiny['variants'][k]['median_s'] * 1e6:.0f}",
                        f"{ov[k]['of_medians_us']:.0f}",
                        f"{ov[k]['median_paired_us']:.0f}",
                    ]
                    for k in TINY_KINDS
                ],
            ),
            "",
        ]
    parts += [
        "## Targets",
        "",
        "Timing figures: ratio of the medians (median of the per-round ratios in brackets). Memory figures: "
        'first 2 steps (later steps in brackets). "met" needs both within the bound, "mixed" means one '
        "is. The range is of the bracketed figure.",
        "",
        table(["target", "met", "mixed", "missed", "range"], target_summary(checks)),
        "",
        "<details><summary>Every case</summary>",
        "",
        table(
            ["target", "case", "measured", "bound", "met"],
            [
                [
                    c["target"],
                    c["case"],
                    _fmt_check(c["value"], c["unit"])
                    + (f" ({_fmt_check(c['paired'], c['unit'])})" if c.get("paired") is not None else ""),
                    ("≥ " if c["unit"] == "≥" else "≤ ") + _fmt_check(c["bound"], c["unit"]),
                    {"yes": "yes", "mixed": "*mixed*", "no": "**no**"}[c["met"]],
                ]
                for c in checks
            ],
        ),
        "",
        "</details>",
        "",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------- profile


def profile(spec: Spec, kind: str) -> None:
    """cProfile of one variant's step, grouped by phase, and torch.profiler's op table (nothing recorded)."""
    phases = {  # label: (file name, function name), cumulative time per step
        "forward (model, heads included)": ("module.py", "_wrapped_call_impl"),
        "torch.autograd.grad (all backward passes)": ("autograd/__init__.py", "grad"),
        "tensor.backward": ("_tensor.py", "backward"),
        "task_gradients": ("taskgrads.py", "task_gradients"),
        "SharedBuffer.write (grads → J rows)": ("taskgrads.py", "write"),
        "gram (G = J Jᵀ)": ("backend.py", "gram"),
        "weights (the method on G)": ("optim.py", "weights"),
        "combine (wᵀJ → .grad)": ("backend.py", "combine"),
        "_nonfinite_tasks": ("optim.py", "_nonfinite_tasks"),
        "_accumulate_plain (heads)": ("optim.py", "_accumulate_plain"),
        "inner optimizer step": ("sgd.py", "step"),
    }
    step = make_step(spec, kind)
    step()
    step()
    n = 3
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(n):
        step()
    profiler.disable()
    total = (time.perf_counter() - start) / n
    stats = pstats.Stats(profiler)
    print(f"== {kind}, {spec.label}: {total * 1e3:.1f} ms/step under cProfile")
    rows = []
    for label, (file, function) in phases.items():
        cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith("/" + file) and k[2] == function)
        if cum:
            rows.append([label, cum / n * 1e3, cum / n / total])
    print(harness.format_table(["phase (cumulative)", "ms/step", "share"], rows))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n):
            step()
    print(f"\n== torch.profiler, {kind}, {spec.label}, {n} steps, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds: a smoke run under a minute")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: see bench/results/README.md)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out-dir", type=Path, default=None, help="where suite.jsonl, suite.md and the plot go")
    parser.add_argument(
        "--profile", metavar="KIND", default=None, help="profile one variant and exit (nothing recorded)"
    )
    parser.add_argument("--model", choices=("mlp", "conv"), default="mlp", help="with --profile")
    parser.add_argument("--T", type=int, default=8, help="with --profile")
    parser.add_argument(
        "--report", action="store_true", help="re-render suite.md and the plot from the last recorded run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        mlp = [Spec("mlp", T, 32, width=128) for T in (2, 3)]
        conv = Spec("conv", 3, 16)
        plan = {spec: (1, 1.5) for spec in [*mlp, conv]}  # (warm-up rounds, seconds of timed rounds)
        memory_specs = [mlp[-1]]
        memory_kinds = ("naive", "gs-pcgrad-loop", "gs-pcgrad-loop-bf16", "torchjd-pcgrad")
        tiny_rounds, tiny_budget = 40, 1.0
        out_dir = args.out_dir or Path("/tmp/gradsurgery-bench-suite")
    else:
        mlp = [Spec("mlp", T, 256) for T in (2, 4, 8, 16)]
        conv = Spec("conv", 3, 128)
        plan = {mlp[0]: (1, 35.0), mlp[1]: (1, 50.0), mlp[2]: (1, 65.0), mlp[3]: (1, 65.0), conv: (1, 40.0)}
        memory_specs = [mlp[2], conv]
        memory_kinds = MEMORY_KINDS
        tiny_rounds, tiny_budget = 1500, 10.0
        out_dir = args.out_dir or harness.RESULTS_DIR
    if args.profile:
        spec = (
            conv
            if args.model == "conv"
            else next((s for s in mlp if s.T == args.T), dataclasses.replace(mlp[-1], T=args.T))
        )
        profile(spec, args.profile)
        return

    out = out_dir / "suite.jsonl"
    command = "python -m bench.bench_suite" + (" --quick" if args.quick else "")
    if args.report:
        rows, mems, tiny, wall = load_last_run(out)
        render(rows, mems, tiny, targets(rows, mems, tiny), out_dir=out_dir, command=command, wall_s=wall)
        return
    started = time.perf_counter()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    ctx = harness.context()
    print(
        f"run {run_id}; machine: {ctx['machine']['cpu']}, {ctx['machine']['nproc']} CPUs, load {ctx['machine']['loadavg_at_start']}"
    )
    print(f"versions: {ctx['versions']}  git: {ctx['git']}  torch threads: {torch.get_num_threads()}", flush=True)

    rows = []
    for spec in [*mlp, conv]:
        warmup, budget = plan[spec]
        rows.append(bench_time(spec, KINDS, warmup=warmup, budget_s=budget, out=out, run_id=run_id))
    tiny = bench_tiny(rounds=tiny_rounds, budget_s=tiny_budget, out=out, run_id=run_id)
    print("  tiny: done", flush=True)
    mems = (
        []
        if args.no_memory
        else [bench_memory(spec, memory_kinds, threads=args.threads, out=out, run_id=run_id) for spec in memory_specs]
    )
    checks = targets(rows, mems, tiny)
    wall = time.perf_counter() - started
    harness.record(out, {"bench": "suite", "run": run_id, "kind": "targets", "checks": checks, "wall_s": wall})
    render(rows, mems, tiny, checks, out_dir=out_dir, command=command, wall_s=wall)
    print(f"recorded to {out}; total {wall:.0f}s")


def load_last_run(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, float]:
    """The time, memory and tiny rows of the last complete run in ``path`` (one that ended with its targets row)."""
    import json

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ends = [i for i, r in enumerate(records) if r.get("kind") == "targets"]
    if not ends:
        raise SystemExit(f"no complete run in {path}")
    last = ends[-1]
    begin = ends[-2] + 1 if len(ends) > 1 else 0
    run = [r for r in records[begin:last] if r.get("run") == records[last].get("run")]
    rows = [r for r in run if r["kind"] == "time"]
    mems = [r for r in run if r["kind"] == "memory"]
    tiny = next((r for r in run if r["kind"] == "tiny"), None)
    return rows, mems, tiny, records[last]["wall_s"]


def render(
    rows: list[dict[str, Any]],
    mems: list[dict[str, Any]],
    tiny: dict[str, Any] | None,
    checks: list[dict[str, Any]],
    *,
    out_dir: Path,
    command: str,
    wall_s: float,
) -> None:
    """Print the tables, write ``suite.md`` (keeping its hand-written notes) and the plot."""
    print("\nStep time ÷ naive summation (ratio of medians, median of per-round ratios in brackets)")
    print(harness.format_table(*ratio_table(rows, "over_naive")))
    print("\nStep time ÷ the T-backward floor")
    print(harness.format_table(*ratio_table(rows, "over_floor")))
    print("\nOurs ÷ peers (same method, ratio of medians)")
    print(harness.format_table(*peer_table(rows)))
    if mems:
        print("\nPeak extra RSS of 2 steps (fresh process each)")
        print(harness.format_table(*memory_table(mems)))
    if tiny is not None:
        ov = tiny["overhead_over_floor"]
        print(f"\nTiny problem: floor {tiny['variants']['floor']['median_s'] * 1e6:.0f} µs; overhead over it, µs")
        print(
            harness.format_table(
                ["variant", "µs", "paired µs"],
                [[k, ov[k]["of_medians_us"], ov[k]["median_paired_us"]] for k in TINY_KINDS],
            )
        )
    print("\nTargets (every case: suite.md and the targets row of suite.jsonl)")
    print(harness.format_table(["target", "met", "mixed", "missed", "range (paired)"], target_summary(checks)))

    plot_path = out_dir / "step_time_vs_T.png"
    plot(rows, plot_path)
    md = markdown(rows, mems, tiny, checks, command=command, wall_s=wall_s, plot_name=plot_path.name)
    md_path = out_dir / "suite.md"
    notes = md_path.read_text().partition(NOTES_MARKER)[2] if md_path.exists() else ""
    md_path.write_text(md + "\n\n" + NOTES_MARKER + (notes or "\n"))
    print(f"\nwrote {md_path} and {plot_path}")


if __name__ == "__main__":
    main()
