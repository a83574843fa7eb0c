"""The speed suite, CPU: every way of training a shared model on T losses, one interleaved run, one table.

The problems (an MLP at ``T ∈ {2, 4, 8, 16}`` and a conv encoder at ``T = 3``) and the variants of one
step (naive summation, the T-backward floor, our wrappers in three modes, TorchJD autojac and autogram,
pytorch-optimizer) are described in ``bench.suite.variants``. The original three methods (PCGrad,
CAGrad, MGDA) run on every problem; every other method of ``gradsurgery.methods.REGISTRY`` runs on the
MLP at ``T = 8`` (``EVERY_METHOD_T``): the gradient methods with the loop engine, the loss-weighting
ones as their one backward, beside TorchJD's scalarizers. The speed issues' other cases run on the MLP
too: the loss-weighting methods again at ``T = 16``; ``every=4`` (PCGrad, CAGrad, MGDA) and per-block
surgery (``granularity="module"`` and ``"parameter"``) at ``T = 8``; ``every=8`` and
``tasks_per_step=4`` at ``T = 16`` (``EXTRA``). Also: the tiny-problem overhead over the 2-backward
floor (``bench.tiny``), and, for the MLP at T = 8 and the conv model, the peak extra resident memory in a
fresh process (``bench.suite.measure``). Every target of the issues is checked against the run
(``bench.suite.targets``); ``bench.suite.report`` prints and writes the tables and the plot.

    python -m bench.bench_suite            # ~13 minutes on 1 thread; records, writes the tables and the plot
    python -m bench.bench_suite --quick    # a smoke run (~1 min) into /tmp/gradsurgery-bench-suite/
    python -m bench.bench_suite --report   # rewrite suite.md and the plot from the last recorded run
    python -m bench.bench_suite --report --run 20261201T011935Z   # ... from that recorded run
    python -m bench.bench_suite --profile gs-pcgrad-loop --model mlp --T 8   # where one variant's time goes
    python -m bench.bench_suite --problems mlp:16 --budget-scale 2   # those problems' time rows only, longer

A run limited by ``--problems`` records its time rows and their targets (``"partial": true``) but no
tiny or memory rows, and leaves ``suite.md`` and the plot as they are (``--report`` skips it unless
named with ``--run``).

Rows are appended to ``bench/results/suite.jsonl``; ``bench/results/suite.md`` (the tables; the notes
below its marker line are kept) and ``bench/results/step_time_vs_T.png`` are rewritten from the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import harness
from bench.suite.measure import MEMORY_KINDS, bench_memory, bench_time, bench_tiny
from bench.suite.profile import profile
from bench.suite.report import load_last_run, render
from bench.suite.targets import targets
from bench.suite.variants import (
    EVERY_METHOD_KINDS,
    GRANULARITY_KINDS,
    KINDS,
    LOSS_KINDS,
    LOSS_PEER_KINDS,
    Spec,
    cheap_kinds,
)

EVERY_METHOD_T = 8  # the MLP's T at which every registered method is timed
# The variants timed on the MLP at one T beside KINDS (the issues' cases; bench.suite.targets checks them).
EXTRA: dict[int, tuple[str, ...]] = {
    EVERY_METHOD_T: (*EVERY_METHOD_KINDS, *LOSS_KINDS, *LOSS_PEER_KINDS, *cheap_kinds(every=4), *GRANULARITY_KINDS),
    16: (*LOSS_KINDS, *LOSS_PEER_KINDS, *cheap_kinds(every=8, tasks_per_step=4)),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds: a smoke run of about a minute")
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
    parser.add_argument("--run", default=None, help="with --report: that complete run (its id) instead of the last")
    parser.add_argument(
        "--problems",
        default=None,
        help="only these problems' time rows, e.g. mlp:8,mlp:16 (no tiny or memory rows; suite.md left as it is)",
    )
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every problem's timing budget")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.quick:
        mlp = [Spec("mlp", T, 32, width=128) for T in (2, 3)]
        conv = Spec("conv", 3, 16)
        # (warm-up rounds, seconds of timed rounds, the variants timed beside KINDS)
        extra = (*EXTRA[8], *cheap_kinds(every=2, tasks_per_step=2))
        plan = {mlp[0]: (1, 1.5, ()), mlp[1]: (1, 3.0, extra), conv: (1, 1.5, ())}
        memory_specs = [mlp[-1]]
        memory_kinds: tuple[str, ...] = ("naive", "gs-pcgrad-loop", "gs-pcgrad-loop-bf16", "torchjd-pcgrad")
        tiny_rounds, tiny_budget = 40, 1.0
        out_dir = args.out_dir or Path("/tmp/gradsurgery-bench-suite")
    else:
        mlp = [Spec("mlp", T, 256) for T in (2, 4, 8, 16)]
        conv = Spec("conv", 3, 128)
        budgets = (35.0, 50.0, 160.0, 130.0)
        plan = {spec: (1, budget, EXTRA.get(spec.T, ())) for spec, budget in zip(mlp, budgets)}
        plan[conv] = (1, 40.0, ())
        memory_specs = [mlp[2], conv]
        memory_kinds = MEMORY_KINDS
        tiny_rounds, tiny_budget = 1500, 15.0
        out_dir = args.out_dir or harness.RESULTS_DIR
    if args.profile:
        spec = (
            conv
            if args.model == "conv"
            else next((s for s in mlp if s.T == args.T), dataclasses.replace(mlp[-1], T=args.T))
        )
        profile(spec, args.profile)
        return

    plan = {spec: (warmup, budget * args.budget_scale, extra) for spec, (warmup, budget, extra) in plan.items()}
    if args.problems:
        wanted = {tuple(p.split(":")) for p in args.problems.split(",")}
        unknown = wanted - {(spec.model, str(spec.T)) for spec in plan}
        if unknown:
            parser.error(f"--problems: no problem {sorted(':'.join(u) for u in unknown)} in the plan")
        plan = {spec: entry for spec, entry in plan.items() if (spec.model, str(spec.T)) in wanted}

    out = out_dir / "suite.jsonl"
    command = "python -m bench.bench_suite" + (" --quick" if args.quick else "")
    if args.report:
        rows, mems, tiny, wall = load_last_run(out, args.run)
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
    for spec, (warmup, budget, extra) in plan.items():
        kinds = (*KINDS, *extra)
        rows.append(bench_time(spec, kinds, warmup=warmup, budget_s=budget, out=out, run_id=run_id))
    if args.problems:
        checks = targets(rows, [], None)
        wall = time.perf_counter() - started
        harness.record(
            out,
            {"bench": "suite", "run": run_id, "kind": "targets", "partial": True, "problems": args.problems,
             "budget_scale": args.budget_scale, "checks": checks, "wall_s": wall},
        )  # fmt: skip
        render(rows, [], None, checks, out_dir=out_dir, command=command, wall_s=wall, write=False)
        print(f"recorded to {out} (partial run: suite.md left as it is); total {wall:.0f}s")
        return
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


if __name__ == "__main__":
    main()
