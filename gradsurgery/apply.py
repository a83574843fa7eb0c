"""Writing what :mod:`gradsurgery.prepare` prepared, once every check has passed: the buffer's rows,
the task-specific ``.grad``, the accumulation's bookkeeping. Shared by the single-process path and
``torch.distributed``, which inserts its collectives between these steps."""

from __future__ import annotations

from typing import Sequence

import torch

from .grads import accumulate_plain
from .pipeline import PlainSpan, Target
from .prepare import Prepared, PreparedGradients
from .state import Accumulation, Layout
from .taskgrads import SharedBuffer


def open_writes(prepared: PreparedGradients, layout: Layout, accumulation: Accumulation, *, accumulate: bool) -> None:
    """The sharing is settled; a new accumulation starts on top of what the shared ``.grad`` hold."""
    layout.sharing = prepared.sharing
    if not accumulate:
        accumulation.start()
        if prepared.buffer is not None:
            prepared.buffer.capture_bases()


def add_rows(prepared: PreparedGradients) -> None:
    """Accumulating: the incoming rows are added to the buffer (they were checked first)."""
    buffer = prepared.buffer
    if buffer is not None:
        for t, rows in enumerate(prepared.shared_rows):
            buffer.write(t, rows, accumulate=True)


def write_fresh_rows(prepared: PreparedGradients) -> None:
    """Not accumulating: the rows that were not written while the gradients were computed."""
    buffer = prepared.buffer
    if buffer is None:
        return
    for t, rows in enumerate(prepared.shared_rows):
        if rows or not prepared.rows_written:
            buffer.write(t, rows, accumulate=False, zero_missing=not prepared.rows_written)


def write_specific(pairs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    accumulate_plain(pairs)


def targets(buffer: SharedBuffer) -> list[Target]:
    """Where the combine writes: each dtype group's flat update, on top of its base (if any)."""
    bases: Sequence[torch.Tensor | None] = buffer.bases or [None] * len(buffer.groups)
    return [Target(columns, update, base) for (columns, update), base in zip(buffer.groups, bases)]


def count(prepared: Prepared, layout: Layout, accumulation: Accumulation, reach: dict[int, int]) -> None:
    """One more ``backward`` in the accumulation (before the surgery, which reads the summed losses)."""
    accumulation.add(prepared.num_tasks, prepared.loss_values, reach)
    layout.num_tasks = prepared.num_tasks
    layout.checkpoint_tasks = None


def attach(buffer: SharedBuffer, accumulation: Accumulation) -> None:
    """The shared ``.grad`` that some task reached become views of the update; the wrapper remembers
    what it left there."""
    buffer.attach_grads(frozenset(accumulation.reach))
    accumulation.wrote(buffer)


def plain_spans(buffer: SharedBuffer, accumulation: Accumulation, start: int = 0, stop: int | None = None) -> list[PlainSpan]:
    """The columns of the shared parameters that a single task reached in this accumulation (a
    routed layer, a branch taken by one task on this step), as ``(task, columns)`` within
    ``[start, stop)`` of the buffer, shifted to start at 0: they get that task's plain gradient."""
    stop = buffer.numel if stop is None else stop
    spans = []
    for p, columns in zip(buffer.params, buffer.columns):
        mask = accumulation.reach.get(id(p), 0)
        if mask and not mask & (mask - 1):  # exactly one bit: one task
            a, b = max(columns.start, start), min(columns.stop, stop)
            if a < b:
                spans.append(PlainSpan(mask.bit_length() - 1, slice(a - start, b - start)))
    return spans
