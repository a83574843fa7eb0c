"""The speed suite's problems and the variants of one training step on them.

Two models, each with one head per task reading the shared encoder's output ``z``:

- ``mlp``: trunk ``256 → 1024 → 1024 → 1024`` (ReLU after each layer, 2.36M shared parameters), one
  ``Linear(1024, 1)`` head per task, batch 256, MSE losses;
- ``conv``: ``conv 3→32`` (3×3), ``conv 32→64`` (3×3, stride 2), ``conv 64→64`` (3×3, stride 2), ReLU after
  each, global average pool → 64 features (56k shared parameters), one ``Linear(64, 10)`` head per task
  with cross-entropy, ``3 × 32 × 32`` inputs, batch 128.

Variants of one step (forward included, SGD, each on its own copy of the same initial model):

- ``naive``: ``sum(losses).backward(); step``;
- ``floor``: ``T × torch.autograd.grad`` of all parameters and nothing else — what any method that
  needs the T task gradients pays at least; ``floor-batched``: the same T gradients from one vmapped
  backward (the floor of a batched engine); ``floor-tasks{k}``: ``k`` such backward passes, of ``k − 1``
  losses and the sum of the others (what ``tasks_per_step=k`` backpropagates): the floor of that mode;
- ``gs-{name}-{loop,batched}``: our wrapper of the registered method ``name`` (``bench.methods``) in
  parameter mode, ``engine="loop"`` / ``"batched"``; ``gs-{name}-repr``: representation mode,
  ``opt.backward(losses, features=z)``; ``gs-{name}-loop-bf16``: the loop with
  ``storage_dtype=torch.bfloat16``; ``gs-{name}`` for a loss-weighting method (one backward of its
  objective of the losses: no engine, no per-task gradients);
- ``torchjd-{name}``: TorchJD's autojac path, ``mtl_backward(losses, features=z)`` then
  ``jac_to_grad(encoder params, aggregator)``;
- ``autogram-{name}``: TorchJD's autogram engine, ``Engine(encoder, batch_dim=None)`` built once;
  ``G = engine.compute_gramian(stack(losses))``, ``w = weighting(G)``, ``stack(losses).backward(w)``. The
  losses are per task (means over the batch), so ``batch_dim=None`` (``batch_dim=0`` needs per-sample
  losses: instance-wise risk). The heads get ``w_t``-weighted gradients here, not their plain ones;
- ``pyo-pcgrad``: ``pytorch_optimizer.PCGrad(opt, reduction="sum").pc_backward(losses)``, step;
- ``torchjd-{name}`` of a loss-weighting method: TorchJD's scalarizer of it (``bench.peers``),
  ``scalarizer(stack(losses)).backward()``, step (and what its documented loop calls after the step:
  FAMO's ``update`` on a second forward pass, DWA's ``step``).

Options of our wrapper are suffixes after the engine, ``gs-{name}-loop-{option}``:

- ``bf16``: ``storage_dtype=torch.bfloat16``;
- ``every{k}``: ``every=k`` (a full step every ``k`` steps, one weighted backward between). Such a
  variant's :func:`make_step` closure is one step and carries ``period = k``: a timed sample is ``k``
  consecutive steps (:func:`period_sample`: one refresh and ``k − 1`` cheap steps, checked through
  ``opt.refreshed``), divided by ``k``;
- ``tps{k}``: ``tasks_per_step=k`` (``k − 1`` drawn tasks and the mean of the others: ``k`` backward
  passes; ``floor-tasks{k}`` is their floor);
- ``module``: ``granularity="module"`` with ``shared=`` the trunk (one block per layer);
  ``parameter``: ``granularity="parameter"`` (one block per shared parameter).

:data:`KINDS` are timed on every problem; :data:`EVERY_METHOD_KINDS` (every other registered gradient
method, loop engine), :data:`LOSS_KINDS` (every loss-weighting method) with their TorchJD scalarizers
(:data:`LOSS_PEER_KINDS`), the cheap modes (:func:`cheap_kinds`) and the granularities
(:data:`GRANULARITY_KINDS`) on the MLP at the ``T`` the speed issues name (``bench.bench_suite``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import torch
from torch import nn

from bench.methods import ORIGINAL, make_wrapper, names_of
from bench.methods import kind as method_kind
from bench.peers import torchjd_aggregator, torchjd_scalarizer, torchjd_scalarizer_peer, torchjd_weighting

LR = 1e-4
MODES = ("loop", "batched", "repr")
KINDS = (
    "naive",
    "floor",
    "floor-batched",
    *(f"gs-{m}-{mode}" for mode in MODES for m in ORIGINAL),
    "gs-pcgrad-loop-bf16",
    *(f"torchjd-{m}" for m in ORIGINAL),
    *(f"autogram-{m}" for m in ORIGINAL),
    "pyo-pcgrad",
)
# Every registered gradient method beyond the original three, in parameter mode with the loop engine
# (the default on the CPU): the same step as gs-pcgrad-loop with another method's weights.
EVERY_METHOD_KINDS = tuple(f"gs-{name}-loop" for name in names_of("gram", "elementwise") if name not in ORIGINAL)
# Every loss-weighting method: one backward of its objective, the cost of naive summation and a little.
LOSS_KINDS = tuple(f"gs-{name}" for name in names_of("loss"))
# TorchJD's scalarizer of each loss-weighting method it has (``bench.peers``).
LOSS_PEER_KINDS = tuple(f"torchjd-{name}" for name in names_of("loss") if torchjd_scalarizer_peer(name) is not None)
# Per-block surgery (granularity=) of the original three: one block per layer, one per parameter.
GRANULARITIES = ("module", "parameter")
GRANULARITY_KINDS = tuple(f"gs-{m}-loop-{g}" for g in GRANULARITIES for m in ORIGINAL)


def cheap_kinds(*, every: int | None = None, tasks_per_step: int | None = None) -> tuple[str, ...]:
    """The cheap modes of the original three (loop engine): ``every=k`` and ``tasks_per_step=k`` (with
    ``floor-tasks{k}``, the floor of the latter)."""
    suffixes = ([f"every{every}"] if every else []) + ([f"tps{tasks_per_step}"] if tasks_per_step else [])
    floor = (f"floor-tasks{tasks_per_step}",) if tasks_per_step else ()
    return (*floor, *(f"gs-{m}-loop-{suffix}" for suffix in suffixes for m in ORIGINAL))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One benchmark problem (picklable: the memory runs rebuild it in a fresh interpreter)."""

    model: str  # "mlp" or "conv"
    T: int
    batch: int
    width: int = 1024  # mlp only
    inputs: int = 256  # mlp only

    @property
    def label(self) -> str:
        return f"{self.model} T={self.T}"

    def describe(self) -> str:
        if self.model == "mlp":
            w = self.width
            return f"trunk {self.inputs}→{w}→{w}→{w} ReLU, one Linear({w}, 1) head per task, MSE, batch {self.batch}"
        return (
            "conv 3→32, 32→64 s2, 64→64 s2 (3×3, ReLU), avg pool → 64; one Linear(64, 10) head per task, CE, "
            f"batch {self.batch}, 3×32×32"
        )


class MultiTaskMLP(nn.Module):
    def __init__(self, num_tasks: int, *, width: int, inputs: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))


class MultiTaskConvNet(nn.Module):
    def __init__(self, num_tasks: int, *, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(64, classes) for _ in range(num_tasks))


def _new_model(spec: Spec) -> nn.Module:
    if spec.model == "mlp":
        return MultiTaskMLP(spec.T, width=spec.width, inputs=spec.inputs)
    return MultiTaskConvNet(spec.T)


@functools.cache
def _problem(spec: Spec) -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _new_model(spec)
    if spec.model == "mlp":
        x, y = torch.randn(spec.batch, spec.inputs), torch.randn(spec.T, spec.batch)
    else:
        x, y = torch.randn(spec.batch, 3, 32, 32), torch.randint(0, 10, (spec.T, spec.batch))
    return model.state_dict(), x, y


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A fresh model with the same initial weights, and the batch, for every variant."""
    state, x, y = _problem(spec)
    model = _new_model(spec)
    model.load_state_dict(copy.deepcopy(state))
    return model, x, y


def forward(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z = model.trunk(x)
    if spec.model == "mlp":
        return z, [nn.functional.mse_loss(head(z).squeeze(-1), y[t]) for t, head in enumerate(model.heads)]
    return z, [nn.functional.cross_entropy(head(z), y[t]) for t, head in enumerate(model.heads)]


def shared_numel(spec: Spec) -> int:
    return sum(p.numel() for p in _new_model(spec).trunk.parameters())


def method_of(kind: str) -> str:
    """The method name in ``gs-{name}-…``, ``torchjd-{name}``, ``autogram-{name}`` (names hold no ``-``)."""
    return kind.split("-")[1]


def wrapper_options(kind: str, model: nn.Module) -> dict[str, Any]:
    """The wrapper options of ``gs-{name}[-{mode}[-{option}...]]`` (the module docstring's suffixes)."""
    _, _name, *rest = kind.split("-")
    mode = rest.pop(0) if rest else None
    options: dict[str, Any] = {}
    if mode in ("loop", "batched"):
        options["engine"] = mode
    elif mode not in (None, "repr"):
        raise ValueError(f"unknown mode {mode!r} in variant {kind!r}")
    for option in rest:
        if option == "bf16":
            options["storage_dtype"] = torch.bfloat16
        elif option.startswith("every") and option[5:].isdigit():
            options["every"] = int(option[5:])
        elif option.startswith("tps") and option[3:].isdigit():
            options["tasks_per_step"] = int(option[3:])
        elif option == "module":
            options.update(granularity="module", shared=model.trunk)
        elif option == "parameter":
            options["granularity"] = "parameter"
        else:
            raise ValueError(f"unknown option {option!r} in variant {kind!r}")
    return options


def period_of(step: Callable[[], None]) -> int:
    """Steps per timed sample: ``k`` for an ``every=k`` variant (one refresh and ``k − 1`` cheap steps), else 1."""
    return getattr(step, "period", 1)


def period_sample(step: Callable[[], None]) -> Callable[[], None]:
    """One timed sample of ``step``: :func:`period_of` consecutive steps. For an ``every=k`` wrapper, raise
    unless exactly the first of them refreshed the weights (the sample is one whole period)."""
    period = period_of(step)
    if period == 1:
        return step
    wrapper = step.wrapper  # type: ignore[attr-defined]

    def sample() -> None:
        refreshed = []
        for _ in range(period):
            step()
            refreshed.append(wrapper.refreshed)
        if refreshed != [True] + [False] * (period - 1):
            raise RuntimeError(f"a sample of {period} steps is not one period: refreshed = {refreshed}")

    sample.wrapper = wrapper  # type: ignore[attr-defined]
    return sample


def make_step(spec: Spec, kind: str) -> Callable[[], None]:
    """One training step of variant ``kind`` on its own model (module-level: picklable for memory runs)."""
    model, x, y = build(spec)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    T = spec.T

    if kind == "naive":

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(spec, model, x, y)
            sum(losses).backward()
            opt.step()

    elif kind == "floor":

        def step() -> None:
            _, losses = forward(spec, model, x, y)
            for t, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=t < T - 1, allow_unused=True)

    elif kind == "floor-batched":
        eye = torch.eye(T)

        def step() -> None:
            _, losses = forward(spec, model, x, y)
            torch.autograd.grad(torch.stack(losses), params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)

    elif kind.startswith("floor-tasks"):
        k = int(kind.removeprefix("floor-tasks"))

        def step() -> None:
            _, losses = forward(spec, model, x, y)
            rest = losses[k - 1]
            for loss in losses[k:]:
                rest = rest + loss
            for t, loss in enumerate([*losses[: k - 1], rest]):
                torch.autograd.grad(loss, params, retain_graph=t < k - 1, allow_unused=True)

    elif kind.startswith("gs-"):
        options = wrapper_options(kind, model)
        wrapper = make_wrapper(method_of(kind), opt, num_tasks=T, **options)
        representation = kind.split("-")[2:3] == ["repr"]

        def step() -> None:
            wrapper.zero_grad()
            z, losses = forward(spec, model, x, y)
            wrapper.backward(losses, features=z if representation else None)
            wrapper.step()

        step.wrapper = wrapper  # type: ignore[attr-defined]
        step.period = options.get("every", 1)  # type: ignore[attr-defined]

    elif kind.startswith("torchjd-") and method_kind(method_of(kind)) == "loss":
        peer = torchjd_scalarizer_peer(method_of(kind))
        assert peer is not None, kind
        scalarizer = torchjd_scalarizer(method_of(kind), T)
        if peer.learnable:
            opt.add_param_group({"params": list(scalarizer.parameters())})

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(spec, model, x, y)
            scalarizer(torch.stack(losses)).backward()
            opt.step()
            if peer.update:  # FAMO's documented loop: the losses after the step, on the same batch
                with torch.no_grad():
                    _, after = forward(spec, model, x, y)
                scalarizer.update(torch.stack(after))
            if peer.epoch_step:
                scalarizer.step()

    elif kind.startswith("torchjd-"):
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = torchjd_aggregator(method_of(kind), T)
        shared = list(model.trunk.parameters())

        def step() -> None:
            opt.zero_grad()
            z, losses = forward(spec, model, x, y)
            mtl_backward(losses, features=z)
            jac_to_grad(shared, aggregator)
            opt.step()

    elif kind.startswith("autogram-"):
        from torchjd.autogram import Engine

        weighting = torchjd_weighting(method_of(kind), T)
        engine = Engine(model.trunk, batch_dim=None)  # once, before the forward passes it hooks

        def step() -> None:
            opt.zero_grad()
            _, losses = forward(spec, model, x, y)
            stacked = torch.stack(losses)
            gramian = engine.compute_gramian(stacked)
            stacked.backward(weighting(gramian))
            opt.step()

    elif kind == "pyo-pcgrad":
        from pytorch_optimizer import PCGrad

        wrapper = PCGrad(opt, reduction="sum")

        def step() -> None:
            wrapper.zero_grad()
            _, losses = forward(spec, model, x, y)
            wrapper.pc_backward(losses)
            wrapper.step()

    else:
        raise ValueError(f"unknown variant {kind!r}")
    return step
