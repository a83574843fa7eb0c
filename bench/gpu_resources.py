"""Registers, spills and shared memory of every Triton kernel in ``kernels/``, compiled offline by the
installed Triton for a GPU architecture (default sm_90: H100, H200). No GPU is needed: ``ptxas`` ships
with Triton and its ``-v`` report is read from Triton's own compile.

    python bench/gpu_resources.py                  # sm_90, a table on stdout
    python bench/gpu_resources.py --arch 100 --out resources.jsonl

Every kernel is compiled as its launcher launches it: the same constexprs, warps and stages (the
autotuners' whole config lists), pointer arguments 16-byte aligned and the strides that Triton
specialises divisible by 16, as they are for contiguous buffers. A register or spill figure in a
comment under ``kernels/`` should name the Triton version it came from: they differ between releases
(the solve at T = 64 spills ~70 bytes per thread with Triton 3.9 and 320–600 with 3.6). ``same_binary_as``
names an earlier config of the same kernel whose cubin is byte-identical, i.e. a config the autotuner
times for nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Compiled kernels, never the interpreter (the kernel modules read this when imported), and a cache of
# our own: a cached binary would skip ptxas and with it the report.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_resources_cache_")


def _kernel_builds() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any], dict[str, Any]]]:
    """(label, jit function, signature, constexprs, options) for every launch configuration."""
    from gradsurgery.kernels import _combine_triton as combine
    from gradsurgery.kernels import _gram_triton as gram
    from gradsurgery.kernels import _solve_triton as solve
    from gradsurgery.kernels.gram import _REDUCE_BLOCK, _REDUCE_SPLITS

    for dtype in ("fp32", "bf16", "fp16"):
        for block_t in (16, 32, 64, 128):
            signature = {"J": f"*{dtype}", "partials": "*fp32", "T": "i32", "P": "i32", "stride_t": "i32",
                         "cols_per_split": "i32", "BT": "constexpr", "BLOCK_P": "constexpr", "UPCAST": "constexpr"}  # fmt: skip
            for config in gram.tuned_partials_kernel().configs:
                yield (
                    f"gram_partials {dtype} BT={block_t} warps={config.num_warps} stages={config.num_stages}",
                    gram._gram_partials_kernel,
                    signature,
                    {"BT": block_t, "BLOCK_P": 4096 // block_t, "UPCAST": False},
                    {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True},
                )
    for block_t in (16, 32, 64, 128):
        yield (
            f"gram_reduce BT={block_t}",
            gram._gram_reduce_kernel,
            {"partials": "*fp32", "G": "*fp32", "T": "i32", "num_splits": "i32", "BT": "constexpr",
             "BLOCK_E": "constexpr", "SPLITS": "constexpr"},  # fmt: skip
            {"BT": block_t, "BLOCK_E": _REDUCE_BLOCK, "SPLITS": _REDUCE_SPLITS},
            {"enable_fp_fusion": True},
        )
    for dtype in ("fp32", "bf16"):
        for config in combine.tuned_combine_kernel().configs:
            block = config.kwargs["BLOCK_P"]
            yield (
                f"combine {dtype} BLOCK_P={block} warps={config.num_warps}",
                combine._combine_kernel,
                {"w": "*fp64", "J": f"*{dtype}", "out": f"*{dtype}", "T": "i32", "P": "i32", "stride_w": "i32",
                 "stride_t": "i32", "size_class": "i32", "ACCUMULATE": "constexpr", "BLOCK_P": "constexpr"},  # fmt: skip
                {"ACCUMULATE": False, "BLOCK_P": block},
                {"num_warps": config.num_warps, "enable_fp_fusion": True},
            )
    from gradsurgery.kernels.solve import _block, _num_warps

    for T in (16, 32, 64):
        block = _block(T)
        options = {"num_warps": _num_warps(block), "enable_fp_fusion": False}
        for cagrad in (False, True):
            yield (
                f"simplex {'cagrad' if cagrad else 'mgda'} BT={block} warps={options['num_warps']}",
                solve._simplex_kernel,
                {"G": "*fp64", "b_ptr": "*fp64", "phi_ptr": "*fp64", "out": "*fp64", "T": "i32", "stride_g0": "i32",
                 "stride_g1": "i32", "stride_b": "i32", "iterations": "i32", "BT": "constexpr", "CAGRAD": "constexpr"},  # fmt: skip
                {"BT": block, "CAGRAD": cagrad},
                options,
            )
        yield (
            f"pcgrad BT={block} warps={options['num_warps']}",
            solve._pcgrad_kernel,
            {"G": "*fp64", "orders": "*i64", "out": "*fp64", "T": "i32", "stride_g0": "i32", "stride_g1": "i32",
             "stride_o0": "i32", "stride_o1": "i32", "BT": "constexpr"},  # fmt: skip
            {"BT": block},
            options,
        )


# Integer arguments Triton specialises on divisibility by 16 (the rest are do_not_specialize).
_ALIGNED_INTS = {"stride_t", "cols_per_split"}


def compile_report(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any], arch: int) -> dict[str, Any]:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(names)
        if signature[name].startswith("*") or name in _ALIGNED_INTS
    }
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
        "shared_bytes": kernel.metadata.shared,
        "cubin_sha256": hashlib.sha256(kernel.asm["cubin"]).hexdigest()[:16],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90: sm_90)")
    parser.add_argument("--out", type=Path, default=None, help="also append one JSON line per kernel here")
    parser.add_argument("--match", default="", help="only kernels whose label contains this")
    args = parser.parse_args(argv)
    import triton

    rows = []
    seen: dict[tuple[str, str], str] = {}
    for label, fn, signature, constexprs, options in _kernel_builds():
        if args.match not in label:
            continue
        try:
            row = {"kernel": label, **compile_report(fn, signature, constexprs, options, args.arch)}
        except Exception as error:  # noqa: BLE001 — a config that does not compile is a finding, not a crash
            row = {"kernel": label, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        family = label.split(" warps=")[0].split(" BLOCK_P=")[0]
        digest = row.get("cubin_sha256")
        if digest is not None:
            row["same_binary_as"] = seen.get((family, digest))
            seen.setdefault((family, digest), label)
        row.update(arch=f"sm_{args.arch}", triton=triton.__version__)
        rows.append(row)
        spill = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}" if "error" not in row else "—"
        print(
            f"{label:52s} " + (row["error"] if "error" in row else
            f"regs {row['registers']:>3}  spill st/ld {spill:>9} B  shared {row['shared_bytes']:>6} B"
            + (f"  = {row['same_binary_as']}" if row["same_binary_as"] else "")),
            flush=True,
        )  # fmt: skip
    if args.out is not None:
        with args.out.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
