"""One training loop for every network of the study: joint (through a wrapper) or single-task."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.methods import Options

from .methods import joint_backward, make_optimizer

LossFn = Callable[[Sequence[torch.Tensor], torch.Tensor], list[torch.Tensor]]


class SharedBottom(nn.Module):
    """A shared encoder and one head per task; ``forward`` also returns the representation ``z``
    every head reads (what MGDA-UB's representation mode differentiates against)."""

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


@dataclass
class RunLog:
    step_seconds: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_steps: list[int] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        return 1e3 * statistics.median(self.step_seconds)


def _sync(device: torch.device) -> None:
    # Wall-clock step times are only honest once queued device work has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_stepper(
    net: SharedBottom, method: str | None, loss_fn: LossFn, *, lr: float, seed: int, options: Options | None = None
) -> tuple[Any, Callable[[torch.Tensor, torch.Tensor], None]]:
    """``(optimizer, step)``: Adam on ``net`` (through the wrapper of ``method``, or plain for
    ``method=None``) and one training step ``step(x, y)`` (zero_grad → forward → backward → step),
    the step the training loop runs and the interleaved step timing measures."""
    inner = torch.optim.Adam(net.parameters(), lr=lr)
    opt = inner if method is None else make_optimizer(method, inner, seed=seed, num_tasks=len(net.heads), options=options)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        z, outputs = net(x)
        losses = loss_fn(outputs, y)
        if method is None:
            torch.stack(losses).sum().backward()
        else:
            joint_backward(opt, method, losses, z)
        opt.step()

    return opt, step


def train(
    net: SharedBottom,
    method: str | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    options: Options | None = None,
    evaluate: Callable[[SharedBottom], dict[str, float]],
    log_every: int,
    tick: Callable[[int], None],
) -> RunLog:
    """Adam on minibatches of ``(inputs, targets)`` for ``epochs`` passes.

    ``method=None`` trains a single-task network with plain ``loss.backward()``; otherwise the joint
    losses go through the wrapper ``method`` (``"pcgrad@4"``: a cheap mode; ``options``: method options
    replacing the benchmarks'). ``evaluate`` runs after every epoch; the gradient diagnostics are read
    every ``log_every`` steps, outside the timed region. The step times recorded here are the run's
    own (not interleaved with other methods): the study's step-time ratios come from
    :mod:`bench.study.timing`.
    """
    device = inputs.device
    opt, train_step = make_stepper(net, method, loss_fn, lr=lr, seed=seed, options=options)
    order = torch.Generator().manual_seed(seed)
    log = RunLog()
    step = 0
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(inputs), generator=order).to(device)
        for begin in range(0, len(inputs), batch_size):
            batch = perm[begin : begin + batch_size]
            x, y = inputs[batch], targets[batch]
            _sync(device)
            began = time.perf_counter()
            train_step(x, y)
            _sync(device)
            log.step_seconds.append(time.perf_counter() - began)
            step += 1
            if method is not None and step % log_every == 0:
                log.history.append(opt.diagnostics())
                log.history_steps.append(step)
            tick(1)
        net.eval()
        with torch.no_grad():
            log.evals.append(evaluate(net))
    return log
