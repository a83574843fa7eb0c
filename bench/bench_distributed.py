"""Distributed training step on gloo: bytes communicated per step for each ``sync`` mode vs plain DDP,
and the wall time of a step with 1, 2 and 3 processes on this machine.

Model: a shared MLP trunk ``64 → 512 → 512`` (ReLU) read by ``T = 4`` ``Linear(512, 1)`` heads, batch 64
per rank, per-task MSE losses, SGD. Variants, on identical models and per-rank batches:

- ``ddp``: ``DistributedDataParallel(model)``, ``sum(losses).backward()``, step — the baseline;
- ``exact``, ``local``, ``sharded``: ``gs.PCGrad(..., sync=mode)`` (gloo: ``sharded`` falls back to an
  all-reduce of the buffer, as the library warns);
- ``sharded-native``: ``sharded`` with the reduce-scatter forced on gloo — gloo emulates it with a full
  all-reduce, so its *time* says nothing about NCCL, but its *bytes*, counted at the library's API under
  the ring model, are what NCCL would send.

Bytes are counted, not timed: the wrappers count every collective they issue
(:class:`gradsurgery.distributed.CommStats`), DDP's through a communication hook that counts each bucket
before all-reducing it. ``sent`` is per rank under the ring model (``2(N−1)/N·n`` per all-reduce,
``(N−1)/N·n`` per reduce-scatter or all-gather), ``payload`` the tensor sizes handed to the
collectives. With one process the wrappers issue no collective at all.

Times: every rank runs the variants interleaved (one step of each per round, order rotated), with a
barrier before each timed step; a round's time is the slowest rank's; medians over the rounds. One
thread per process. On a shared 2-core machine 3 processes are oversubscribed: read the 3-process
times as such.

    python -m bench.bench_distributed            # ~2 minutes
    python -m bench.bench_distributed --quick    # a smoke run

Rows (one per process count) are appended to ``bench/results/distributed.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch import nn

import gradsurgery as gs

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.jsonl"
VARIANTS = ("ddp", "exact", "local", "sharded", "sharded-native")
TASKS, WIDTH, INPUTS, BATCH = 4, 512, 64, 64


class MultiTaskMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(INPUTS, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [nn.functional.mse_loss(head(z).squeeze(-1), y[:, t]) for t, head in enumerate(self.heads)]


def _counting_hook(stats, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's default all-reduce hook, counting each bucket's bytes into ``stats`` first."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    stats.add("all_reduce", buffer.numel() * buffer.element_size(), dist.get_world_size())
    return default_hooks.allreduce_hook(None, bucket)


def _model() -> MultiTaskMLP:
    torch.manual_seed(0)
    return MultiTaskMLP()


def _variant(kind: str, world: int):
    """(step function, stats object or None) for one variant on this rank."""
    model = _model()
    if kind == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        counted = gs.distributed.CommStats()
        ddp.register_comm_hook(counted, _counting_hook)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            sum(ddp(x, y)).backward()
            opt.step()

        return step, counted
    sync = "sharded" if kind == "sharded-native" else kind
    wrapper = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=1e-4), seed=0, sync=sync)
    if kind == "sharded-native" and wrapper._dist is not None:
        wrapper._dist.native_reduce_scatter = True

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        wrapper.zero_grad()
        wrapper.backward(model(x, y))
        wrapper.step()

    return step, (wrapper._dist.stats if wrapper._dist is not None else None)


def worker(rank: int, world: int, store: str, out: str, warmup: int, rounds: int) -> None:
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message='sync="sharded"')
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, INPUTS, generator=gen), torch.randn(BATCH, TASKS, generator=gen)
    variants = {kind: _variant(kind, world) for kind in VARIANTS}
    for kind, (step, stats) in variants.items():  # warm up, then count one step's traffic
        for _ in range(warmup):
            step(x, y)
        if stats is not None:
            stats.reset()
        step(x, y)
    traffic = {kind: (stats.summary() if stats is not None else None) for kind, (_, stats) in variants.items()}
    times: dict[str, list[float]] = {kind: [] for kind in VARIANTS}
    for r in range(rounds):
        shift = r % len(VARIANTS)
        for kind in VARIANTS[shift:] + VARIANTS[:shift]:
            dist.barrier()
            start = time.perf_counter()
            variants[kind][0](x, y)
            times[kind].append(time.perf_counter() - start)
    slowest = torch.tensor([times[kind] for kind in VARIANTS], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        rows = dict(zip(VARIANTS, slowest.tolist()))
        Path(out).write_text(json.dumps({"traffic": traffic, "times": rows}))
    del variants  # DDP must be gone before its process group: torch's teardown can abort otherwise
    gc.collect()
    dist.destroy_process_group()


def run(world: int, warmup: int, rounds: int, deadline_s: float) -> dict:
    root = Path(__file__).resolve().parent.parent
    loopback = "lo0" if sys.platform == "darwin" else "lo"  # gloo binds to the loopback interface only
    env = {**os.environ, "GLOO_SOCKET_IFNAME": loopback, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.bench_distributed", "--worker", str(rank), str(world),
                 str(Path(folder) / "store"), str(out), str(warmup), str(rounds)],
                cwd=root,
                env=env,
            )
            for rank in range(world)
        ]
        started = time.monotonic()
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline_s - (time.monotonic() - started)))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{world} processes: a rank failed or passed the {deadline_s} s deadline")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        rank, world, store, out, warmup, rounds = argv[1:]
        worker(int(rank), int(world), store, out, int(warmup), int(rounds))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (few rounds, not recorded)")
    parser.add_argument("--worlds", default="1,2,3", help="process counts (default: 1,2,3)")
    args = parser.parse_args(argv)
    warmup, rounds = (1, 3) if args.quick else (3, 15)
    from bench import harness

    model = _model()
    shared = sum(p.numel() for p in model.trunk.parameters())
    total = sum(p.numel() for p in model.parameters())
    table = []
    for world in (int(w) for w in args.worlds.split(",")):
        result = run(world, warmup, rounds, deadline_s=600)
        base = statistics.median(result["times"]["ddp"])
        variants = {}
        for kind in VARIANTS:
            samples = result["times"][kind]
            traffic = result["traffic"][kind] or {"sent_bytes_total": 0, "payload_bytes": {}, "calls": {}}
            median = statistics.median(samples)
            variants[kind] = {
                "sent_bytes_per_step": traffic["sent_bytes_total"],
                "payload_bytes_per_step": traffic["payload_bytes"],
                "calls_per_step": traffic["calls"],
                "median_s": median,
                "min_s": min(samples),
                "samples_s": [round(s, 6) for s in samples],
                "time_over_ddp": median / base,
            }
            table.append([world, kind, traffic["sent_bytes_total"], round(median * 1e3, 1), round(median / base, 2)])
        row = {
            "bench": "distributed",
            "backend": "gloo",
            "world": world,
            "T": TASKS,
            "P_shared": shared,
            "P_total": total,
            "batch_per_rank": BATCH,
            "method": "PCGrad",
            "rounds": rounds,
            "threads_per_process": 1,
            "variants": variants,
        }
        if not args.quick:
            harness.record(RESULTS, row)
    print(harness.format_table(["processes", "variant", "sent B/step/rank", "median ms", "÷ ddp"], table))


if __name__ == "__main__":
    main()
