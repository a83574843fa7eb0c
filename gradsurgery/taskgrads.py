"""Per-task gradients of the optimizer's parameters, written into one ``(T, P)`` buffer.

The loop engine runs one ``torch.autograd.grad`` per task (the graph is kept until the last task) and
copies the shared parameters' gradients into that task's row with one multi-tensor copy; gradients of
parameters reached by a single task go straight to that parameter's ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class TaskGradients:
    """What one backward produced, before anything was written: per task, per parameter (or None)."""

    grads: list[list[torch.Tensor | None]]
    reached: list[list[bool]] = field(init=False)

    def __post_init__(self) -> None:
        self.reached = [[g is not None for g in row] for row in self.grads]

    def reach_count(self, index: int) -> int:
        return sum(row[index] for row in self.reached)


def task_gradients(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, retain_graph: bool = False
) -> TaskGradients:
    """``∂L_t/∂inputs`` for every task, ``None`` where a task does not reach an input."""
    grads: list[list[torch.Tensor | None]] = []
    last = len(losses) - 1
    for t, loss in enumerate(losses):
        row = torch.autograd.grad(loss, inputs, retain_graph=retain_graph or t < last, allow_unused=True)
        grads.append(list(row))
    return TaskGradients(grads)


class SharedBuffer:
    """The ``(T, P)`` task-gradient matrix of the shared parameters and the flat update it combines into.

    Columns are grouped by parameter dtype; each group has one flat update buffer whose views are the
    group's ``.grad`` tensors, so combining into it writes the gradients the inner optimizer reads
    without an unflatten copy. The matrix is stored in ``storage_dtype`` (default: the widest
    parameter dtype).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], num_tasks: int, *, storage_dtype: torch.dtype | None = None
    ) -> None:
        dtypes = list(dict.fromkeys(p.dtype for p in params))
        self.params = sorted(params, key=lambda p: dtypes.index(p.dtype))  # stable: groups in first-seen order
        device = self.params[0].device
        if storage_dtype is None:
            storage_dtype = dtypes[0]
            for dtype in dtypes[1:]:
                storage_dtype = torch.promote_types(storage_dtype, dtype)
        self.numel = sum(p.numel() for p in self.params)
        self.matrix = torch.zeros(num_tasks, self.numel, dtype=storage_dtype, device=device)
        self.groups: list[tuple[slice, torch.Tensor]] = []  # (column range, flat update) per dtype
        self.grad_views: list[torch.Tensor] = []
        self._columns: list[slice] = []
        start = 0
        for dtype in dtypes:
            members = [p for p in self.params if p.dtype == dtype]
            group_numel = sum(p.numel() for p in members)
            update = torch.zeros(group_numel, dtype=dtype, device=device)
            self.groups.append((slice(start, start + group_numel), update))
            offset = 0
            for p in members:
                self._columns.append(slice(start + offset, start + offset + p.numel()))
                self.grad_views.append(update[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            start += group_numel
        self.row_views = [
            [self.matrix[t, cols].view_as(p) for p, cols in zip(self.params, self._columns)] for t in range(num_tasks)
        ]

    @property
    def num_tasks(self) -> int:
        return self.matrix.shape[0]

    def write(self, task: int, grads: dict[int, torch.Tensor], *, accumulate: bool) -> None:
        """Row ``task`` ← (or +=) the given gradients, keyed by id(parameter); a missing one counts as zero."""
        views = self.row_views[task]
        present = [(v, grads[id(p)]) for v, p in zip(views, self.params) if id(p) in grads]
        if not accumulate:
            absent = [v for v, p in zip(views, self.params) if id(p) not in grads]
            if absent:
                torch._foreach_zero_(absent)
        if present:
            targets, sources = (list(x) for x in zip(*present))
            if accumulate:
                torch._foreach_add_(targets, [s.to(self.matrix.dtype) for s in sources])
            else:
                torch._foreach_copy_(targets, sources)

    def attach_grads(self) -> None:
        """Make every shared parameter's ``.grad`` its view of the update (again, after ``set_to_none``)."""
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:
                p.grad = view
