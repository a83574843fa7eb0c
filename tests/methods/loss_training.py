"""Twenty SGD steps of a small model through a loss-weighting wrapper, and the same steps driven by a
hand-written reference of the method's paper: what ``tests/methods/test_<loss method>.py`` share.

The reference is plain torch: each step it forms the paper's objective of the ``(T,)`` loss vector
itself (its own state carried in Python), takes ``torch.autograd.grad`` of it and applies
``p ← p − lr·g``, which is what ``torch.optim.SGD`` without momentum does. It also returns the
weights ``w_t`` of ``Σ_t w_t ∇L_t`` derived by hand, to compare with the wrapper's ``last_weights``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

T = 3
STEPS = 20
LR = 0.05
# Parameters after 20 steps and effective weights, ours against the reference: both run the model in
# float32, the same operations up to the order of a few float32 roundings per step.
RTOL = 1e-6
ATOL = 1e-7

Objective = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


class Net(nn.Module):
    def __init__(self, tasks: int = T) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Positive losses on different scales (task t's is multiplied by 1 + 2t)."""
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() * (1 + 2 * t) for t, head in enumerate(self.heads)]


def batch(step: int, tasks: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=gen), torch.randn(16, tasks, generator=gen)


def train_wrapper(
    make: Callable[[torch.optim.Optimizer], torch.optim.Optimizer], *, steps: int = STEPS, tasks: int = T, lr: float = LR
):
    """``(parameters after the steps, the wrapper's last_weights at each step, the wrapper)``."""
    model = Net(tasks)
    opt = make(torch.optim.SGD(model.parameters(), lr=lr))
    weights = []
    for step in range(steps):
        opt.zero_grad()
        opt.backward(model.losses(*batch(step, tasks)))
        weights.append(opt.last_weights.clone())
        opt.step()
    return [p.detach().clone() for p in model.parameters()], weights, opt


def train_reference(
    objective: Objective, *, extra: Sequence[torch.Tensor] = (), steps: int = STEPS, tasks: int = T, lr: float = LR
):
    """``(parameters after the steps, the hand-derived weights at each step)``; ``extra`` are the
    method's own learnable tensors, trained by the same SGD."""
    model = Net(tasks)
    params = [*model.parameters(), *extra]
    weights = []
    for step in range(steps):
        losses = torch.stack(model.losses(*batch(step, tasks)))
        value, w = objective(losses, step)
        grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
        weights.append(w.detach().to(torch.float64))
    return [p.detach().clone() for p in model.parameters()], weights


def assert_same_training(ours, reference) -> None:
    """Same parameters after the steps and the same effective weights at every step."""
    params, weights, _ = ours
    ref_params, ref_weights = reference
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
    for step, (w, v) in enumerate(zip(weights, ref_weights)):
        torch.testing.assert_close(w, v, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")
