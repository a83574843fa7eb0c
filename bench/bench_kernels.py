"""Triton ``gram`` / ``combine`` against their torch references and against copy bandwidth, one run.

    python bench/bench_kernels.py --out DIR

On a GPU: T=8, P=64M columns, fp32 and bf16. Every timing is the median of ``--repeats`` CUDA-event
measurements after warm-up (the first calls autotune). Ratios are taken within this run: kernel ÷ its
torch reference, kernel ÷ ``dst.copy_(J)`` (one read plus one write of J, the bandwidth ceiling), and
GB/s of the bytes each op must move. One JSON line per measurement is appended to DIR/kernels.jsonl,
with the machine, versions and git revision.

Without CUDA it runs a tiny smoke version under Triton's CPU interpreter (to check that the script and
kernels run; interpreter timings mean nothing) and appends to DIR/kernels_smoke.jsonl instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON lines")
    parser.add_argument("--tasks", type=int, default=8, help="T, rows of J (default 8)")
    parser.add_argument("--columns", type=int, default=1 << 26, help="P, columns of J (default 64M)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list from {','.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (autotuning happens here)")
    return parser


def _time_ms(fn: Callable[[], object], *, repeats: int, warmup: int, cuda: bool) -> list[float]:
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


def _environment(device: torch.device) -> dict:
    repo = Path(__file__).resolve().parent.parent
    try:
        git = ("git", "-C", str(repo))
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        revision = head.stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout)
    except (OSError, subprocess.SubprocessError):
        revision, dirty = "unknown", None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "git_revision": revision,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda)
        env["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def _max_relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((result.double() - reference.double()).abs().max() / scale)


def run(args: argparse.Namespace) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = _environment(device)
    records = []
    for name in args.dtypes.split(","):
        records += _run_dtype(name, args, device, env)  # its tensors are freed on return
        if cuda:
            torch.cuda.empty_cache()
    return records


def _run_dtype(name: str, args: argparse.Namespace, device: torch.device, env: dict) -> list[dict]:
    from gradsurgery.kernels import combine, combine_reference, gram, gram_reference

    cuda = device.type == "cuda"
    T, P = args.tasks, args.columns
    dtype = DTYPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
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

    # (op, impl, fn, bytes the op must move at least)
    cases = [
        ("copy", "torch", lambda: copy_dst.copy_(J), 2 * j_bytes),
        ("gram", "triton", lambda: gram(J), j_bytes),
        ("gram", "torch", lambda: gram_reference(J), j_bytes),
        ("combine", "triton", lambda: combine(w, J, out), j_bytes + out_bytes),
        ("combine", "torch", lambda: combine_reference(w, J, out), j_bytes + out_bytes),
        ("gram+combine", "triton", step_triton, 2 * j_bytes + out_bytes),
        ("gram+combine", "torch", step_torch, 2 * j_bytes + out_bytes),
    ]
    medians: dict[tuple[str, str], float] = {}
    records = []
    for op, impl, fn, moved in cases:
        times = _time_ms(fn, repeats=args.repeats, warmup=args.warmup, cuda=cuda)
        median = statistics.median(times)
        medians[op, impl] = median
        records.append(
            {
                "bench": "kernels",
                "smoke": not cuda,
                "op": op,
                "impl": impl,
                "dtype": name,
                "T": T,
                "P": P,
                "median_ms": median,
                "min_ms": min(times),
                "max_ms": max(times),
                "repeats": len(times),
                "bytes_moved": moved,
                "GBps": moved / (median * 1e-3) / 1e9,
            }
        )
    copy = records[0]
    checks = {
        "gram_max_rel_error": _max_relative_error(gram(J), gram_reference(J)),
        "combine_max_rel_error": _max_relative_error(
            combine(w, J, torch.empty_like(out)), combine_reference(w, J, torch.empty_like(out))
        ),
    }
    for record in records:
        record["time_over_copy"] = record["median_ms"] / copy["median_ms"]
        record["fraction_of_copy_GBps"] = record["GBps"] / copy["GBps"]
        if record["impl"] == "triton":
            record["speedup_over_torch"] = medians[record["op"], "torch"] / record["median_ms"]
        record.update(checks, env=env)
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        # Must precede the first kernel launch (Triton reads it when the kernel modules load).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("no CUDA device: smoke run under Triton's CPU interpreter; its timings mean nothing", file=sys.stderr)
        args.tasks, args.columns, args.repeats, args.warmup = min(args.tasks, 3), min(args.columns, 4097), 2, 1
        filename = "kernels_smoke.jsonl"
    else:
        filename = "kernels.jsonl"
    records = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / filename
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for r in records:
        extra = f"  x{r['speedup_over_torch']:.2f} vs torch" if "speedup_over_torch" in r else ""
        print(
            f"{r['op']:>13} {r['impl']:>6} {r['dtype']:>4}  {r['median_ms']:9.3f} ms  {r['GBps']:8.1f} GB/s  "
            f"{r['fraction_of_copy_GBps']:5.2f} of copy{extra}"
        )
    print(f"appended {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
