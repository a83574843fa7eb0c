"""What a wrapper carries from one ``backward`` to the next, as two explicit objects shared by the
single-process path (``optim``) and ``torch.distributed`` (``distributed``):

- :class:`Layout`: what it knows of the model — which parameters are shared, the buffer of their
  task gradients, the number of tasks;
- :class:`Accumulation`: what it has accumulated since the gradients were last cleared, and what it
  left in the shared ``.grad`` (a change by anyone else starts a new accumulation: see
  :mod:`gradsurgery.grads`);
- :class:`Outcome`: what the last step produced (its Gram matrix and weights, the skipped steps) and
  the method's own state across steps.

The wrapper creates them once and only ever changes them in place: a framework's optimizer proxy
that copies the wrapper's attributes (Lightning's ``LightningOptimizer``) then shares them, so the
state lives in one place whichever object the calls go through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .granularity import Granularity
from .grads import Written
from .sharing import Sharing
from .taskgrads import SharedBuffer


@dataclass
class Layout:
    """The shared parameters and their buffer, for the current number of tasks."""

    explicit_shared: set[int] | None  # id of each parameter listed in shared=, or None: detected
    engine: str  # "loop", "batched" or "auto" (which becomes "batched" once vmap ran the graph)
    granularity: Granularity | None = None  # None: one block, the whole model
    sharing: Sharing | None = None
    buffer: SharedBuffer | None = None
    num_tasks: int | None = None  # T of the last backward, or of a loaded checkpoint
    checkpoint_tasks: int | None = None  # T of a loaded checkpoint, until a backward agrees
    unreached_checked: frozenset[int] = frozenset()  # the unreached parameters already looked into

    def ensure_buffer(self, shared: list[torch.Tensor], num_tasks: int, storage_dtype: torch.dtype | None) -> SharedBuffer:
        buffer = self.buffer
        if buffer is None or buffer.num_tasks != num_tasks or buffer.param_ids != frozenset(id(p) for p in shared):
            buffer = self.buffer = SharedBuffer(shared, num_tasks, storage_dtype=storage_dtype)
        return buffer


@dataclass
class Accumulation:
    """The ``backward`` calls since the gradients were last cleared."""

    tasks: int | None = None  # their number of tasks (None: nothing accumulated)
    losses: torch.Tensor | None = None  # their summed loss values (methods that read them)
    # id of each shared parameter some task reached → bitmask of the tasks that did: one reached by a
    # single task gets that task's plain gradient (gradsurgery.apply.plain_spans)
    reach: dict[int, int] = field(default_factory=dict)
    written: Written | None = None  # what was left in the shared .grad
    skip: bool = False  # the next step() is skipped (nonfinite="skip")
    unstepped: bool = False  # gradients were written that no step() has used yet

    def continues(self) -> bool:
        """Whether the next ``backward`` adds to these calls: nothing cleared or changed the shared
        ``.grad`` since (``zero_grad()`` on the wrapper, the inner optimizer or the model, clipping,
        unscaling...). Otherwise the accumulation is over."""
        if self.tasks is None:
            return False
        if self.written is not None and not self.written.untouched():
            self.tasks = None
            return False
        return True

    def clear(self) -> None:
        """``zero_grad()``: nothing accumulated, no step to skip."""
        self.tasks = None
        self.losses = None
        self.skip = False
        self.unstepped = False

    def start(self) -> None:
        """A new accumulation (the gradients were cleared or changed): nothing reached, no step to skip."""
        self.losses = None
        self.reach = {}
        self.skip = False

    def add(self, num_tasks: int, losses: torch.Tensor | None, reach: dict[int, int]) -> None:
        """One more ``backward`` of ``num_tasks`` losses, about to be written."""
        if losses is not None:
            self.losses = losses if self.losses is None else self.losses + losses
        self.tasks = num_tasks
        for pid, mask in reach.items():
            self.reach[pid] = self.reach.get(pid, 0) | mask
        self.unstepped = True

    def skipped(self, num_tasks: int) -> None:
        """A batch was refused (``nonfinite="skip"``): the step is skipped, and a batch that opens an
        accumulation keeps it open, so that later batches before the step do not unskip it."""
        if self.tasks is None:
            self.start()
            self.tasks = num_tasks
        self.skip = True

    def wrote(self, buffer: SharedBuffer | None) -> None:
        self.written = None if buffer is None else Written.of(buffer.params)


@dataclass
class Outcome:
    """What the steps produced: the last Gram matrix and weights (tensors, no host sync), the number of
    skipped steps, and a method's state across steps (its seed, its tensors)."""

    gram: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    skipped_steps: int = 0
    seed: int | None = None
    method_state: dict[str, torch.Tensor] | None = None
    refreshed: bool = True  # the last step computed the weights (False: a cheap step reused them)
