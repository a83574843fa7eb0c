"""Aggregation alone, CPU, ours ÷ TorchJD: the whole aggregation with ``J`` given, and the weights from ``G``.

**Grid** (``J`` given; PCGrad/CAGrad/MGDA, the methods it has tracked since the first run). For every
``T ∈ {2, 8, 32}`` and ``P ∈ {1M, 4M, 16M}`` (fp32), in one interleaved run: ``J.sum(0)`` (one read of
``J``, the memory-traffic unit, as asked), ``J.sum(1)`` (``read1``: one read with a ``T``-vector result:
``J.sum(0)`` also allocates and writes a fresh ``P``-vector, which costs page faults on every call once it
passes glibc's mmap threshold, 32 MiB, i.e. at ``P = 16M``), ``gs.functional.{pcgrad, cagrad, mgda}(J)``
and TorchJD's aggregator of the same method called on the same ``J``. Before the timings: the cosine
between our update and TorchJD's, and how exactly each solves MGDA's min-norm problem.

**Weights** (``G`` given; every method of ``gradsurgery.methods.REGISTRY`` that has weights from ``G``:
not the elementwise ones, nor the loss-weighting ones). For ``T ∈ {2, 8, 32}``, one interleaved run per ``T``: our
``gs.functional.<function>_weights(G)`` (``bench.methods.weights_function``: the benchmarks' options, a
seeded generator, a stateful method's state carried from call to call) beside TorchJD's weighting of
the same method (``bench.peers``) on the same fp32 ``G``, or, where TorchJD's reads rows (Sum, Mean,
Random, Nash-MTL; ConFIG, which has only an aggregator), on the ``T × T`` Cholesky factor ``L`` of
``G`` (``L Lᵀ = G``: the same Gram matrix, no ``P``-long pass). The cosine between the two updates
(``wᵀL``, in ``L``'s row space) says whether they computed the same thing (random methods draw
differently). Targets: ours ≤ 0.5× TorchJD for the QP-based methods (:data:`QP_BASED`), ≤ 1× for the
others.

**Blocks** (``granularity=``'s aggregation alone; PCGrad/CAGrad/MGDA). ``J`` cut into ``B = 64`` equal
blocks of columns (:func:`equal_blocks`): the per-block Gram matrices
(``gradsurgery.backend.gram_blocks``), the method's weights batched on the ``(64, T, T)`` stack, the
per-block combine (``backend.combine_blocks``) and the three in a row, each beside the same on one
block (``backend.gram``, the weights on ``(T, T)``, ``backend.combine``): at ``T = 8`` for
``P ∈ {1M, 4M, 16M}`` and at ``T ∈ {2, 32}`` for ``P = 4M``, one interleaved run each
(:func:`block_variants`). Target: 64 blocks ≤ 1.10× one block at ``T = 8``. Beside them, for
``3 ≤ T ≤ 10``, the least an exact face enumeration of the 64 problems costs (:func:`enumeration_floor`),
against what the target leaves the 64 blocks' weights.

    python -m bench.bench_aggregation              # all three, ~7 minutes on 1 thread
    python -m bench.bench_aggregation --quick      # small sizes, seconds (a smoke test)
    python -m bench.bench_aggregation --only weights   # or: grid, blocks

Rows are appended to ``bench/results/aggregation.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import gradsurgery as gs
from bench import harness
from bench.methods import CAGRAD_C, ORIGINAL, aggregate_function, lookup, names_of, weights_function
from gradsurgery import backend
from gradsurgery.kernels.blocks import BlockLayout
from gradsurgery.methods import _supports
from gradsurgery.methods._common import normalized
from gradsurgery.methods._cone import padded
from bench.peers import torchjd_aggregator, torchjd_peer, torchjd_weighting

BLOCKS = 64  # the blocks benchmark's number of blocks
BLOCKS_BOUND = 1.10  # the issue's: 64 blocks ≤ 1.10× one block (T = 8)
RANK = 8  # J = noise + a rank-8 mixture: rows with positive and negative inner products (conflicts)
QP_BASED = ("UPGrad", "DualProj", "NashMTL")  # wrapper names; the issue's ≤ 0.5× TorchJD target
QP_BOUND, OTHER_BOUND = 0.5, 1.0
WEIGHTS_P = 65_536  # columns of the J whose Gram matrix the weights read (G does not depend on P's cost)


def make_J(T: int, P: int, *, seed: int = 0) -> torch.Tensor:
    """A ``(T, P)`` fp32 task-gradient matrix whose rows conflict in part (cosines of both signs)."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g)
    mixing = torch.randn(T, RANK, generator=g) / RANK**0.5
    basis = torch.randn(RANK, P, generator=g)
    J.mul_(0.3).addmm_(mixing, basis)
    return J


def equal_blocks(P: int, B: int) -> BlockLayout:
    """``B`` blocks of consecutive columns of (nearly) equal width over ``P`` columns."""
    edges = [round(i * P / B) for i in range(B + 1)]
    return BlockLayout([[(edges[i], edges[i + 1])] for i in range(B)])


def block_variants(
    J: torch.Tensor, methods: tuple[str, ...] = ORIGINAL, *, blocks: int = BLOCKS
) -> dict[str, Callable[[], object]]:
    """The phases of the aggregation on one block and on ``blocks`` equal blocks of ``J``'s columns, and
    the whole aggregation of each method both ways (what ``granularity=`` runs per step, from the same
    backend functions):

    ``gram1`` / ``gram{B}``: ``backend.gram`` / ``backend.gram_blocks``; ``weights1-{m}`` /
    ``weights{B}-{m}``: the method's weights (``bench.methods.weights_function``) on ``(T, T)`` / on the
    ``(B, T, T)`` stack, one batched call; ``combine1`` / ``combine{B}``: ``backend.combine`` /
    ``backend.combine_blocks`` into a preallocated ``P``-vector; ``agg1-{m}`` / ``agg{B}-{m}``: the three
    in a row.
    """
    T, P = J.shape
    layout = equal_blocks(P, blocks)
    out = torch.empty(P)
    G1, GB = backend.gram(J), backend.gram_blocks(J, layout)
    w1, WB = torch.ones(T), torch.ones(blocks, T)
    B = blocks
    variants: dict[str, Callable[[], object]] = {
        "gram1": lambda: backend.gram(J),
        f"gram{B}": lambda: backend.gram_blocks(J, layout),
        "combine1": lambda: backend.combine(w1, J, out),
        f"combine{B}": lambda: backend.combine_blocks(WB, J, out, layout),
    }
    for m in methods:
        weights = weights_function(m)
        variants[f"weights1-{m}"] = lambda f=weights: f(G1)
        variants[f"weights{B}-{m}"] = lambda f=weights: f(GB)

        def one(f: Callable[[torch.Tensor], torch.Tensor] = weights) -> torch.Tensor:
            return backend.combine(f(backend.gram(J)).to(J.dtype), J, out)

        def per_block(f: Callable[[torch.Tensor], torch.Tensor] = weights) -> torch.Tensor:
            return backend.combine_blocks(f(backend.gram_blocks(J, layout)).to(J.dtype), J, out, layout)

        variants[f"agg1-{m}"] = one
        variants[f"agg{B}-{m}"] = per_block
    return variants


def enumeration_floor(G: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The least work of an exact face enumeration for the ``(B, T, T)`` stack ``G`` (``3 ≤ T ≤ 10``), each
    part on inputs built beforehand, so that only that part is timed: ``floor-chains``, the
    ``binom(T, ⌊T/2⌋)`` Cholesky factorisations of ``(T − 1) × (T − 1)`` matrices per problem that any
    enumeration needs (one factorisation serves the faces of one nested chain, and a chain holds one
    ``⌊T/2⌋``-element face: Sperner), padded as ``methods._supports`` pads them; ``floor-select``, the
    choice of each problem's best feasible candidate among its ``2^T − T − 1`` faces' solutions, which
    every enumeration ends with. ``methods._supports`` does both, and builds the systems and solves them.
    """
    B, T = G.shape[0], G.shape[-1]
    Gn = normalized(G.to(torch.float64))
    points = _supports.min_norm(Gn)[:, None, :].expand(B, 2**T - T - 1, T).contiguous()
    # The Gram matrix of the gradients' differences from the first (positive definite for independent
    # gradients), one copy per chain, padded to whole 64-byte rows.
    base = Gn[:, 1:, 1:] - Gn[:, 1:, :1] - Gn[:, :1, 1:] + Gn[:, :1, :1]
    width = padded(T - 1)
    base = torch.nn.functional.pad(base, (0, width - (T - 1), 0, width - (T - 1)))
    base.diagonal(dim1=-2, dim2=-1)[:, T - 1 :] = 1.0
    chains = base[:, None].expand(B, math.comb(T, T // 2), width, width).contiguous()
    return {"floor-chains": lambda: torch.linalg.cholesky_ex(chains), "floor-select": lambda: _select(points, Gn)}


def _select(points: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Each problem's feasible candidate ``(B, K, T)`` of least ``wᵀGw``: the objective, the feasibility
    test and the choice, nothing else (``_supports._best`` also clips, normalises and adds the vertices)."""
    values = _supports._quadratic(points, G)
    return torch.where((points >= 0).all(dim=-1), values, float("inf")).argmin(dim=-1)


def torchjd_aggregators(methods: tuple[str, ...], T: int) -> tuple[dict[str, object], dict[str, str]]:
    """TorchJD's aggregator per method (configured from ours, ``bench.peers``), and why one is missing."""
    found: dict[str, object] = {}
    missing: dict[str, str] = {}
    try:
        import torchjd  # noqa: F401
    except ImportError as error:
        return found, {m: f"torchjd not installed ({error})" for m in methods}
    for method in methods:
        if torchjd_peer(method) is None:
            missing[method] = f"torchjd {_version('torchjd')}: no counterpart"
            continue
        try:
            found[method] = torchjd_aggregator(method, T)
        except Exception as error:  # CAGrad raises when its optional solver (cvxpy) is absent
            missing[method] = f"torchjd aggregator unavailable: {error}"
    return found, missing


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
            a, b = aggregate_function(method)(J), agg(J)
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            out.setdefault(method, {})[f"T={T}"] = cos
    return out


def mgda_accuracy() -> dict[str, dict[str, dict[str, float]]]:
    """How exactly each library solves MGDA's min-norm problem on a conflicting ``J`` (fp64 Gram): the
    Frank–Wolfe gap of its weights (the KKT residual, ÷ ``max‖g_t‖²``) and its objective ``‖d‖²`` ÷ ours."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for T in (8, 32, 64):
        J = make_J(T, 65_536, seed=2).double()
        G = J @ J.T
        w = weights_function("mgda")(G)
        solutions = {"ours": w / w.sum()}
        try:
            theirs = torchjd_weighting("mgda", T)(G).double()
            solutions["torchjd"] = theirs / theirs.sum()
        except ImportError:
            pass
        best = solutions["ours"] @ G @ solutions["ours"]
        for name, alpha in solutions.items():
            grad = 2 * G @ alpha
            out.setdefault(name, {})[f"T={T}"] = {
                "kkt_gap": float((alpha @ grad - grad.min()) / G.diagonal().max()),
                "objective_over_ours": float(alpha @ G @ alpha / best),
            }
    return out


def bench_grid(args: argparse.Namespace) -> list[list[object]]:
    table = []
    tjd, missing = torchjd_aggregators(ORIGINAL, max(args.T))
    for method, why in missing.items():
        print(f"TorchJD lacks {method}: {why}")
    cos = agreement(tjd)
    harness.record(args.out, {"bench": "aggregation", "kind": "agreement", "cosine_ours_torchjd": cos})
    print("cos(ours, TorchJD) of the update, P=100k fp64:", {m: {k: round(v, 6) for k, v in d.items()} for m, d in cos.items()})
    for P in args.P:
        J_all = make_J(max(args.T), P)
        for T in args.T:
            J = J_all[:T]  # contiguous rows: a (T, P) matrix of its own
            variants: dict[str, Callable[[], object]] = {"read": lambda J=J: J.sum(0), "read1": lambda J=J: J.sum(1)}
            out = torch.empty(P)
            # the same call writing into a preallocated vector, as the wrappers do: isolates the output's cost
            variants["ours-pcgrad-out"] = lambda J=J, out=out, f=aggregate_function("pcgrad"): f(J, out=out)
            for method in ORIGINAL:
                variants[f"ours-{method}"] = lambda f=aggregate_function(method), J=J: f(J)
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
            for method in ORIGINAL:
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


def weights_methods() -> list[str]:
    """Every registered method that has weights from ``G`` (the Gram-space ones)."""
    return list(names_of("gram"))


def _torchjd_weights(name: str, T: int, G: torch.Tensor, L: torch.Tensor) -> tuple[Callable[[], torch.Tensor], bool, str]:
    """TorchJD's computation of ``name`` on ``G`` (or ``L``): the call, whether it returns weights (else
    the update in ``L``'s row space), and what was called."""
    peer = torchjd_peer(name)
    assert peer is not None
    weighting = torchjd_weighting(name, T)
    called = f"{type(weighting).__name__}({'G' if peer.on == 'gramian' else 'L'})"
    argument = G if peer.on == "gramian" else L
    return (lambda: weighting(argument)), peer.weighting is not None, called


def bench_weights(args: argparse.Namespace) -> list[list[object]]:
    """Per ``T``: every method's weights from ``G``, ours and TorchJD's, in one interleaved run."""
    table = []
    methods = weights_methods()
    for T in args.weights_T:
        J = make_J(T, WEIGHTS_P, seed=2)
        G = gs.functional.gram(J)
        L = torch.linalg.cholesky(G.double()).to(G.dtype)
        # The functional API's input check (a host read of isfinite(G)), part of every ours-* call.
        variants: dict[str, Callable[[], object]] = {"check": lambda: gs.functional.check_finite_gram(G)}
        called: dict[str, str] = {}
        missing: dict[str, str] = {}
        agreement: dict[str, float] = {}
        for name in methods:
            ours = weights_function(name)
            variants[f"ours-{name}"] = lambda f=ours: f(G)
            if torchjd_peer(name) is None:
                missing[name] = "no TorchJD counterpart"
                continue
            try:
                theirs, _, called[name] = _torchjd_weights(name, T, G, L)
                # A fresh pair for the comparison, so that stateful and random methods start alike.
                a = weights_function(name)(G).to(L.dtype) @ L
                fresh, gives_weights, _ = _torchjd_weights(name, T, G, L)
                b = fresh().to(L.dtype) @ L if gives_weights else fresh().to(L.dtype)
            except Exception as error:  # an optional solver missing (cvxpy): a result, not a crash
                missing[name] = f"{type(error).__name__}: {error}"[:200]
                continue
            variants[f"torchjd-{name}"] = theirs
            agreement[name] = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
        inner = _inner_counts(variants)
        started = time.perf_counter()
        times = harness.interleave(
            variants, warmup=2, rounds=args.max_rounds, min_rounds=3, budget_s=args.weights_budget, inner=inner
        )
        elapsed = time.perf_counter() - started
        summary = harness.summarize(times)
        ratios: dict[str, Any] = {}
        for name in methods:
            wrapper = lookup(name).name
            bound = QP_BOUND if wrapper in QP_BASED else OTHER_BOUND
            ours_ms = summary[f"ours-{name}"]["median_s"] * 1e3
            entry: dict[str, Any] = {"ours_ms": ours_ms}
            theirs_ms = ratio = paired = None
            if f"torchjd-{name}" in times:
                r = harness.ratio(times, f"ours-{name}", f"torchjd-{name}")
                ratio, paired = r["of_medians"], r["median_paired"]
                theirs_ms = summary[f"torchjd-{name}"]["median_s"] * 1e3
                within = [v <= bound for v in (ratio, paired)]
                entry.update(over_torchjd=r, torchjd_ms=theirs_ms, torchjd_call=called[name], bound=bound,
                             met="yes" if all(within) else "no" if not any(within) else "mixed",
                             cosine=agreement[name])  # fmt: skip
            ratios[name] = entry
            table.append([wrapper, T, ours_ms, theirs_ms, ratio, paired, agreement.get(name), bound, entry.get("met")])
        harness.record(
            args.out,
            {
                "bench": "aggregation",
                "kind": "weights_vs_torchjd",
                "T": T,
                "P": WEIGHTS_P,
                "dtype": str(G.dtype).removeprefix("torch."),
                "device": "cpu",
                "note": "ours: bench.methods.weights_function(name)(G), the functional API, whose input check alone "
                "is the 'check' variant; TorchJD: its weighting on G, or on L = chol(G) where it reads rows "
                "(ConFIG: its aggregator on L); cosine: between the two updates in L's row space",
                "ratios": ratios,
                "torchjd_missing": missing,
                "inner_calls": inner,
                "wall_s": elapsed,
                "variants": summary,
            },
        )
        print(
            f"  weights T={T}: {elapsed:.0f}s, {min(len(t) for t in times.values())} rounds, "
            f"input check {summary['check']['median_s'] * 1e6:.1f} µs",
            flush=True,
        )
    return table


def bench_blocks(args: argparse.Namespace) -> list[list[object]]:
    """Per ``(T, P)``: 64 blocks ÷ one block, the whole aggregation and each phase, in one interleaved run."""
    table = []
    B = BLOCKS
    for T, P in args.blocks_cases:
        J = make_J(T, P)
        variants = block_variants(J, ORIGINAL, blocks=B)
        exact = 3 <= T <= _supports.MAX_TASKS  # where CAGrad and MGDA enumerate the faces
        if exact:
            variants.update(enumeration_floor(backend.gram_blocks(J, equal_blocks(P, B))))
        inner = _inner_counts(variants)
        started = time.perf_counter()
        times = harness.interleave(
            variants, warmup=1, rounds=args.max_rounds, min_rounds=3, budget_s=args.blocks_budget, inner=inner
        )
        elapsed = time.perf_counter() - started
        summary = harness.summarize(times)
        ms = {name: summary[name]["median_s"] * 1e3 for name in variants}
        phases = {
            "gram": harness.ratio(times, f"gram{B}", "gram1"),
            "combine": harness.ratio(times, f"combine{B}", "combine1"),
        }
        ratios: dict[str, Any] = {}
        for m in ORIGINAL:
            r = harness.ratio(times, f"agg{B}-{m}", f"agg1-{m}")
            within = [v <= BLOCKS_BOUND for v in r.values()]
            surplus = ms[f"agg{B}-{m}"] - ms[f"agg1-{m}"]
            # the weights' cost the bound leaves: 10% of the one-block aggregation, less the other phases' extra
            budget = (BLOCKS_BOUND - 1) * ms[f"agg1-{m}"] - (ms[f"gram{B}"] - ms["gram1"]) - (ms[f"combine{B}"] - ms["combine1"])
            ratios[m] = {
                "over_one_block": r,
                "weights_over_one": harness.ratio(times, f"weights{B}-{m}", f"weights1-{m}"),
                # where the extra time of the 64 blocks goes (ms, medians): each phase's difference
                "extra_ms": {
                    "total": surplus,
                    "gram": ms[f"gram{B}"] - ms["gram1"],
                    "weights": ms[f"weights{B}-{m}"] - ms[f"weights1-{m}"],
                    "combine": ms[f"combine{B}"] - ms["combine1"],
                },
                "weights_budget_ms": budget,
                "bound": BLOCKS_BOUND if T == 8 else None,
                # what the 64 blocks' weights may take in all, against the least an exact enumeration costs
                "weights_allowed_ms": budget + ms[f"weights1-{m}"],
                "met": None if T != 8 else "yes" if all(within) else "no" if not any(within) else "mixed",
            }
            table.append(
                [
                    m, T, f"{P / 1e6:g}M", ms[f"agg1-{m}"], ms[f"agg{B}-{m}"], r["of_medians"], r["median_paired"],
                    ms["gram1"], ms[f"gram{B}"], ms[f"weights1-{m}"], ms[f"weights{B}-{m}"], ms["combine1"],
                    ms[f"combine{B}"], ratios[m]["met"],
                ]
            )  # fmt: skip
        floor = {part: ms[f"floor-{part}"] for part in ("chains", "select")} if exact else None
        harness.record(
            args.out,
            {
                "bench": "aggregation",
                "kind": "blocks",
                "T": T,
                "P": P,
                "blocks": B,
                "dtype": "float32",
                "device": "cpu",
                "cagrad_c": CAGRAD_C,
                "note": f"bench_aggregation.block_variants: {B} equal column blocks (backend.gram_blocks, the "
                "weights batched on (B, T, T), backend.combine_blocks) vs one block (backend.gram, the weights "
                "on (T, T), backend.combine); torch path (CPU)",
                "phases": phases,
                "ratios": ratios,
                # enumeration_floor's parts (ms, medians); chains + select: the least an exact enumeration costs
                "enumeration_floor_ms": floor,
                "inner_calls": inner,
                "wall_s": elapsed,
                "variants": summary,
            },
        )
        print(f"  blocks T={T} P={P / 1e6:g}M: {elapsed:.0f}s, {summary['gram1']['rounds']} rounds", flush=True)
        if floor is not None:
            allowed = ", ".join(
                f"{m} {ratios[m]['weights_allowed_ms']:.2f} (takes {ms[f'weights{B}-{m}']:.2f})" for m in ORIGINAL if m != "pcgrad"
            )
            print(
                f"    the {B} weights may take (ms): {allowed}; an exact enumeration needs at least "
                f"{floor['chains'] + floor['select']:.2f} (chains {floor['chains']:.2f} + select {floor['select']:.2f})",
                flush=True,
            )
        del J, variants
        gc.collect()
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test); not recorded unless --out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see README)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per grid configuration")
    parser.add_argument("--weights-budget", type=float, default=30.0, help="seconds of timed rounds per T (weights)")
    parser.add_argument("--max-rounds", type=int, default=15)
    parser.add_argument("--blocks-budget", type=float, default=20.0, help="seconds of timed rounds per blocks case")
    parser.add_argument("--only", choices=("grid", "weights", "blocks"), default=None, help="run one of the parts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # TorchJD's Nash-MTL warns on every solve that its cvxpy problem is not DPP.
    warnings.filterwarnings("ignore", message=".*not DPP.*")
    args.weights_T = [2, 8, 32]
    args.blocks_cases = [(8, 1_000_000), (8, 4_000_000), (8, 16_000_000), (2, 4_000_000), (32, 4_000_000)]
    if args.quick:
        args.T, args.P, args.weights_T = [2, 8], [100_000, 400_000], [2, 8]
        args.blocks_cases = [(8, 100_000), (2, 100_000)]
        args.budget, args.weights_budget, args.blocks_budget, args.max_rounds = 1.0, 2.0, 1.0, 5
        args.out = args.out or Path("/tmp/gradsurgery-bench-quick/aggregation.jsonl")
    else:
        args.T, args.P = [2, 8, 32], [1_000_000, 4_000_000, 16_000_000]
        args.out = args.out or harness.RESULTS_DIR / "aggregation.jsonl"
    started = time.perf_counter()
    ctx = harness.context()
    print(f"machine: {ctx['machine']['cpu']}, {ctx['machine']['nproc']} CPUs, load {ctx['machine']['loadavg_at_start']}")
    print(f"versions: {ctx['versions']}  git: {ctx['git']}  torch threads: {torch.get_num_threads()}")

    if args.only in (None, "grid"):
        accuracy = mgda_accuracy()
        harness.record(args.out, {"bench": "aggregation", "kind": "mgda_accuracy", "P": 65_536, "solutions": accuracy})
        print("MGDA min-norm problem, P=65k fp64: KKT gap ÷ max‖g‖², objective ÷ ours:")
        for name, cases in accuracy.items():
            print(f"  {name}: " + ", ".join(f"{T}: {c['kkt_gap']:.1e}, {c['objective_over_ours']:.3f}" for T, c in cases.items()))
        table = bench_grid(args)
        print("\nAggregation alone, fp32 CPU (medians; ratios measured in the same run)")
        print(
            harness.format_table(
                ["method", "T", "P", "ours ms", "read ms", "ours/read", "ours/read1", "TorchJD ms", "ours/TorchJD", "paired", "rounds"], table
            )
        )
    if args.only in (None, "weights"):
        wtable = bench_weights(args)
        print("\nWeights from G, ours ÷ TorchJD (same run, per T; cos: the two updates agree at 1.0)")
        print(
            harness.format_table(
                ["method", "T", "ours ms", "TorchJD ms", "ours/TorchJD", "paired", "cos", "bound", "met"], wtable
            )
        )
    if args.only in (None, "blocks"):
        btable = bench_blocks(args)
        print(f"\n{BLOCKS} blocks ÷ one block, aggregation alone (same run per case; ms are medians)")
        print(
            harness.format_table(
                ["method", "T", "P", "1 block ms", f"{BLOCKS} ms", "ratio", "paired", "gram1", f"gram{BLOCKS}",
                 "weights1", f"weights{BLOCKS}", "combine1", f"combine{BLOCKS}", "met (T=8)"],
                btable,
            )
        )  # fmt: skip
    print(f"\nrecorded to {args.out}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
