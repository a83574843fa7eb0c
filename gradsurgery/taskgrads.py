"""Per-task gradients of the optimizer's parameters, written into one ``(T, P)`` buffer.

Two engines compute them: a loop of one ``torch.autograd.grad`` per task (the graph is kept until the
last task), or one vmapped backward for all tasks. The shared parameters' gradients are copied into
each task's row of the buffer with one multi-tensor copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .grads import dense, grad_strides
from .hints import ENGINES
from .kernels.blocks import BlockLayout



@dataclass
class TaskGradients:
    """What one backward produced, before anything was written: per task, per input (or ``None``)."""

    grads: list[list[torch.Tensor | None]]
    reached: list[list[bool]]
    engine: str  # the engine that ran: "loop" or "batched"


class BatchingUnsupportedError(RuntimeError):
    """The graph holds an operation that the batched (vmapped) backward cannot run."""


def task_gradients(
    losses: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    engine: str = "loop",
    chunk_size: int | None = None,
    on_task: Callable[[int, list[torch.Tensor | None]], list[torch.Tensor | None]] | None = None,
    keep_graph: bool = False,
) -> TaskGradients:
    """``∂L_t/∂inputs`` for every task, ``None`` where a task does not reach an input.

    ``engine="loop"`` runs one backward per task. ``"batched"`` runs the ``T`` backward passes as one
    vmapped backward (``is_grads_batched``), ``chunk_size`` tasks at a time to bound memory; it raises
    :class:`BatchingUnsupportedError` for a graph vmap cannot batch. ``"auto"`` runs the loop on the
    CPU, where the batched backward measured 6–20% slower and 1.5× the memory (vmap's reshapes copy;
    ``bench/results/``), and tries ``"batched"`` on CUDA (fewer, larger kernels), keeping the graph
    alive to fall back to the loop if batching fails; a caller that saw it succeed can then ask for
    ``"batched"``, which frees the graph as it goes. A single task always runs the loop.

    ``on_task(t, row)`` receives each task's gradients as soon as they exist (the loop engine frees a
    task's gradients before the next backward if ``on_task`` consumed them) and returns what to keep;
    ``reached`` always describes the full row. ``keep_graph`` keeps the graph alive after the last
    task, for the caller to backpropagate through it again.

    A ``torch.compile``d graph whose backward was compiled for a single pass (donated buffers) cannot
    run ``T`` of them: that is refused with a ``ValueError`` before any gradient exists.
    """
    with _explained_compiled_backward():
        if engine == "auto" and len(losses) > 1 and prefers_batched(losses[0].device):
            try:
                result = _batched(losses, inputs, chunk_size, keep_graph=True)
            except BatchingUnsupportedError:
                return _loop(losses, inputs, on_task, keep_graph)
        elif engine == "batched":
            result = _batched(losses, inputs, chunk_size, keep_graph=keep_graph)
        else:
            return _loop(losses, inputs, on_task, keep_graph)
    if on_task is not None:
        result.grads = [on_task(t, row) for t, row in enumerate(result.grads)]
    return result


def prefers_batched(device: torch.device) -> bool:
    """Whether ``engine="auto"`` tries the batched backward on ``device``."""
    return device.type == "cuda"


@contextlib.contextmanager
def _explained_compiled_backward() -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:
        if "donated buffers" not in str(error):
            raise
        raise ValueError(
            "this torch.compile'd model's backward was compiled for a single backward pass (donated buffers: a "
            "plain loss.backward() ran through it first, or the model was recompiled for a new input shape, e.g. "
            "a smaller last batch), but gradsurgery runs one per task through the same graph. Set "
            "torch._functorch.config.donated_buffer = False before compiling, and keep input shapes static "
            "(drop_last=True, no dynamic=True: with dynamic shapes torch's compiled backward run twice through one "
            "graph gives wrong gradients). No gradient was written."
        ) from error


def _loop(
    losses: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    on_task: Callable[[int, list[torch.Tensor | None]], list[torch.Tensor | None]] | None = None,
    keep_graph: bool = False,
) -> TaskGradients:
    grads: list[list[torch.Tensor | None]] = []
    reached: list[list[bool]] = []
    last = len(losses) - 1
    for t, loss in enumerate(losses):
        row: list[torch.Tensor | None] = list(torch.autograd.grad(loss, inputs, retain_graph=keep_graph or t < last, allow_unused=True))
        reached.append([g is not None for g in row])
        grads.append(row if on_task is None else on_task(t, row))
    return TaskGradients(grads, reached, "loop")


def _batched(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], chunk_size: int | None, *, keep_graph: bool = False
) -> TaskGradients:
    T = len(losses)
    reached = reach(losses, inputs)
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    step = T if chunk_size is None else chunk_size
    eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
    grads: list[list[torch.Tensor | None]] = [[] for _ in range(T)]
    for start in range(0, T, step):
        stop = min(start + step, T)
        try:
            batch = torch.autograd.grad(
                stacked,
                inputs,
                grad_outputs=eye[start:stop],
                is_grads_batched=True,
                retain_graph=keep_graph or stop < T,
                allow_unused=True,
            )
        except RuntimeError as error:  # vmap raises RuntimeError for operations without a batching rule
            raise BatchingUnsupportedError(f"the batched backward cannot run this graph: {error}") from error
        for t in range(start, stop):
            grads[t] = [g[t - start] if g is not None and reached[t][i] else None for i, g in enumerate(batch)]
    return TaskGradients(grads, reached, "batched")


def reach(losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[list[bool]]:
    """``reach[t][i]``: whether loss ``t``'s autograd graph leads to ``inputs[i]`` (graph walk, no backward)."""
    memo: dict[int, frozenset[int]] = {}

    def leaves(node: torch.autograd.graph.Node | None) -> frozenset[int]:
        # iterative post-order walk with memoisation: each graph node is visited once for all tasks
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if current is None or id(current) in memo:
                continue
            children = [child for child, _ in current.next_functions if child is not None]
            if not expanded:
                stack.append((current, True))
                stack.extend((child, False) for child in children if id(child) not in memo)
                continue
            found: set[int] = set()
            variable = getattr(current, "variable", None)
            if variable is not None:
                found.add(id(variable))
            for child in children:
                found |= memo[id(child)]
            memo[id(current)] = frozenset(found)
        return memo.get(id(node), frozenset()) if node is not None else frozenset()

    input_ids = [id(x) for x in inputs]
    return [[i in leaves(loss.grad_fn) for i in input_ids] for loss in losses]


class SharedBuffer:
    """The ``(T, P)`` task-gradient matrix of the shared parameters and the flat update it combines into.

    Columns are grouped by parameter dtype; each group has one flat update buffer whose views are the
    group's ``.grad`` tensors, so combining into it writes the gradients the inner optimizer reads
    without an unflatten copy. Each parameter's columns are laid out in its own memory order (the
    strides ``loss.backward()`` would give its ``.grad``), in the rows of the matrix and in the
    update alike: the combine is elementwise over columns, and fused optimizers that read a
    parameter's and its gradient's raw memory side by side see matching layouts. The matrix is
    stored in ``storage_dtype`` (default: the widest parameter dtype).

    ``bases`` (per group, or ``None``) holds what the ``.grad`` tensors held before the current
    accumulation started, when anything: the update is then ``base + wᵀJ``.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], num_tasks: int, *, storage_dtype: torch.dtype | None = None
    ) -> None:
        dtypes = list(dict.fromkeys(p.dtype for p in params))
        self.params = sorted(params, key=lambda p: dtypes.index(p.dtype))  # stable: groups in first-seen order
        self.param_ids = frozenset(id(p) for p in self.params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        device = self.params[0].device
        if storage_dtype is None:
            storage_dtype = dtypes[0]
            for dtype in dtypes[1:]:
                storage_dtype = torch.promote_types(storage_dtype, dtype)
        self.numel = sum(p.numel() for p in self.params)
        self.matrix = torch.zeros(num_tasks, self.numel, dtype=storage_dtype, device=device)
        self.groups: list[tuple[slice, torch.Tensor]] = []  # (column range, flat update) per dtype
        self.grad_views: list[torch.Tensor] = []
        self.bases: list[torch.Tensor] | None = None
        self.blocks: BlockLayout | None = None  # granularity=: the blocks of columns (None: one block)
        self._columns: list[slice] = []
        self._members: list[list[int]] = []  # per group: indices into params
        self._strides = [grad_strides(p) for p in self.params]
        start = 0
        for dtype in dtypes:
            members = [p for p in self.params if p.dtype == dtype]
            group_numel = sum(p.numel() for p in members)
            update = torch.zeros(group_numel, dtype=dtype, device=device)
            self.groups.append((slice(start, start + group_numel), update))
            self._members.append(list(range(len(self.grad_views), len(self.grad_views) + len(members))))
            offset = 0
            for p in members:
                self._columns.append(slice(start + offset, start + offset + p.numel()))
                self.grad_views.append(update.as_strided(p.shape, self._strides[len(self.grad_views)], offset))
                offset += p.numel()
            start += group_numel
        self.row_views = [self._views(self.matrix[t]) for t in range(num_tasks)]

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's columns of the flat ``(P,)`` tensor, shaped and strided like its ``.grad``."""
        return [
            flat[cols].as_strided(p.shape, strides) for p, cols, strides in zip(self.params, self._columns, self._strides)
        ]

    @property
    def num_tasks(self) -> int:
        return self.matrix.shape[0]

    @property
    def columns(self) -> list[slice]:
        """Each parameter's columns of the matrix (in ``params`` order)."""
        return self._columns

    def write(self, task: int, grads: dict[int, torch.Tensor], *, accumulate: bool, zero_missing: bool = True) -> None:
        """Row ``task`` ← (or +=) the given gradients, keyed by id(parameter); a missing one counts as
        zero (``zero_missing=False``: its entries are left as they are)."""
        views = self.row_views[task]
        present = [(v, dense(grads[id(p)])) for v, p in zip(views, self.params) if id(p) in grads]
        if not accumulate and zero_missing:
            absent = [v for v, p in zip(views, self.params) if id(p) not in grads]
            if absent:
                torch._foreach_zero_(absent)
        if present:
            targets, sources = (list(x) for x in zip(*present))
            if accumulate:
                torch._foreach_add_(targets, [s.to(self.matrix.dtype) for s in sources])
            else:
                torch._foreach_copy_(targets, sources)

    def copy_rows_from(self, other: SharedBuffer) -> None:
        """Copy every row of the parameters both buffers hold (same number of tasks)."""
        for t in range(min(self.num_tasks, other.num_tasks)):
            pairs = [(view, other.row_views[t][other.index[id(p)]]) for view, p in zip(self.row_views[t], self.params) if id(p) in other.index]
            if pairs:
                torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])

    def capture_bases(self) -> None:
        """Remember the shared parameters' current ``.grad`` (``None`` counts as zero) as the term the
        next updates are added to; no base at all when every ``.grad`` is ``None``."""
        held = {i: p.grad for i, p in enumerate(self.params) if p.grad is not None}
        if not held:
            self.bases = None
            return
        if self.bases is None:
            self.bases = [torch.zeros_like(update) for _, update in self.groups]
        else:
            torch._foreach_zero_(self.bases)
        targets, sources = [], []
        for (columns, _), base, members in zip(self.groups, self.bases, self._members):
            for i in members:
                if i in held:
                    cols = self._columns[i]
                    part = base[cols.start - columns.start : cols.stop - columns.start]
                    targets.append(part.as_strided(self.params[i].shape, self._strides[i]))
                    sources.append(dense(held[i]))
        torch._foreach_copy_(targets, sources)

    def attach_grads(self, reached: frozenset[int] | None = None) -> None:
        """Make the shared parameters' ``.grad`` their view of the update (again, after ``set_to_none``);
        with ``reached``, only those parameters (by id): one that no task reached keeps its ``.grad``."""
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view and (reached is None or id(p) in reached):
                p.grad = view
