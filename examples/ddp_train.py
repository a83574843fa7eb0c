"""Data-parallel joint training: a DDP-wrapped shared MLP with three heads, PCGrad over every rank.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py                 # exact (default)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --sync sharded
    python examples/ddp_train.py                                                   # one process

Each rank trains on its own slice of every global batch (equal sizes, mean losses),
so with ``sync="exact"`` the run is the single-process run on the global batch: the printed losses do
not depend on the number of processes (up to fp32 summation order). The gradients come from the
wrapper's own reduction — ``torch.autograd.grad`` does not fire DDP's reducer hooks — and DDP keeps its
other duties (the same initial parameters everywhere, buffer broadcasts). Rank 0 writes a checkpoint
at the end; every rank would load the same file to resume.

Runs on the CPU (gloo) in seconds; on GPUs, one per process, it uses NCCL. One intra-op thread
per process by default (``--threads``), as torchrun sets for several processes and the benchmarks
use: the model is tiny, and more threads per process only fight the other ranks for the cores.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import gradsurgery as gs
from train_multitask import make_data  # the same generated tasks as the single-process example


class Model(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [nn.functional.mse_loss(head(z).squeeze(-1), y[:, t]) for t, head in enumerate(self.heads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sync", default="exact", choices=["exact", "local", "sharded"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--checkpoint", default="ddp_train_checkpoint.pt")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device("cpu")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} processes")
    local_batch = args.global_batch // world

    torch.manual_seed(0)
    x, y = (t.to(device) for t in make_data(samples=1024))
    model = Model(tasks=y.shape[1]).to(device)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    # seed=None would work too: rank 0's drawn seed is shared at construction
    opt = gs.PCGrad(torch.optim.Adam(model.parameters(), lr=3e-3), seed=0, sync=args.sync)

    for step in range(args.steps):
        start = (step * args.global_batch) % len(x)
        rows = slice(start + rank * local_batch, start + (rank + 1) * local_batch)
        losses = net(x[rows], y[rows])
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        if rank == 0 and (step % 25 == 0 or step == args.steps - 1):
            with torch.no_grad():
                full = [loss.item() for loss in model(x, y)]
            print(f"step {step:3d}  per-task MSE on all data: " + "  ".join(f"{v:.4f}" for v in full), flush=True)

    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.checkpoint)
        print(f"{world} process(es), sync={args.sync!r}: checkpoint written to {args.checkpoint}")
    if distributed:
        # DDP must be gone before its process group: torch's teardown can otherwise abort the process
        # ("terminate called without an active exception", about 1 run in 4 with gloo here)
        del net, losses
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
