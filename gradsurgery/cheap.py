"""Cheap modes: fewer than ``T`` backward passes per step for every Gram-space method.

``every=k``
    The weights are computed by a full step (``T`` backward passes, the Gram matrix, the method) once
    every ``k`` steps (a step: the ``backward`` calls between two clearings of the gradients); on the
    ``k − 1`` steps between, one backward of ``Σ_t w_t L_t`` with the last weights (Nash-MTL's
    ``update_weights_every``, PSMGD). Exact: on those steps the shared parameters receive
    ``Σ_t w_t ∇L_t`` — the method's update for those weights, not for the weights the current
    gradients would give (the approximation) — and each task-specific parameter (a head) its plain
    gradient, the weighted backward's divided by its task's weight. A task whose weight is exactly 0
    gets a weight of ``2⁻²⁴·max|w|`` in that backward so that its head's gradient can be recovered:
    a relative change of the shared update below fp32 rounding. Which parameters are shared is the
    refresh step's.

``tasks_per_step=k``
    Each step draws ``k − 1`` tasks uniformly without replacement (a CPU ``torch.Generator`` seeded
    from torch's global generator when the wrapper is built: ``torch.manual_seed`` before it makes the
    draws reproducible; its state is in ``state_dict``) and makes the other ``m = T − k + 1`` one
    pseudo-task: ``k`` backward passes (CAGrad's official ``cagrad_fastk``, SDMGrad-OS). The weights
    come from the Gram matrix of the drawn gradients and the *mean* of the others (and their mean
    loss, for a method that reads the values); the update gives each of the others the pseudo-task's
    weight on its own gradient, so uniform weights are ``Sum``'s update and the heads of the others
    get their plain gradient, as does a parameter that only the others reach (on that step it is the
    pseudo-task's alone). ``k = T`` is the full method. Losses given as one tensor are refused: which
    head is whose cannot be told apart from step to step (pass ``shared=``).

Both count steps, not calls: the ``backward`` calls of an accumulation are one step, in parameter and
representation mode alike. Between refreshes, a parameter outside the surgery that several tasks
reach (outside an explicit ``shared=``) gets its plain gradient from a second backward restricted to
it; in representation mode, a path from a loss to the encoder around the features is weighted with
the rest (only the refresh steps give it its plain gradient). With ``nonfinite="propagate"`` a refresh
whose weights are not finite (an overflow the GradScaler skips) is refreshed again on the next step:
one host read per refresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ZERO_WEIGHT_STANDIN = 2.0**-24


def check_every(every: object) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")


def check_tasks_per_step(tasks_per_step: object) -> None:
    if tasks_per_step is not None and (
        not isinstance(tasks_per_step, int) or isinstance(tasks_per_step, bool) or tasks_per_step < 1
    ):
        raise ValueError(f"tasks_per_step must be a positive integer or None, got {tasks_per_step!r}")


@dataclass
class Draw:
    """One step's tasks: ``chosen`` become the first ``k − 1`` slots, ``rest`` the last one."""

    chosen: list[int]
    rest: list[int]

    @property
    def slots(self) -> list[list[int]]:
        return [[t] for t in self.chosen] + [self.rest]


@dataclass
class Cheap:
    """The cheap modes' state: the phase of ``every``, the last full step's weights (``T``, reduction
    applied) and the owner task of each task-specific parameter, and the task-drawing generator."""

    every: int = 1
    tasks_per_step: int | None = None
    steps: int = 0  # steps (accumulations) started since the first backward
    refreshing: bool = True  # the current step computes the weights
    weights: torch.Tensor | None = None
    owners: dict[int, int] = field(default_factory=dict)  # id(parameter) → its task
    plain: set[int] = field(default_factory=set)  # id of each parameter outside the surgery several tasks reach
    generator: torch.Generator | None = None
    draw: Draw | None = None  # tasks_per_step: the current step's tasks

    def start_step(self, num_tasks: int) -> None:
        """A new step: refresh on every ``every``-th, and whenever no weights for ``T`` tasks exist."""
        stale = self.weights is None or self.weights.shape[0] != num_tasks
        self.refreshing = stale or self.steps % self.every == 0
        if stale:
            self.steps = 0
        self.steps += 1


def draw(num_tasks: int, tasks_per_step: int, generator: torch.Generator) -> Draw | None:
    """``k − 1`` tasks and the rest (``None`` when ``k ≥ T``: every task is its own slot)."""
    if tasks_per_step >= num_tasks:
        return None
    order = torch.randperm(num_tasks, generator=generator).tolist()  # a CPU generator: no device sync
    chosen = sorted(order[: tasks_per_step - 1])
    return Draw(chosen, sorted(order[tasks_per_step - 1 :]))


def pseudo_losses(losses: list[torch.Tensor], drawn: Draw) -> list[torch.Tensor]:
    """The drawn tasks' losses, then the sum of the others' (its heads get their plain gradient)."""
    rest = losses[drawn.rest[0]]
    for t in drawn.rest[1:]:
        rest = rest + losses[t]
    return [losses[t] for t in drawn.chosen] + [rest]


def mean_rows(G: torch.Tensor, drawn: Draw) -> torch.Tensor:
    """The Gram matrix with the last row and column (the sum of the others' gradients) divided by
    their number: the Gram matrix of their mean, which is what chooses the weights."""
    scale = torch.ones(G.shape[-1], dtype=G.dtype, device=G.device)
    scale[-1:].fill_(1.0 / len(drawn.rest))
    return G * scale[:, None] * scale[None, :]


def mean_last(values: torch.Tensor | None, drawn: Draw) -> torch.Tensor | None:
    """The loss values with the last (the others' sum) divided by their number: the mean loss, beside
    :func:`mean_rows`' mean gradient, for the methods that read the values."""
    if values is None:
        return None
    out = values.clone()
    out[-1:].div_(len(drawn.rest))
    return out


def expand(weights: torch.Tensor, drawn: Draw, num_tasks: int) -> torch.Tensor:
    """Slot weights → per-task weights: each of the others carries the pseudo-task's weight."""
    out = torch.empty(num_tasks, dtype=weights.dtype, device=weights.device)
    index = torch.zeros(num_tasks, dtype=torch.int64, device=weights.device)
    for slot, tasks in enumerate(drawn.slots):
        for t in tasks:
            index[t : t + 1].fill_(slot)
    return out.copy_(weights.index_select(0, index))


def backward_weights(weights: torch.Tensor) -> torch.Tensor:
    """The weights of the one backward between refreshes: exact zeros raised to a tiny stand-in (see
    the module docstring)."""
    standin = weights.abs().amax() * ZERO_WEIGHT_STANDIN
    return torch.where(weights == 0, standin, weights)
