"""``python -m bench``: the joint-training study (toy, MultiDigits with 2 and 4 tasks, conflict sweep) into one
folder per configuration.

Every argument is checked before any training starts, so a typo costs a second, not a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
from pathlib import Path

from bench.study.methods import METHODS, parse_methods

DEFAULT_OUT = Path("bench_out/study")
OPTIONAL_DEPENDENCIES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Reproducible joint-training study of gradsurgery's methods: the CAGrad toy, MultiDigits "
        "(overlapping digits, one shared encoder, 2 and 4 tasks) and a conflict sweep. Writes results.json, "
        "results.md, results.tex and PNG figures into a subfolder of --out named after the configuration "
        "(default, quick, default-sum+pcgrad, ...). The default run's measured time is in the README "
        "('The joint-training study'); each run records its own in results.json.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run, under a minute (what CI runs)")
    size.add_argument("--full", action="store_true", help="5 seeds, longer training, more angles, and --tradeoff")
    parser.add_argument(
        "--tradeoff", action="store_true",
        help="add the cheap-mode and loss-weighting comparison on MultiDigits with 4 tasks (PCGrad/CAGrad/MGDA "
        "with every=1 and 4, every loss-weighting method): Δm%% against step time, tradeoff.png",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma list of methods (default: {','.join(METHODS)}): any registered method by its function or "
        "wrapper name in any case (e.g. sum,pcgrad,nash_mtl,graddrop or NashMTL), or mgda-ub (MGDA in "
        "representation mode); the toy skips mean, mgda-ub and the loss-weighting methods that take logarithms, "
        "and runs the other loss-weighting methods through the wrapper start by start (minutes at 100,000 steps)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: 2 quick, 3, 5 full)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"base folder (default: {DEFAULT_OUT}); the results go to its subfolder named after the configuration, "
        "and a complete earlier run of the same configuration is moved to <subfolder>.previous",
    )
    parser.add_argument("--device", default="cpu", help="torch device for MultiDigits and the sweep (the toy always runs on CPU)")
    return parser


def _check_writable(out: Path) -> str | None:
    """Why ``out`` cannot hold the results, or ``None`` when it can (it is created if missing)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        return f"cannot write to output folder {str(out)!r}: {err.strerror or err}"
    return None


def _check_device(name: str) -> str | None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        return f"invalid --device {name!r}: {err}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name!r}: CUDA is not available on this machine"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name!r}: MPS is not available on this machine"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name!r}: use cpu, cuda, cuda:N or mps"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        parser.error(f"--methods: {err}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    missing = [pip for module, pip in OPTIONAL_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"the study needs {', '.join(missing)}: pip install {' '.join(missing)}")
    problem = _check_device(args.device) or _check_writable(args.out)
    if problem:
        parser.error(problem)

    from bench.study.config import make_config
    from bench.study.runner import run

    preset = "quick" if args.quick else "full" if args.full else "default"
    config = make_config(preset, methods=methods, seeds=args.seeds, out=args.out, device=args.device, tradeoff=args.tradeoff)
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    return run(config, command)


if __name__ == "__main__":
    sys.exit(main())
