"""Writing what :mod:`gradsurgery.prepare` prepared, once every check has passed: the buffer's rows,
the task-specific ``.grad``, the accumulation's bookkeeping. Shared by the single-process path and
``torch.distributed``, which inserts its collectives between these steps."""

from __future__ import annotations

import torch

from .grads import accumulate_plain
from .pipeline import Target
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
    bases = buffer.bases or [None] * len(buffer.groups)
    return [Target(columns, update, base) for (columns, update), base in zip(buffer.groups, bases)]


def count(prepared: Prepared, layout: Layout, accumulation: Accumulation, reached: set[int]) -> None:
    """One more ``backward`` in the accumulation (before the surgery, which reads the summed losses)."""
    accumulation.add(prepared.num_tasks, prepared.loss_values, reached)
    layout.num_tasks = prepared.num_tasks
    layout.checkpoint_tasks = None


def attach(buffer: SharedBuffer, accumulation: Accumulation) -> None:
    """The shared ``.grad`` that some task reached become views of the update; the wrapper remembers
    what it left there."""
    buffer.attach_grads(frozenset(accumulation.reached))
    accumulation.wrote(buffer)
