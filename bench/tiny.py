"""The tiny problem: the per-step overhead of each wrapper where the backward passes cost almost nothing.

``x ∈ R²``, ``L1 = (x·a)²``, ``L2 = sin(x·b)`` with conflicting gradients, SGD with ``lr = 0`` (the
problem, and so the branch each method takes, stays the same on every step). Variants: ``naive``,
``floor`` (the two backward passes and nothing else), our wrapper of every registered method
(``gs-{name}``, its defaults and the benchmarks' options, ``bench.methods``) and ``gs-pcgrad-loop``
(``engine="loop"``), TorchJD for the original three (``autojac.backward`` + ``jac_to_grad``: there is
no head), pytorch-optimizer's PCGrad, and ``minimal-pcgrad``: the same PCGrad step written by hand with
no library, the lower bound of the design on the machine. ``bench.bench_suite`` times ``TINY_KINDS``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bench.methods import ORIGINAL, make_wrapper, names
from bench.peers import torchjd_aggregator

TINY_KINDS = (
    "naive",
    "floor",
    "gs-pcgrad-loop",
    *(f"gs-{name}" for name in names()),
    *(f"torchjd-{name}" for name in ORIGINAL),
    "pyo-pcgrad",
    "minimal-pcgrad",
)


def make_tiny_step(kind: str) -> Callable[[], None]:
    """``x ∈ R²``, ``L1 = (x·a)²``, ``L2 = sin(x·b)``; at the start ``∇L1·∇L2 < 0`` (a conflict). ``lr = 0``
    keeps the problem, and so the branch each method takes, the same on every step."""
    x = nn.Parameter(torch.tensor([0.3, -0.7]))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.5, -0.5])
    opt = torch.optim.SGD([x], lr=0.0)

    def losses() -> list[torch.Tensor]:
        return [(x @ a) ** 2, torch.sin(x @ b)]

    if kind == "naive":

        def step() -> None:
            opt.zero_grad()
            sum(losses()).backward()
            opt.step()

    elif kind == "floor":

        def step() -> None:
            l1, l2 = losses()
            torch.autograd.grad(l1, [x], retain_graph=True)
            torch.autograd.grad(l2, [x])

    elif kind == "minimal-pcgrad":
        # The least a Gram-space PCGrad step does here, written by hand with nothing to orchestrate:
        # the two gradients copied into the rows of J, the Gram matrix, the non-finite check (one read
        # back), the closed-form weights, the combine into .grad, the inner step. A lower bound for any
        # wrapper of this design on this machine.
        J, flat = torch.zeros(2, 2), torch.zeros(2)
        rows = list(J)

        def step() -> None:
            opt.zero_grad()
            l1, l2 = losses()
            torch._foreach_copy_(rows[:1], list(torch.autograd.grad(l1, [x], retain_graph=True)))
            torch._foreach_copy_(rows[1:], list(torch.autograd.grad(l2, [x])))
            G = J @ J.mT
            diagonal = G.diagonal()
            if not bool(diagonal.clamp(1e-30, 1e37).eq(diagonal).all()):
                raise FloatingPointError("non-finite gradient")
            G = G.double()
            squared_norms = G.diagonal()
            removed = (G[0, 1] + G[1, 0]).clamp(max=0) / (2 * squared_norms)
            torch.mv(J.mT, (1.0 - torch.where(squared_norms > 0, removed, 0.0)).float(), out=flat)
            x.grad = flat
            opt.step()

    elif kind.startswith("gs-"):
        name, loop = kind[3:].removesuffix("-loop"), kind.endswith("-loop")
        wrapper = make_wrapper(name, opt, num_tasks=2, **({"engine": "loop"} if loop else {}))

        def step() -> None:
            wrapper.zero_grad()
            wrapper.backward(losses())
            wrapper.step()

        step.wrapper = wrapper  # type: ignore[attr-defined]

    elif kind.startswith("torchjd-"):
        from torchjd.autojac import backward, jac_to_grad

        aggregator = torchjd_aggregator(kind.split("-", 1)[1], 2)

        def step() -> None:
            opt.zero_grad()
            backward(losses())
            jac_to_grad([x], aggregator)
            opt.step()

    elif kind == "pyo-pcgrad":
        from pytorch_optimizer import PCGrad

        wrapper = PCGrad(opt, reduction="sum")

        def step() -> None:
            wrapper.zero_grad()
            wrapper.pc_backward(losses())
            wrapper.step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return step
