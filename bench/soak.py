"""Soak: many steps of a small model with each method and each engine; memory and step time must
stay flat.

    python -m bench.soak [--steps 10000] [--out bench/results/soak.jsonl]

For each (method, engine) it records RSS and the number of live tensors (gc) at the start and at
the end of the run, and the median step time of the first and the last tenth of the steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import gradsurgery as gs

METHODS = {
    "Sum": gs.Sum,
    "Mean": gs.Mean,
    "PCGrad": lambda o, **k: gs.PCGrad(o, seed=0, **k),
    "CAGrad": gs.CAGrad,
    "MGDA": gs.MGDA,
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no proxy __class__


def soak(name: str, engine: str, steps: int) -> dict:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(3))
    opt = METHODS[name](torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3), engine=engine)
    x, y = torch.randn(32, 16), torch.randn(32, 3)
    times: list[float] = []
    rss_start = tensors_start = 0.0
    for step in range(steps):
        if step == steps // 10:  # after warm-up: allocator pools and optimizer state exist
            rss_start, tensors_start = _rss_mib(), _live_tensors()
        start = time.perf_counter()
        z = trunk(x)
        losses = [((head(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(heads)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        times.append(time.perf_counter() - start)
    tenth = max(1, steps // 10)
    return {
        "method": name,
        "engine": engine,
        "steps": steps,
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_end": round(_rss_mib(), 1),
        "live_tensors_start": tensors_start,
        "live_tensors_end": _live_tensors(),
        "step_ms_first_tenth": round(1e3 * statistics.median(times[tenth : 2 * tenth]), 4),
        "step_ms_last_tenth": round(1e3 * statistics.median(times[-tenth:]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.jsonl"))
    args = parser.parse_args()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "git": revision}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in METHODS:
        for engine in ("loop", "batched"):
            row = {**header, **soak(name, engine, args.steps)}
            print(json.dumps(row))
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
