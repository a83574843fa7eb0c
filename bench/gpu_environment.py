"""What ``bench/gpu_check.sh`` runs against, checked before anything else: Python, torch, CUDA, the
device, Triton (and the Triton APIs ``kernels/`` uses), the optional peers, and that ``gradsurgery``
and ``gradsurgery.kernels`` are imported from the staged copy the check built, not from a checkout or
an install elsewhere.

    python -m bench.gpu_environment --stage DIR [--json FILE] [--require-cuda]

Prints one ``key: value`` line per fact (the summary quotes them) and exits 1 when the package would not
come from ``DIR``, a Triton API the kernels use is missing, or ``--require-cuda`` finds no device.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

# Optional peers of the step benchmarks: import name → distribution name.
PEERS = {"torchjd": "torchjd", "pytorch_optimizer": "pytorch-optimizer"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_facts() -> dict[str, Any]:
    """Triton's version and whether every API ``kernels/`` relies on exists in it (no kernel is built)."""
    try:
        import triton
        import triton.language as tl
    except Exception as error:  # noqa: BLE001 — a broken install raises more than ImportError
        return {"triton": None, "triton_error": f"{type(error).__name__}: {error}"}
    missing = []
    try:
        from triton import knobs

        knobs.runtime.interpret  # noqa: B018 — the attribute the kernel modules read at import
    except Exception:  # noqa: BLE001
        missing.append("triton.knobs.runtime.interpret")
    if not hasattr(getattr(tl, "standard", None), "_sum_combine"):
        missing.append("triton.language.standard._sum_combine (solves fall back to a slower reduce)")
    for name in ("autotune", "jit", "Config", "cdiv"):
        if not hasattr(triton, name):
            missing.append(f"triton.{name}")
    if not hasattr(getattr(triton, "runtime", None), "Autotuner"):
        missing.append("triton.runtime.Autotuner")
    return {"triton": triton.__version__, "triton_missing_apis": missing}


def facts(stage: Path) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            device_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            device_memory_gib=round(props.total_memory / 2**30, 1),
        )
    info.update(_triton_facts())
    import gradsurgery
    import gradsurgery.kernels

    package = Path(gradsurgery.__file__).resolve()
    kernels = Path(gradsurgery.kernels.__file__).resolve()
    stage = stage.resolve()
    info.update(
        gradsurgery_from=str(package.parent),
        gradsurgery_kernels_from=str(kernels.parent),
        gradsurgery_staged=package.is_relative_to(stage) and kernels.is_relative_to(stage),
    )
    for module, distribution in PEERS.items():
        info[f"peer_{module}"] = _version(distribution)
    for plugin in ("pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "hypothesis", "scipy"):
        info[f"have_{plugin.replace('-', '_')}"] = _version(plugin)
    return info


def problems(info: dict[str, Any], *, require_cuda: bool) -> list[str]:
    found = []
    if not info["gradsurgery_staged"]:
        found.append(
            f"gradsurgery comes from {info['gradsurgery_from']} (kernels: {info['gradsurgery_kernels_from']}), "
            "not from the staged copy"
        )
    if info.get("triton") is None:
        found.append(f"Triton does not import: {info.get('triton_error')}")
    elif info["triton_missing_apis"]:
        found.append(f"Triton {info['triton']} lacks {', '.join(info['triton_missing_apis'])}")
    if require_cuda and not info["cuda_available"]:
        found.append("no CUDA device visible to torch")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=Path, required=True, help="the staged copy gradsurgery must come from")
    parser.add_argument("--json", type=Path, default=None, help="also write the facts here")
    parser.add_argument("--require-cuda", action="store_true", help="fail without a CUDA device")
    args = parser.parse_args(argv)
    info = facts(args.stage)
    for key, value in info.items():
        print(f"{key}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    found = problems(info, require_cuda=args.require_cuda)
    for problem in found:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
