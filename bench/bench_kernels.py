"""Triton ``gram`` / ``combine`` and the weight solves against their torch references and against a device
copy of the same bytes, one run.

    python -m bench.bench_kernels --out DIR            # on a CUDA device
    python -m bench.bench_kernels --out DIR --smoke    # toy sizes; without CUDA, under Triton's interpreter

On a GPU: for every T in ``--tasks`` (default 2, 8, 32) and dtype in ``--dtypes`` (fp32, bf16), a
``(T, P)`` matrix of ``--elements`` entries (P = elements / T: every T moves the same bytes). Every timing
is the median of ``--repeats`` CUDA-event measurements after warm-up (the first calls compile and
autotune). Ratios are taken within the run: kernel ÷ its torch reference, and GB/s of the bytes each op
must move ÷ the GB/s of ``dst.copy_(J)`` (one read and one write of J: the bandwidth ceiling). ``gram``
also reports the rate of its padded ``tl.dot`` (2·BT²·P flops), which says whether fp32 — multiplied
in full fp32, ``input_precision="ieee"``, on the FMA units — is bound by arithmetic rather than memory.
The solves (PCGrad chains, MGDA's min-norm point, CAGrad's dual; one single-program kernel each) are
timed per T in ``--solve-tasks`` (default 8, 32, 64: T = 64 is where Triton 3.6 spills registers)
against the torch path. One JSON line per measurement goes to DIR/kernels.jsonl, with the machine,
versions and revision (``bench.harness.record``).

Without CUDA, or with ``--smoke``, it runs toy sizes (the interpreter's timings mean nothing: this only
proves that the code paths run) and writes DIR/kernels_smoke.jsonl instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE = {"tasks": "2,3", "elements": 3 * 4097, "solve_tasks": "3", "repeats": 2, "warmup": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON lines")
    parser.add_argument("--tasks", default="2,8,32", help="comma list of T (default 2,8,32)")
    parser.add_argument("--elements", type=int, default=1 << 27, help="T·P, entries of J (default 2^27)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list from {','.join(DTYPES)}")
    parser.add_argument("--solve-tasks", default="8,32,64", help="comma list of T for the solves ('' for none)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (autotuning happens here)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: prove the code paths, time nothing")
    return parser


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def time_ms(fn: Callable[[], object], *, repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def _max_relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((result.double() - reference.double()).abs().max() / scale)


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


def bandwidth_rows(T: int, name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """copy, gram, combine and gram+combine (Triton and torch) on one ``(T, P)`` matrix."""
    from gradsurgery.kernels import combine, combine_reference, gram, gram_reference
    from gradsurgery.kernels.gram import gram_plan

    cuda = device.type == "cuda"
    P = max(1, args.elements // T)
    dtype = DTYPES[name]
    gen = torch.Generator(device=device).manual_seed(T)
    J = torch.randn(T, P, generator=gen, device=device).to(dtype)
    w = torch.rand(T, generator=gen, device=device, dtype=torch.float64)
    out = torch.empty(P, dtype=dtype, device=device)
    copy_dst = torch.empty_like(J)
    j_bytes, out_bytes = J.numel() * J.element_size(), P * out.element_size()

    def step_triton() -> None:
        gram(J)
        combine(w, J, out)

    def step_torch() -> None:
        gram_reference(J)
        combine_reference(w, J, out)

    cases = [  # (op, impl, fn, bytes the op must move at least)
        ("copy", "torch", lambda: copy_dst.copy_(J), 2 * j_bytes),
        ("gram", "triton", lambda: gram(J), j_bytes),
        ("gram", "torch", lambda: gram_reference(J), j_bytes),
        ("combine", "triton", lambda: combine(w, J, out), j_bytes + out_bytes),
        ("combine", "torch", lambda: combine_reference(w, J, out), j_bytes + out_bytes),
        ("gram+combine", "triton", step_triton, 2 * j_bytes + out_bytes),
        ("gram+combine", "torch", step_torch, 2 * j_bytes + out_bytes),
    ]
    rows = []
    for op, impl, fn, moved in cases:
        summary = _summary(time_ms(fn, repeats=args.repeats, warmup=args.warmup, cuda=cuda))
        rows.append({"op": op, "impl": impl, "bytes_moved": moved, "GBps": moved / (summary["median_ms"] * 1e-3) / 1e9, **summary})
    copy = rows[0]
    medians = {(r["op"], r["impl"]): r["median_ms"] for r in rows}
    block_t = gram_plan(T, P, interpreted=not cuda, max_splits=4).block_t
    checks = {
        "gram_max_rel_error": _max_relative_error(gram(J), gram_reference(J)),
        "combine_max_rel_error": _max_relative_error(
            combine(w, J, torch.empty_like(out)), combine_reference(w, J, torch.empty_like(out))
        ),
    }
    for row in rows:
        row.update(kind="bandwidth", dtype=name, T=T, P=P, **checks)
        row["time_over_copy"] = row["median_ms"] / copy["median_ms"]
        row["fraction_of_copy_GBps"] = row["GBps"] / copy["GBps"]
        if row["impl"] == "triton":
            row["speedup_over_torch"] = medians[row["op"], "torch"] / row["median_ms"]
        if row["op"] == "gram" and row["impl"] == "triton":
            row["dot_block_t"] = block_t
            row["dot_TFLOPs"] = 2 * block_t * block_t * P / (row["median_ms"] * 1e-3) / 1e12
    return rows


def solve_rows(T: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Latency of each fused solve against the torch path it reproduces, on one conflicting Gram."""
    from gradsurgery.kernels import cagrad_dual_triton, min_norm_triton, pcgrad_weights_triton
    from gradsurgery.methods import _simplex, cagrad, mgda
    from gradsurgery.methods._common import normalized
    from gradsurgery.methods.pcgrad import pcgrad_coefficients, random_orders

    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(T)
    J = torch.randn(T, 64, generator=gen, device=device, dtype=torch.float64)
    G = normalized(J @ J.T)
    b, phi = G.sum(dim=1) / T, 0.4 * G.sum().clamp_min(0).sqrt() / T
    orders = random_orders(T, generator=gen, device=device)
    iterations = _simplex.DEFAULT_ITERATIONS
    pairs = {
        "pcgrad": (lambda: pcgrad_weights_triton(G, orders), lambda: pcgrad_coefficients(G, orders).sum(dim=0)),
        "mgda": (lambda: min_norm_triton(G, iterations), lambda: mgda._min_norm(G, iterations)),
        "cagrad": (lambda: cagrad_dual_triton(G, b, phi, iterations), lambda: cagrad._solve(G, b, phi, iterations)),
    }
    rows = []
    for method, (fused, plain) in pairs.items():
        ours = _summary(time_ms(fused, repeats=args.repeats, warmup=args.warmup, cuda=cuda))
        theirs = _summary(time_ms(plain, repeats=args.repeats, warmup=args.warmup, cuda=cuda))
        rows.append(
            {
                "kind": "solve",
                "op": f"solve-{method}",
                "impl": "triton",
                "T": T,
                **ours,
                "torch_median_ms": theirs["median_ms"],
                "speedup_over_torch": theirs["median_ms"] / ours["median_ms"],
                "max_abs_weight_difference": float((fused() - plain()).abs().max()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede the first kernel launch (Triton reads it when the kernel modules load).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run under Triton's CPU interpreter; its timings mean nothing", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    from bench import harness

    device = torch.device("cuda" if cuda else "cpu")
    path = args.out / ("kernels_smoke.jsonl" if args.smoke else "kernels.jsonl")
    common = {"bench": "kernels", "smoke": args.smoke, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "revision": os.environ.get("GPU_CHECK_REVISION")}  # fmt: skip
    count = 0
    for T in _ints(args.tasks):
        for name in args.dtypes.split(","):
            for row in bandwidth_rows(T, name, args, device):  # its tensors are freed on return
                harness.record(path, {**common, **row})
                count += 1
                extra = f"  x{row['speedup_over_torch']:.2f} vs torch" if "speedup_over_torch" in row else ""
                flops = f"  {row['dot_TFLOPs']:.1f} dot TFLOP/s" if "dot_TFLOPs" in row else ""
                print(
                    f"T={T:<3} {name:>4} {row['op']:>13} {row['impl']:>6}  {row['median_ms']:9.3f} ms  "
                    f"{row['GBps']:8.1f} GB/s  {row['fraction_of_copy_GBps']:5.2f} of copy{extra}{flops}",
                    flush=True,
                )
            if cuda:
                torch.cuda.empty_cache()
    for T in _ints(args.solve_tasks):
        for row in solve_rows(T, args, device):
            harness.record(path, {**common, **row})
            count += 1
            print(
                f"T={T:<3} {row['op']:>13} triton  {row['median_ms']:9.3f} ms  torch {row['torch_median_ms']:9.3f} ms  "
                f"x{row['speedup_over_torch']:.2f}",
                flush=True,
            )
    print(f"appended {count} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
