"""Aggregation alone (``J`` given), CPU: our PCGrad/CAGrad/MGDA ÷ one read of ``J`` and ÷ TorchJD.

For every ``T ∈ {2, 8, 32}`` and ``P ∈ {1M, 4M, 16M}`` (fp32), in one interleaved run: ``J.sum(0)`` (one
read of ``J``, the memory-traffic unit, as asked), ``J.sum(1)`` (``read1``: one read with a ``T``-vector
result: ``J.sum(0)`` also allocates and writes a fresh ``P``-vector, which costs page faults on every
call once it passes glibc's mmap threshold, 32 MiB, i.e. at ``P = 16M``), ``gs.functional.{pcgrad, cagrad, mgda}(J)`` and TorchJD's
aggregator of the same method called on the same ``J``. Then, for ``T = 64``: the weights alone
(``gs.functional.*_weights(G)``) ÷ the whole aggregation at ``P = 4M``. Before the timings: the
cosine between our update and TorchJD's, and how exactly each solves MGDA's min-norm problem.

    python -m bench.bench_aggregation              # full grid, ~5 minutes on 1 thread
    python -m bench.bench_aggregation --quick      # small sizes, seconds (a smoke test)

Rows are appended to ``bench/results/aggregation.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import gradsurgery as gs
from bench import harness
from bench.peers import CAGRAD_C

METHODS = ("pcgrad", "cagrad", "mgda")
RANK = 8  # J = noise + a rank-8 mixture: rows with positive and negative inner products (conflicts)


def make_J(T: int, P: int, *, seed: int = 0) -> torch.Tensor:
    """A ``(T, P)`` fp32 task-gradient matrix whose rows conflict in part (cosines of both signs)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g)
    mixing = torch.randn(T, RANK, generator=g) / RANK**0.5
    basis = torch.randn(RANK, P, generator=g)
    J.mul_(0.3).addmm_(mixing, basis)
    return J


def ours(method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if method == "pcgrad":
        generator = torch.Generator().manual_seed(0)
        return lambda J: gs.functional.pcgrad(J, generator=generator)
    if method == "cagrad":
        return lambda J: gs.functional.cagrad(J, c=CAGRAD_C)
    return lambda J: gs.functional.mgda(J)


def our_weights(method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if method == "pcgrad":
        generator = torch.Generator().manual_seed(0)
        return lambda G: gs.functional.pcgrad_weights(G, generator=generator)
    if method == "cagrad":
        return lambda G: gs.functional.cagrad_weights(G, c=CAGRAD_C)
    return lambda G: gs.functional.mgda_weights(G)


def torchjd_aggregators() -> tuple[dict[str, object], dict[str, str]]:
    """TorchJD's aggregator per method (defaults; CAGrad with the same ``c``), and why one is missing."""
    found: dict[str, object] = {}
    missing: dict[str, str] = {}
    try:
        from torchjd import aggregation
    except ImportError as error:
        return found, {m: f"torchjd not installed ({error})" for m in METHODS}
    names = {"pcgrad": "PCGrad", "cagrad": "CAGrad", "mgda": "MGDA"}
    for method, name in names.items():
        cls = getattr(aggregation, name, None)
        if cls is None:
            missing[method] = f"torchjd {_version('torchjd')} has no aggregation.{name}"
            continue
        try:
            found[method] = cls(c=CAGRAD_C) if method == "cagrad" else cls()
        except Exception as error:  # CAGrad raises when its optional solver (cvxpy) is absent
            missing[method] = f"torchjd.aggregation.{name} unavailable: {error}"
    return found, missing


def torchjd_weightings() -> dict[str, object]:
    try:
        from torchjd import aggregation
    except ImportError:
        return {}
    out = {}
    for method, name in {"pcgrad": "PCGradWeighting", "cagrad": "CAGradWeighting", "mgda": "MGDAWeighting"}.items():
        try:
            cls = getattr(aggregation, name)
            out[method] = cls(c=CAGRAD_C) if method == "cagrad" else cls()
        except Exception:
            pass
    return out


def _version(dist: str) -> str | None:
    return harness.context()["versions"].get(dist)


def _inner_counts(variants: dict[str, Callable[[], object]], *, target_s: float = 0.05) -> dict[str, int]:
    """Calls per round so that each timed slot lasts ≥ ``target_s`` (at most 25 calls)."""
    counts = {}
    for name, fn in variants.items():
        elapsed = harness.measure(fn, warmup=0, repeats=1)[0]
        counts[name] = max(1, min(25, int(target_s / max(elapsed, 1e-7))))
    return counts


def agreement(tjd: dict[str, object]) -> dict[str, dict[str, float]]:
    """cos(ours, TorchJD) of the update direction on a small conflicting ``J``: the comparison is of the
    same computation (PCGrad's random orders only coincide for ``T = 2``)."""
    out: dict[str, dict[str, float]] = {}
    for T in (2, 8):
        J = make_J(T, 100_003, seed=1).double()
        for method, agg in tjd.items():
            a, b = ours(method)(J), agg(J)
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            out.setdefault(method, {})[f"T={T}"] = cos
    return out


def mgda_accuracy(weightings: dict[str, object]) -> dict[str, dict[str, dict[str, float]]]:
    """How exactly each library solves MGDA's min-norm problem on a conflicting ``J`` (fp64 Gram): the
    Frank–Wolfe gap of its weights (the KKT residual, ÷ ``max‖g_t‖²``) and its objective ``‖d‖²`` ÷ ours."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for T in (8, 32, 64):
        J = make_J(T, 65_536, seed=2).double()
        G = J @ J.T
        solutions = {"ours": gs.functional.mgda_weights(G, reduction="mean")}
        if "mgda" in weightings:
            w = weightings["mgda"](G).double()
            solutions["torchjd"] = w / w.sum()
        best = solutions["ours"] @ G @ solutions["ours"]
        for name, alpha in solutions.items():
            grad = 2 * G @ alpha
            out.setdefault(name, {})[f"T={T}"] = {
                "kkt_gap": float((alpha @ grad - grad.min()) / G.diagonal().max()),
                "objective_over_ours": float(alpha @ G @ alpha / best),
            }
    return out


def bench_grid(args: argparse.Namespace, tjd: dict[str, object], missing: dict[str, str]) -> list[list[object]]:
    table = []
    for P in args.P:
        J_all = make_J(max(args.T), P)
        for T in args.T:
            J = J_all[:T]  # contiguous rows: a (T, P) matrix of its own
            variants: dict[str, Callable[[], object]] = {"read": lambda J=J: J.sum(0), "read1": lambda J=J: J.sum(1)}
            out = torch.empty(P)
            # the same call writing into a preallocated vector, as the wrappers do: isolates the output's cost
            variants["ours-pcgrad-out"] = lambda J=J, out=out, g=torch.Generator().manual_seed(0): gs.functional.pcgrad(
                J, generator=g, out=out
            )
            for method in METHODS:
                variants[f"ours-{method}"] = lambda f=ours(method), J=J: f(J)
                if method in tjd:
                    variants[f"torchjd-{method}"] = lambda agg=tjd[method], J=J: agg(J)
            inner = _inner_counts(variants)
            started = time.perf_counter()
            times = harness.interleave(
                variants, warmup=1, rounds=args.max_rounds, min_rounds=3, budget_s=args.budget, inner=inner
            )
            elapsed = time.perf_counter() - started
            summary = harness.summarize(times, baselines={"read": "read"})
            ratios = {}
            for method in METHODS:
                entry = {
                    "over_read": harness.ratio(times, f"ours-{method}", "read"),
                    "over_read1": harness.ratio(times, f"ours-{method}", "read1"),
                }
                if method in tjd:
                    entry["over_torchjd"] = harness.ratio(times, f"ours-{method}", f"torchjd-{method}")
                    entry["torchjd_over_read"] = harness.ratio(times, f"torchjd-{method}", "read")
                ratios[method] = entry
                tjd_ms = summary[f"torchjd-{method}"]["median_s"] * 1e3 if method in tjd else None
                table.append(
                    [
                        method,
                        T,
                        f"{P / 1e6:g}M",
                        summary[f"ours-{method}"]["median_s"] * 1e3,
                        summary["read"]["median_s"] * 1e3,
                        entry["over_read"]["of_medians"],
                        entry["over_read1"]["of_medians"],
                        tjd_ms,
                        entry["over_torchjd"]["of_medians"] if method in tjd else None,
                        entry["over_torchjd"]["median_paired"] if method in tjd else None,
                        summary["read"]["rounds"],
                    ]
                )
            read_s = summary["read"]["median_s"]
            harness.record(
                args.out,
                {
                    "bench": "aggregation",
                    "kind": "aggregation",
                    "T": T,
                    "P": P,
                    "dtype": "float32",
                    "device": "cpu",
                    "cagrad_c": CAGRAD_C,
                    "read_GBps": J.numel() * J.element_size() / read_s / 1e9,
                    "read1_GBps": J.numel() * J.element_size() / summary["read1"]["median_s"] / 1e9,
                    "ours_pcgrad_with_out_over_without": harness.ratio(times, "ours-pcgrad-out", "ours-pcgrad"),
                    "ratios": ratios,
                    "torchjd_missing": missing,
                    "inner_calls": inner,
                    "wall_s": elapsed,
                    "variants": summary,
                },
            )
            print(f"  T={T:>2} P={P / 1e6:g}M done in {elapsed:.0f}s ({summary['read']['rounds']} rounds)", flush=True)
            del J, variants
        del J_all
        gc.collect()
    return table


def bench_weights(args: argparse.Namespace, tjd: dict[str, object]) -> list[list[object]]:
    T, P = args.weights_T, args.weights_P
    J = make_J(T, P, seed=2)
    G = gs.functional.gram(J)
    weightings = torchjd_weightings()
    variants: dict[str, Callable[[], object]] = {}
    for method in METHODS:
        variants[f"ours-aggregate-{method}"] = lambda f=ours(method): f(J)
        variants[f"ours-weights-{method}"] = lambda f=our_weights(method): f(G)
        if method in weightings:
            variants[f"torchjd-weights-{method}"] = lambda w=weightings[method]: w(G)
    inner = _inner_counts(variants)
    times = harness.interleave(variants, warmup=1, rounds=args.max_rounds, min_rounds=3, budget_s=args.budget, inner=inner)
    summary = harness.summarize(times)
    table, ratios = [], {}
    for method in METHODS:
        r = harness.ratio(times, f"ours-weights-{method}", f"ours-aggregate-{method}")
        ratios[method] = {"weights_over_aggregate": r}
        tjd_w = summary.get(f"torchjd-weights-{method}")
        if tjd_w is not None:
            ratios[method]["ours_weights_over_torchjd_weights"] = harness.ratio(
                times, f"ours-weights-{method}", f"torchjd-weights-{method}"
            )
        table.append(
            [
                method,
                summary[f"ours-weights-{method}"]["median_s"] * 1e3,
                summary[f"ours-aggregate-{method}"]["median_s"] * 1e3,
                r["of_medians"],
                tjd_w["median_s"] * 1e3 if tjd_w else None,
            ]
        )
    harness.record(
        args.out,
        {
            "bench": "aggregation",
            "kind": "weights",
            "T": T,
            "P": P,
            "dtype": "float32",
            "device": "cpu",
            "ratios": ratios,
            "inner_calls": inner,
            "variants": summary,
        },
    )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test); not recorded unless --out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see README)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per configuration")
    parser.add_argument("--max-rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.T, args.P, args.weights_T, args.weights_P = [2, 8], [100_000, 400_000], 16, 200_000
        args.budget, args.max_rounds = 1.0, 5
        args.out = args.out or Path("/tmp/gradsurgery-bench-quick/aggregation.jsonl")
    else:
        args.T, args.P, args.weights_T, args.weights_P = [2, 8, 32], [1_000_000, 4_000_000, 16_000_000], 64, 4_000_000
        args.out = args.out or harness.RESULTS_DIR / "aggregation.jsonl"
    started = time.perf_counter()
    tjd, missing = torchjd_aggregators()
    ctx = harness.context()
    print(f"machine: {ctx['machine']['cpu']}, {ctx['machine']['nproc']} CPUs, load {ctx['machine']['loadavg_at_start']}")
    print(f"versions: {ctx['versions']}  git: {ctx['git']}  torch threads: {torch.get_num_threads()}")
    for method, why in missing.items():
        print(f"TorchJD lacks {method}: {why}")

    cos = agreement(tjd)
    harness.record(args.out, {"bench": "aggregation", "kind": "agreement", "cosine_ours_torchjd": cos})
    print("cos(ours, TorchJD) of the update, P=100k fp64:", {m: {k: round(v, 6) for k, v in d.items()} for m, d in cos.items()})

    accuracy = mgda_accuracy(torchjd_weightings())
    harness.record(args.out, {"bench": "aggregation", "kind": "mgda_accuracy", "P": 65_536, "solutions": accuracy})
    print("MGDA min-norm problem, P=65k fp64: KKT gap ÷ max‖g‖², objective ÷ ours:")
    for name, cases in accuracy.items():
        print(f"  {name}: " + ", ".join(f"{T}: {c['kkt_gap']:.1e}, {c['objective_over_ours']:.3f}" for T, c in cases.items()))

    table = bench_grid(args, tjd, missing)
    print("\nAggregation alone, fp32 CPU (medians; ratios measured in the same run)")
    print(
        harness.format_table(
            ["method", "T", "P", "ours ms", "read ms", "ours/read", "ours/read1", "TorchJD ms", "ours/TorchJD", "paired", "rounds"], table
        )
    )
    wtable = bench_weights(args, tjd)
    print(f"\nWeights alone at T={args.weights_T} (from G) vs the whole aggregation at P={args.weights_P / 1e6:g}M")
    print(harness.format_table(["method", "weights ms", "aggregate ms", "weights/aggregate", "TorchJD weights ms"], wtable))
    print(f"\nrecorded to {args.out}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
