"""A shared MLP with three regression heads on generated data, trained with every wrapper.

Runs on the CPU in a few seconds: ``python examples/train_multitask.py [--steps 200] [--threads 1]``.

One intra-op thread by default, as the benchmarks and the study run: the model is tiny, so more
threads only spin against each other (and against anything else on a shared machine: 1m56s with
torch's default thread count on a loaded 2-core machine, 7 s with one thread).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradsurgery as gs


def make_data(tasks: int = 3, samples: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and one target per task; tasks 0 and 1 pull the shared features in opposite directions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=gen)
    directions = torch.randn(tasks, 16, generator=gen)
    directions[1] = -directions[0] + 0.3 * directions[1]
    y = torch.tanh(x @ directions.T) + 0.05 * torch.randn(samples, tasks, generator=gen)
    return x, y


class Model(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def train(make_optimizer, *, steps: int = 200, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    x, y = make_data()
    model = Model(tasks=y.shape[1])
    opt = make_optimizer(torch.optim.Adam(model.parameters(), lr=3e-3))
    for _ in range(steps):
        _, outputs = model(x)
        losses = [nn.functional.mse_loss(out, y[:, t]) for t, out in enumerate(outputs)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
    with torch.no_grad():
        _, outputs = model(x)
        return [nn.functional.mse_loss(out, y[:, t]).item() for t, out in enumerate(outputs)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the model is tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wrappers = {
        "Sum": gs.Sum,
        "Mean": gs.Mean,
        "PCGrad": lambda opt: gs.PCGrad(opt, seed=0),
        "CAGrad": lambda opt: gs.CAGrad(opt, c=0.4),
        "MGDA": gs.MGDA,
    }
    for name, make in wrappers.items():
        losses = train(make, steps=args.steps)
        print(f"{name:>7}: final per-task MSE " + "  ".join(f"{value:.4f}" for value in losses))
