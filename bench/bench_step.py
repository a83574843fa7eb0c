"""End-to-end training step, CPU: our wrappers vs naive summation, the T-backward floor, TorchJD and
pytorch-optimizer — plus the per-step overhead on a tiny problem.

Model: a shared MLP trunk ``256 → 1024 → 1024 → 1024`` (ReLU after each layer) read by one
``Linear(1024, 1)`` head per task; batch 256; per-task MSE losses; SGD. For ``T ∈ {2, 4, 8}``, one
interleaved run of these steps (each on its own copy of the same initial model, forward included):

- ``naive``: ``sum(losses).backward(); opt.step()``;
- ``floor``: ``T × torch.autograd.grad(loss_t, params, retain_graph=…)`` and nothing else (no step):
  what any method that needs the ``T`` task gradients must at least pay;
- ``floor-batched``: the same ``T`` gradients as one vmapped backward
  (``autograd.grad(stack(losses), params, grad_outputs=I_T, is_grads_batched=True)``): the floor of an
  engine that batches the ``T`` backward passes (TorchJD's, and ours when it batches);
- ``gs-{sum,pcgrad,cagrad,mgda}``: ``opt.backward(losses); opt.step()`` with our wrappers, as
  constructed by default; ``gs-pcgrad-loop``: PCGrad with ``engine="loop"`` (one backward per task),
  where the library has engines;
- ``torchjd-{pcgrad,cagrad,mgda}``: ``mtl_backward(losses, features=z)``,
  ``jac_to_grad(trunk params, aggregator)``, step — TorchJD's documented multi-task path, with its
  default (vmapped) Jacobian;
- ``pyo-pcgrad``: ``pytorch_optimizer.PCGrad(…, reduction="sum").pc_backward(losses)``, step.

Tiny problem: ``x ∈ R²``, ``L1 = (x·a)²``, ``L2 = sin(x·b)`` with conflicting gradients; the per-step
overhead in µs of each wrapper over its 2-backward floor (TorchJD through ``autojac.backward`` +
``jac_to_grad``, as there is no head), and of ``minimal-pcgrad``: the same PCGrad step written by hand
with no library — the lower bound of the design on the machine.

    python -m bench.bench_step                     # ~5 minutes on 1 thread
    python -m bench.bench_step --profile           # where our wrappers' time goes at T = 4 (not recorded)
    python -m bench.bench_step --quick             # a smoke test on a small model

Rows are appended to ``bench/results/step.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import inspect
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

import gradsurgery as gs
from bench import harness

CAGRAD_C = 0.4
LR = 1e-4
KINDS = (
    "naive",
    "floor",
    "floor-batched",
    "gs-sum",
    "gs-pcgrad",
    "gs-cagrad",
    "gs-mgda",
    "gs-pcgrad-loop",
    "torchjd-pcgrad",
    "torchjd-cagrad",
    "torchjd-mgda",
    "pyo-pcgrad",
)
# The tiny problem also times a hand-written minimal PCGrad step: the floor of the design, not a peer.
TINY_KINDS = (*KINDS, "minimal-pcgrad")
METHODS = ("pcgrad", "cagrad", "mgda")


# ---------------------------------------------------------------------- the shared-trunk MLP


class MultiTaskMLP(nn.Module):
    def __init__(self, num_tasks: int, *, width: int = 1024, inputs: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))


@functools.cache
def _problem(num_tasks: int, width: int, batch: int, inputs: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MultiTaskMLP(num_tasks, width=width, inputs=inputs)
    x = torch.randn(batch, inputs)
    y = torch.randn(num_tasks, batch)
    return model.state_dict(), x, y


def build(num_tasks: int, *, width: int, batch: int, inputs: int = 256) -> tuple[MultiTaskMLP, torch.Tensor, torch.Tensor]:
    """A fresh model with the same initial weights, and the batch, for every variant."""
    state, x, y = _problem(num_tasks, width, batch, inputs)
    model = MultiTaskMLP(num_tasks, width=width, inputs=inputs)
    model.load_state_dict(copy.deepcopy(state))
    return model, x, y


def forward(model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z = model.trunk(x)
    return z, [nn.functional.mse_loss(head(z).squeeze(-1), y[t]) for t, head in enumerate(model.heads)]


def _torchjd_aggregator(method: str):
    from torchjd import aggregation

    return {"pcgrad": aggregation.PCGrad, "cagrad": lambda: aggregation.CAGrad(c=CAGRAD_C), "mgda": aggregation.MGDA}[method]()


def _gs_wrapper(method: str, inner: torch.optim.Optimizer) -> gs.GradSurgery:
    if method == "pcgrad-loop":
        if "engine" not in inspect.signature(gs.GradSurgery).parameters:
            return gs.PCGrad(inner, seed=0)  # a library without engines only has the loop
        return gs.PCGrad(inner, seed=0, engine="loop")
    if method == "sum":
        return gs.Sum(inner)
    if method == "pcgrad":
        return gs.PCGrad(inner, seed=0)
    if method == "cagrad":
        return gs.CAGrad(inner, c=CAGRAD_C)
    return gs.MGDA(inner)


def make_step(kind: str, num_tasks: int, *, width: int = 1024, batch: int = 256) -> Callable[[], None]:
    """One training step of variant ``kind`` on its own model (module-level: picklable for memory runs)."""
    model, x, y = build(num_tasks, width=width, batch=batch)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    T = num_tasks

    if kind == "naive":

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(model, x, y)
            sum(losses).backward()
            opt.step()

    elif kind == "floor":

        def step() -> None:
            _, losses = forward(model, x, y)
            for t, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=t < T - 1, allow_unused=True)

    elif kind == "floor-batched":
        eye = torch.eye(T)

        def step() -> None:
            _, losses = forward(model, x, y)
            torch.autograd.grad(torch.stack(losses), params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)

    elif kind.startswith("gs-"):
        wrapper = _gs_wrapper(kind[3:], opt)

        def step() -> None:
            wrapper.zero_grad()
            _, losses = forward(model, x, y)
            wrapper.backward(losses)
            wrapper.step()

        step.wrapper = wrapper  # type: ignore[attr-defined]

    elif kind.startswith("torchjd-"):
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = _torchjd_aggregator(kind.split("-", 1)[1])
        shared = list(model.trunk.parameters())

        def step() -> None:
            opt.zero_grad()
            z, losses = forward(model, x, y)
            mtl_backward(losses, features=z)
            jac_to_grad(shared, aggregator)
            opt.step()

    elif kind == "pyo-pcgrad":
        from pytorch_optimizer import PCGrad

        wrapper = PCGrad(opt, reduction="sum")

        def step() -> None:
            wrapper.zero_grad()
            _, losses = forward(model, x, y)
            wrapper.pc_backward(losses)
            wrapper.step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return step


# ---------------------------------------------------------------------- tiny problem


def make_tiny_step(kind: str) -> Callable[[], None]:
    """``x ∈ R²``, ``L1 = (x·a)²``, ``L2 = sin(x·b)``; at the start ``∇L1·∇L2 < 0`` (a conflict). ``lr = 0``
    keeps the problem, and so the branch each method takes, the same on every step."""
    x = nn.Parameter(torch.tensor([0.3, -0.7]))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.5, -0.5])
    opt = torch.optim.SGD([x], lr=0.0)

    def losses() -> list[torch.Tensor]:
        return [(x @ a) ** 2, torch.sin(x @ b)]

    if kind == "naive":

        def step() -> None:
            opt.zero_grad()
            sum(losses()).backward()
            opt.step()

    elif kind == "floor":

        def step() -> None:
            l1, l2 = losses()
            torch.autograd.grad(l1, [x], retain_graph=True)
            torch.autograd.grad(l2, [x])

    elif kind == "floor-batched":
        eye = torch.eye(2)

        def step() -> None:
            torch.autograd.grad(torch.stack(losses()), [x], grad_outputs=eye, is_grads_batched=True)

    elif kind == "minimal-pcgrad":
        # The least a Gram-space PCGrad step does here, written by hand with nothing to orchestrate:
        # the two gradients copied into the rows of J, the Gram matrix, the non-finite check (one read
        # back), the closed-form weights, the combine into .grad, the inner step. A lower bound for any
        # wrapper of this design on this machine.
        J, flat = torch.zeros(2, 2), torch.zeros(2)
        rows = list(J)

        def step() -> None:
            opt.zero_grad()
            l1, l2 = losses()
            torch._foreach_copy_(rows[:1], list(torch.autograd.grad(l1, [x], retain_graph=True)))
            torch._foreach_copy_(rows[1:], list(torch.autograd.grad(l2, [x])))
            G = J @ J.mT
            diagonal = G.diagonal()
            if not bool(diagonal.clamp(1e-30, 1e37).eq(diagonal).all()):
                raise FloatingPointError("non-finite gradient")
            G = G.double()
            squared_norms = G.diagonal()
            removed = (G[0, 1] + G[1, 0]).clamp(max=0) / (2 * squared_norms)
            torch.mv(J.mT, (1.0 - torch.where(squared_norms > 0, removed, 0.0)).float(), out=flat)
            x.grad = flat
            opt.step()

    elif kind.startswith("gs-"):
        wrapper = _gs_wrapper(kind[3:], opt)

        def step() -> None:
            wrapper.zero_grad()
            wrapper.backward(losses())
            wrapper.step()

        step.wrapper = wrapper  # type: ignore[attr-defined]

    elif kind.startswith("torchjd-"):
        from torchjd.autojac import backward, jac_to_grad

        aggregator = _torchjd_aggregator(kind.split("-", 1)[1])

        def step() -> None:
            opt.zero_grad()
            backward(losses())
            jac_to_grad([x], aggregator)
            opt.step()

    elif kind == "pyo-pcgrad":
        from pytorch_optimizer import PCGrad

        wrapper = PCGrad(opt, reduction="sum")

        def step() -> None:
            wrapper.zero_grad()
            wrapper.pc_backward(losses())
            wrapper.step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return step


# ---------------------------------------------------------------------- runs


def ratios_of(times: dict[str, list[float]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind in times:
        entry = {"over_naive": harness.ratio(times, kind, "naive"), "over_floor": harness.ratio(times, kind, "floor")}
        if kind.startswith("gs-"):
            method = kind[3:].split("-")[0]
            if f"torchjd-{method}" in times:
                entry["over_torchjd"] = harness.ratio(times, kind, f"torchjd-{method}")
            if f"pyo-{method}" in times:
                entry["over_pyo"] = harness.ratio(times, kind, f"pyo-{method}")
        out[kind] = entry
    return out


def _engines(variants: dict[str, Callable[[], None]]) -> dict[str, dict[str, str | None]]:
    """The engine each of our wrappers was asked for and the one it ran (provenance of the labels)."""
    out = {}
    for kind, step in variants.items():
        wrapper = getattr(step, "wrapper", None)
        if wrapper is not None:
            out[kind] = {"requested": getattr(wrapper, "engine", None), "ran": getattr(wrapper, "_engine", None)}
    return out


def bench_mlp(args: argparse.Namespace) -> list[list[object]]:
    table = []
    for T in args.T:
        variants = {kind: make_step(kind, T, width=args.width, batch=args.batch) for kind in KINDS}
        warmup, budget = args.plan[T]
        started = time.perf_counter()
        times = harness.interleave(variants, warmup=warmup, rounds=args.max_rounds, min_rounds=3, budget_s=budget)
        elapsed = time.perf_counter() - started
        summary = harness.summarize(times, baselines={"naive": "naive", "floor": "floor"})
        ratios = ratios_of(times)
        engines = _engines(variants)
        harness.record(
            args.out,
            {
                "bench": "step",
                "kind": "mlp",
                "T": T,
                "model": f"trunk 256→{args.width}→{args.width}→{args.width} ReLU, {T} × Linear({args.width}, 1) heads",
                "batch": args.batch,
                "shared_params": sum(p.numel() for p in MultiTaskMLP(T, width=args.width).trunk.parameters()),
                "optimizer": f"SGD(lr={LR})",
                "cagrad_c": CAGRAD_C,
                "ratios": ratios,
                "gs_engines": engines,
                "wall_s": elapsed,
                "variants": summary,
            },
        )
        for kind in KINDS:
            r = ratios[kind]
            table.append(
                [
                    kind,
                    T,
                    summary[kind]["median_s"] * 1e3,
                    r["over_naive"]["of_medians"],
                    r["over_floor"]["of_medians"],
                    r["over_floor"]["median_paired"],
                    r["over_torchjd"]["of_medians"] if "over_torchjd" in r else None,
                    r["over_pyo"]["of_medians"] if "over_pyo" in r else None,
                    summary[kind]["rounds"],
                ]
            )
        print(f"  T={T} done in {elapsed:.0f}s ({summary['naive']['rounds']} rounds); engines {engines}", flush=True)
        del variants
    return table


def bench_tiny(args: argparse.Namespace) -> list[list[object]]:
    variants = {kind: make_tiny_step(kind) for kind in TINY_KINDS}
    times = harness.interleave(variants, warmup=20, rounds=args.tiny_rounds, min_rounds=20, budget_s=args.tiny_budget)
    summary = harness.summarize(times, baselines={"floor": "floor"})
    floor = summary["floor"]["median_s"]
    overhead = {}
    for kind in TINY_KINDS:
        paired = sorted(a - b for a, b in zip(times[kind], times["floor"]))
        overhead[kind] = {"of_medians_us": (summary[kind]["median_s"] - floor) * 1e6, "median_paired_us": paired[len(paired) // 2] * 1e6}
    harness.record(
        args.out,
        {
            "bench": "step",
            "kind": "tiny",
            "T": 2,
            "problem": "x in R^2, L1=(x.a)^2, L2=sin(x.b), conflicting gradients, SGD(lr=0)",
            "overhead_over_floor": overhead,
            "gs_engines": _engines(variants),
            "variants": {k: {kk: vv for kk, vv in v.items() if kk != "samples_s"} for k, v in summary.items()},
        },
    )
    return [
        [kind, summary[kind]["median_s"] * 1e6, overhead[kind]["of_medians_us"], overhead[kind]["median_paired_us"], summary[kind]["ratio_to"]["floor"]["of_medians"]]
        for kind in TINY_KINDS
    ]


def bench_memory(args: argparse.Namespace) -> list[list[object]]:
    T = args.memory_T
    results = {}
    for kind in KINDS:
        factory = functools.partial(make_step, kind, T, width=args.width, batch=args.batch)
        results[kind] = harness.peak_memory_during(factory, calls=2, threads=args.threads)
    harness.record(
        args.out,
        {
            "bench": "step",
            "kind": "memory",
            "T": T,
            "measure": "peak RSS during 2 steps minus RSS before them, fresh spawned interpreter (harness.peak_memory_during)",
            "variants": results,
        },
    )
    base = results["naive"]["peak_extra"]
    return [[kind, r["peak_extra"] / 2**20, r["peak_extra"] / base if base > 0 else None, r["baseline_rss"] / 2**20] for kind, r in results.items()]


def profile(args: argparse.Namespace) -> None:
    """cProfile of our wrappers' step at T = 4, grouped by phase, and torch.profiler's op table."""
    T = 4
    phases = {  # label: (file name, function name), matched exactly; cumulative time per step
        "torch.autograd.grad (all backward passes)": ("autograd/__init__.py", "grad"),
        "forward (model, heads included)": ("module.py", "_wrapped_call_impl"),
        "task_gradients (T backward passes)": ("taskgrads.py", "task_gradients"),
        "SharedBuffer.write (grads → J rows)": ("taskgrads.py", "write"),
        "gram (G = J Jᵀ)": ("backend.py", "gram"),
        "weights (the method on G)": ("optim.py", "weights"),
        "combine (wᵀJ → .grad)": ("backend.py", "combine"),
        "_accumulate_plain (heads)": ("optim.py", "_accumulate_plain"),
        "_shared_params": ("optim.py", "_shared_params"),
        "inner optimizer step": ("sgd.py", "step"),
    }
    for kind in ("floor", "floor-batched", "gs-sum", "gs-pcgrad", "gs-pcgrad-loop", "gs-cagrad", "gs-mgda"):
        step = make_step(kind, T, width=args.width, batch=args.batch)
        step()
        step()
        profiler = cProfile.Profile()
        n = 3
        start = time.perf_counter()
        profiler.enable()
        for _ in range(n):
            step()
        profiler.disable()
        total = (time.perf_counter() - start) / n
        stats = pstats.Stats(profiler)
        print(f"\n== {kind}, T={T}: {total * 1e3:.1f} ms/step under cProfile")
        rows = []
        for label, (file, function) in phases.items():
            cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith("/" + file) and k[2] == function)
            rows.append([label, cum / n * 1e3, cum / n / total])
        print(harness.format_table(["phase (cumulative)", "ms/step", "share"], rows))
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(12)
        print("\n".join(buffer.getvalue().splitlines()[-16:]))
    for kind in ("gs-cagrad", "gs-mgda"):
        step = make_step(kind, T, width=args.width, batch=args.batch)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f"\n== torch.profiler, {kind}, T={T}, 3 steps, top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few rounds (smoke test)")
    parser.add_argument("--profile", action="store_true", help="profile our wrappers at T=4 and exit (nothing recorded)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see README)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.max_rounds = 40
    if args.quick:
        args.width, args.batch, args.T, args.memory_T = 128, 32, [2, 3], 3
        args.plan = {2: (1, 1.0), 3: (1, 1.0)}
        args.tiny_rounds, args.tiny_budget = 40, 1.0
        args.out = args.out or Path("/tmp/gradsurgery-bench-quick/step.jsonl")
    else:
        args.width, args.batch, args.T, args.memory_T = 1024, 256, [2, 4, 8], 8
        args.plan = {2: (2, 35.0), 4: (2, 55.0), 8: (1, 85.0)}  # (warm-up rounds, seconds of timed rounds)
        args.tiny_rounds, args.tiny_budget = 600, 15.0
        args.out = args.out or harness.RESULTS_DIR / "step.jsonl"
    if args.profile:
        profile(args)
        return
    started = time.perf_counter()
    ctx = harness.context()
    print(f"machine: {ctx['machine']['cpu']}, {ctx['machine']['nproc']} CPUs, load {ctx['machine']['loadavg_at_start']}")
    print(f"versions: {ctx['versions']}  git: {ctx['git']}  torch threads: {torch.get_num_threads()}")

    table = bench_mlp(args)
    print(f"\nTraining step, batch {args.batch}, trunk width {args.width}, CPU (medians; ratios measured in the same run)")
    print(
        harness.format_table(
            ["variant", "T", "ms", "/naive", "/floor", "/floor paired", "ours/TorchJD", "ours/pyo", "rounds"], table
        )
    )
    tiny = bench_tiny(args)
    print("\nTiny problem (x in R^2, two losses): per-step time and overhead over the 2-backward floor")
    print(harness.format_table(["variant", "µs/step", "overhead µs", "overhead µs (paired)", "/floor"], tiny))
    if not args.no_memory:
        mem = bench_memory(args)
        print(f"\nPeak extra RSS of 2 steps at T={args.memory_T} (fresh process each)")
        print(harness.format_table(["variant", "MiB", "/naive", "baseline MiB"], mem))
    print(f"\nrecorded to {args.out}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
