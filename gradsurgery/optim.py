"""Optimizer wrappers: any ``torch.optim`` optimizer, with the shared gradient replaced by surgery.

Orchestration only: ``taskgrads`` fills the ``(T, P)`` buffer, ``backend`` computes the Gram matrix and
combines, ``methods`` turns the Gram matrix into weights.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from . import backend as _backend
from . import distributed as _distributed
from .errors import NonFiniteGradientError
from .grads import Written, accumulate_plain, grad_norms
from .methods import cagrad as _cagrad
from .methods import mgda as _mgda
from .methods import pcgrad as _pcgrad
from .methods._common import check_reduction, to_reduction
from .methods._simplex import DEFAULT_ITERATIONS
from .sharing import Sharing, classify
from .taskgrads import ENGINES, SharedBuffer, reach, task_gradients

Losses = Sequence[torch.Tensor] | torch.Tensor
NONFINITE_POLICIES = ("raise", "skip", "propagate")
SpecificGradients = list[tuple[torch.Tensor, list[torch.Tensor]]]  # a parameter and its tasks' gradients


@dataclass
class PreparedGradients:
    """Parameter mode, before any ``.grad`` is written: what the tasks' gradients are and where they go."""

    grads: list[list[torch.Tensor | None]]  # per task, per trainable parameter (None: not reached, or written early)
    shared: list[torch.Tensor]
    shared_rows: list[dict[int, torch.Tensor]]  # per task: id(shared parameter) → its gradient not yet written
    specific: SpecificGradients
    specific_tasks: list[list[int]]  # beside ``specific``: the task of each gradient
    buffer: SharedBuffer | None  # the shared parameters' buffer (None: nothing is shared)
    rows_written: bool  # the buffer's rows already hold this call's gradients (those it knew of)
    sharing: Sharing
    reached_shared: set[int]  # id of each shared parameter some task reached on this call


@dataclass
class FeatureGradients:
    """Representation mode, before anything is written."""

    encoder: list[torch.Tensor]  # the parameters upstream of the features
    rows: torch.Tensor  # (T, numel of features): ∂L_t/∂features
    specific: SpecificGradients  # the heads' plain gradients
    specific_tasks: list[list[int]]  # beside ``specific``: the task of each gradient
    features: torch.Tensor
    losses: list[torch.Tensor]
    bypass: bool  # some loss reaches an encoder parameter by a path around the features


class GradSurgery(torch.optim.Optimizer):
    """Base wrapper: per-task gradients → Gram matrix → weights → the shared parameters' ``.grad``.

    The training loop::

        opt.zero_grad()
        opt.backward(losses)   # T scalar losses
        opt.step()

    ``backward`` computes each task's gradient of the optimizer's parameters (the graph is kept until
    the last task). A parameter reached by more than one task is *shared* (or: the ones listed in
    ``shared=``); their rows form the ``(T, P)`` matrix ``J``, and their ``.grad`` becomes ``wᵀJ`` with
    ``w`` the method's weights for ``G = J Jᵀ``. A parameter reached by one task gets that task's plain
    gradient, accumulated into ``.grad`` as ``loss.backward()`` would; one reached by no task keeps its
    ``.grad``. Several ``backward`` calls before ``step`` accumulate the per-task gradients, and the
    shared ``.grad`` is always the surgery of the accumulated ones; ``zero_grad`` starts afresh.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so LR
    schedulers, ``torch.amp.GradScaler`` and checkpoints work on the wrapper. Subclasses implement
    :meth:`weights` (and set ``uses_loss_values = False`` when it ignores the loss values, which
    spares gathering them every step).

    Options common to every wrapper (keyword-only):

    - ``shared``: the shared parameters (a list, or a module), instead of detecting them;
    - ``reduction``: ``"sum"`` (default: the scale of ``sum(losses).backward()``) or ``"mean"``;
    - ``nonfinite``: what a NaN/Inf task gradient does — ``"raise"`` (default) a
      :class:`~gradsurgery.NonFiniteGradientError` naming the tasks, nothing changed; ``"skip"`` the
      next :meth:`step` (``skipped_steps`` counts); ``"propagate"`` into ``.grad`` so that
      ``torch.amp.GradScaler`` skips the step (the AMP setting). ``"raise"`` and ``"skip"`` read ``T``
      flags back to the host once per ``backward``; ``"propagate"`` never synchronises;
    - ``storage_dtype``: dtype of the per-task buffer (e.g. ``torch.bfloat16`` halves it for fp32
      parameters; the Gram matrix is still accumulated in fp32);
    - ``engine``: how the ``T`` per-task gradients are computed — ``"loop"`` (one backward per task),
      ``"batched"`` (one vmapped backward, ``chunk_size`` tasks at a time; raises for a graph vmap
      cannot batch) or ``"auto"`` (default: the loop on the CPU, where it measured faster; batched
      on CUDA, falling back to the loop);
    - ``backend``: ``"auto"``, ``"torch"`` or ``"triton"``;
    - ``process_group``: the ``torch.distributed`` group to train over (default: the default group when
      torch.distributed is initialised, otherwise a single process; a group of one is a single process);
    - ``sync``: ``"exact"`` (default: single-process training on the concatenated batch), ``"local"``
      (surgery per rank, final gradients averaged: an approximation) or ``"sharded"`` (``exact``'s
      answer, less communication); see :mod:`gradsurgery.distributed`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        shared: Iterable[torch.Tensor] | torch.nn.Module | None = None,
        reduction: str = "sum",
        nonfinite: str = "raise",
        storage_dtype: torch.dtype | None = None,
        engine: str = "auto",
        chunk_size: int | None = None,
        backend: str = "auto",
        process_group: Any = None,
        sync: str = "exact",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, GradSurgery):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (not a wrapper), got {type(optimizer).__name__}")
        check_reduction(reduction)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if storage_dtype is not None and not isinstance(storage_dtype, torch.dtype):
            raise TypeError(f"storage_dtype must be a torch.dtype (e.g. torch.bfloat16), got {storage_dtype!r}")
        if storage_dtype is not None and not storage_dtype.is_floating_point:
            raise ValueError(f"storage_dtype must be a floating-point torch.dtype, got {storage_dtype!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        _distributed.check_sync(sync)
        params = _all_params(optimizer)
        _check_real(params)
        _backend.check_backend(backend, params[0].device if params else None)
        self.optimizer = optimizer
        self.reduction = reduction
        self.nonfinite = nonfinite
        self.storage_dtype = storage_dtype
        self.engine = engine
        self._engine = engine
        self.chunk_size = chunk_size
        self.backend = backend
        self.sync = sync
        self._dist = _distributed.connect(process_group, sync)  # None: a single process
        self.skipped_steps = 0
        self._skip_step = False
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self._explicit_shared = None if shared is None else _check_shared(shared, params)
        self._buffer: SharedBuffer | None = None
        self._sharing: Sharing | None = None  # which parameters are shared, for the current T
        # The accumulation since .grad was last cleared: its number of tasks (None: nothing
        # accumulated), summed loss values, the shared parameters some task reached, and what the
        # wrapper left in their .grad (a change by anyone else starts a new accumulation).
        self._pending_tasks: int | None = None
        self._pending_losses: torch.Tensor | None = None
        self._window_reached: set[int] = set()
        self._written: Written | None = None
        self._num_tasks: int | None = None  # T of the last backward, or of a loaded checkpoint
        self._checkpoint_tasks: int | None = None  # T of a loaded checkpoint, until a backward agrees
        self._unreached_checked: frozenset[int] = frozenset()
        self._unstepped = False  # a backward() wrote gradients that no step() has used yet
        self.last_gram: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ torch.optim.Optimizer citizen

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run the inner optimizer's step. A ``closure`` (LBFGS) calls ``zero_grad`` and ``backward``.

        With ``nonfinite="skip"``, a step whose gradients held NaN/Inf is skipped instead (the inner
        optimizer's state is untouched) and :attr:`skipped_steps` counts it.
        """
        self._unstepped = False
        if self._skip_step:
            self._skip_step = False
            self.skipped_steps += 1
            return None
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every ``.grad`` (as the inner optimizer does) and the accumulated per-task gradients;
        a step marked to be skipped (``nonfinite="skip"``) is no longer skipped.

        Clearing through the model (``model.zero_grad()``) or anything else that changes the shared
        ``.grad`` has the same effect on the next :meth:`backward`."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending_tasks = None
        self._pending_losses = None
        self._skip_step = False
        self._unstepped = False

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"gradsurgery"`` entry with the method's own state.

        Take checkpoints between steps: per-task gradients accumulated by ``backward()`` calls that no
        ``step()`` has used yet are not saved (a warning says so when there are any)."""
        if self._unstepped:
            warnings.warn(
                "state_dict() while backward() calls are accumulated: the accumulated per-task gradients are not "
                "saved, so a run resumed from this checkpoint does not continue bit-identically. Save after step() "
                "and zero_grad().",
                RuntimeWarning,
                stacklevel=2,
            )
        state = self.optimizer.state_dict()
        state["gradsurgery"] = {
            "method": type(self).__name__,
            "num_tasks": self._num_tasks,
            "skipped_steps": self.skipped_steps,
            **self._method_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradsurgery", None)
        if extra is not None:
            if extra.get("method") != type(self).__name__:
                raise ValueError(f"checkpoint is for {extra.get('method')!r}, not {type(self).__name__!r}")
            saved_tasks = extra.get("num_tasks")
            if saved_tasks is not None and self._num_tasks not in (None, saved_tasks):
                raise ValueError(f"checkpoint has {saved_tasks} tasks but this optimizer is training {self._num_tasks}")
        self.optimizer.load_state_dict(state_dict)
        if extra is not None:
            self._num_tasks = extra.get("num_tasks") or self._num_tasks
            self._checkpoint_tasks = extra.get("num_tasks")
            self.skipped_steps = extra.get("skipped_steps", 0)
            self._load_method_state(extra)

    # ------------------------------------------------------------------ the method

    # Whether weights() reads the loss values (a subclass that does not says so, and the wrapper skips
    # gathering them: on a small model that is a noticeable part of the step).
    uses_loss_values = True

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        """Weights ``w`` on the sum scale for the Gram matrix ``G`` and the loss values (``None`` when
        the class sets ``uses_loss_values = False``); ``reduction`` is applied afterwards."""
        raise NotImplementedError

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ backward

    def backward(self, losses: Losses, *, features: torch.Tensor | None = None) -> None:
        """Per-task gradients → surgery → ``.grad`` of every parameter the losses reach.

        ``features``: the shared representation every task head reads (representation mode): the
        weights come from the Gram matrix of ``∂L_t/∂features`` and one backward through the encoder
        carries ``Σ_t w_t ∂L_t/∂features``; the heads, and any path from a loss to an encoder
        parameter that bypasses ``features``, get their plain gradients.
        """
        if self._dist is not None:
            return self._dist.backward(self, losses, features)
        accumulate = self._accumulating()
        losses, params, loss_values = self._begin(losses, accumulate=accumulate, values=self.uses_loss_values)
        if features is not None:
            self._backward_features(losses, features, params, loss_values)
            return
        prepared = self._task_gradients(losses, params, accumulate=accumulate, write_early=True)
        self._apply(prepared, loss_values, accumulate=accumulate)

    def _apply(self, prepared: PreparedGradients, loss_values: torch.Tensor | None, *, accumulate: bool) -> None:
        """Check the prepared gradients for NaN/Inf, then write every ``.grad`` and run the surgery."""
        buffer = prepared.buffer
        T = len(prepared.shared_rows)
        # Non-finite check before any .grad changes. A fresh buffer is checked through the diagonal of
        # its Gram matrix (free: the surgery needs it); accumulating, the incoming rows are checked
        # before they are added, so that a refused batch leaves the accumulated ones intact.
        G = None
        in_range = False
        if buffer is not None and not accumulate:
            for t in range(T):  # what was not written early
                if prepared.shared_rows[t] or not prepared.rows_written:
                    buffer.write(t, prepared.shared_rows[t], accumulate=False, zero_missing=not prepared.rows_written)
            G = _backend.gram(buffer.matrix, backend=self.backend)
            if self.nonfinite != "propagate":
                G, in_range = _backend.rescued(buffer.matrix, G)
        if self.nonfinite != "propagate":
            checked = _per_task(prepared.specific, prepared.specific_tasks, T)
            if accumulate:
                for t in range(T):
                    checked[t] += prepared.shared_rows[t].values()
            # The rescue check read G's diagonal back already: when it was in range and nothing else
            # needs checking, a second host sync would find nothing.
            if (not in_range or any(checked)) and self._refuse_nonfinite(_nonfinite_tasks(G, checked), T):
                return
        # From here on, .grad changes.
        self._begin_writes(prepared, accumulate=accumulate)
        if buffer is not None and accumulate:
            for t in range(T):
                buffer.write(t, prepared.shared_rows[t], accumulate=True)
        accumulate_plain(prepared.specific)
        if loss_values is not None:
            self._pending_losses = loss_values if self._pending_losses is None else self._pending_losses + loss_values
        self._pending_tasks = T
        self._num_tasks = T
        self._checkpoint_tasks = None
        self._unstepped = True
        if buffer is not None:
            self._surgery(buffer, G)
        else:
            self.last_gram = self.last_weights = None
        self._written = None if buffer is None else Written.of(buffer.params)

    def _begin_writes(self, prepared: PreparedGradients, *, accumulate: bool) -> None:
        """Once the checks passed, before any ``.grad`` is written: the sharing is settled, and a new
        accumulation starts on top of what the shared ``.grad`` hold."""
        self._sharing = prepared.sharing
        if not accumulate:
            self._start_window()
            if prepared.buffer is not None:
                prepared.buffer.capture_bases()
        self._window_reached |= prepared.reached_shared

    def _accumulating(self) -> bool:
        """Whether this ``backward`` adds to the previous ones: nothing cleared the gradients since
        (``zero_grad()`` on the wrapper, the inner optimizer or the model, or any other change to
        the shared ``.grad``: that starts a new accumulation on top of what ``.grad`` then holds)."""
        if self._pending_tasks is None:
            return False
        if self._written is not None and not self._written.untouched():
            self._pending_tasks = None
            return False
        return True

    def _start_window(self) -> None:
        """A new accumulation: nothing accumulated, nothing reached, no step to skip."""
        self._pending_losses = None
        self._window_reached = set()
        self._skip_step = False

    def _refuse_nonfinite(self, bad: list[int], num_tasks: int) -> bool:
        """Apply the non-finite policy to the tasks in ``bad``: raise, or mark the step skipped (True)."""
        if not bad:
            return False
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN/Inf, or a squared norm that overflows) for task(s) {bad}; "
                "no .grad, parameter or optimizer state was changed",
                tasks=bad,
            )
        if self._pending_tasks is None:  # the skipped batch opens an accumulation: the step stays skipped
            self._start_window()
            self._pending_tasks = num_tasks
        self._skip_step = True
        return True

    def _surgery(self, buffer: SharedBuffer, G: torch.Tensor | None = None) -> None:
        """Weights from the Gram matrix of the buffer, then ``.grad`` of the shared parameters that
        were reached ← their base (if any) + ``wᵀJ``."""
        if G is None:
            G = _backend.gram(buffer.matrix, backend=self.backend, rescue=self.nonfinite != "propagate")
        w = to_reduction(self.weights(G, self._pending_losses), self.reduction)
        bases = buffer.bases or [None] * len(buffer.groups)
        # A Gram rescued in fp64 means rows whose magnitudes fp32 cannot multiply together: so are
        # the weights, and the combine runs in fp64 too.
        wide = G.dtype == torch.float64 and buffer.matrix.dtype != torch.float64
        for (columns, update), base in zip(buffer.groups, bases):
            if base is not None:
                update.copy_(base)
            _backend.combine(
                w, buffer.matrix[:, columns], update, accumulate=base is not None, backend=self.backend, validate=False, wide=wide
            )
        buffer.attach_grads(frozenset(self._window_reached))
        self.last_gram, self.last_weights = G, w

    def _backward_features(
        self, losses: list[torch.Tensor], features: torch.Tensor, params: list[torch.Tensor], loss_values: torch.Tensor | None
    ) -> None:
        prepared = self._feature_gradients(losses, features, params)
        J = prepared.rows
        G = _backend.gram(J, backend=self.backend, rescue=self.nonfinite != "propagate")
        if self.nonfinite != "propagate":
            heads = _per_task(prepared.specific, prepared.specific_tasks, len(losses))
            if self._refuse_nonfinite(_nonfinite_tasks(G, heads), len(losses)):
                return
        w = to_reduction(self.weights(G, loss_values), self.reduction)
        encoder_grads = self._through_features(prepared, w)
        if self.nonfinite != "propagate" and prepared.bypass:
            # Only the paths around the features are new here: a NaN there is every task's at once.
            norms = grad_norms([g for g in encoder_grads if g is not None])
            if not bool(norms.isfinite().all()) and self._refuse_nonfinite(list(range(len(losses))), len(losses)):
                return
        accumulate_plain([(p, [g]) for p, g in zip(prepared.encoder, encoder_grads) if g is not None] + prepared.specific)
        self.last_gram, self.last_weights = G, w
        self._num_tasks = len(losses)
        self._unstepped = True

    def _through_features(self, prepared: FeatureGradients, w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The encoder's gradients: ``Σ_t w_t ∂L_t/∂features`` carried back through the encoder, plus
        the plain gradient of every path from a loss to an encoder parameter that bypasses the
        features (tied embeddings, skip connections around them)."""
        J = prepared.rows
        features, losses = prepared.features, prepared.losses
        if not prepared.bypass:
            combined = _backend.combine(w, J, torch.empty(J.shape[1], dtype=J.dtype, device=J.device), backend=self.backend)
            return torch.autograd.grad(features, prepared.encoder, grad_outputs=combined.view_as(features), allow_unused=True)
        # One backward of Σ_t L_t reaches every path; the features also receive Σ_t (w_t − 1)·∂L_t/∂z,
        # so that in total they carry Σ_t w_t·∂L_t/∂z (exactly zero extra for Sum).
        extra = _backend.combine(w - 1, J, torch.empty(J.shape[1], dtype=J.dtype, device=J.device), backend=self.backend)
        ones = [torch.ones_like(loss) for loss in losses]
        return torch.autograd.grad([*losses, features], prepared.encoder, grad_outputs=[*ones, extra.view_as(features)], allow_unused=True)

    def _begin(
        self, losses: Losses, *, accumulate: bool = False, values: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Checks shared by every backward: the losses, the trainable parameters, the loss values
        (float64, unless ``values=False``)."""
        losses = _check_losses(losses)
        T = len(losses)
        if accumulate and T != self._pending_tasks:
            raise ValueError(
                f"got {T} losses, but {self._pending_tasks} were accumulated since the gradients were last cleared"
            )
        if self._checkpoint_tasks is not None and T != self._checkpoint_tasks:
            raise ValueError(f"got {T} losses, but the loaded checkpoint was trained with {self._checkpoint_tasks}")
        params = [p for p in _all_params(self.optimizer) if p.requires_grad]
        if not params:
            raise ValueError("the optimizer holds no parameter that requires grad")
        _check_real(params)
        if not values:
            return losses, params, None
        return losses, params, torch.stack([loss.detach().reshape(()) for loss in losses]).to(torch.float64)

    def _task_gradients(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], *, accumulate: bool = False, write_early: bool = False
    ) -> PreparedGradients:
        """Per-task gradients, split into the shared rows and the task-specific ones; nothing is
        written to ``.grad``. With ``write_early`` and nothing accumulated, each task's shared
        gradients go into the buffer as soon as they exist, so at most one task's full gradient is
        alive besides the buffer."""
        T = len(losses)
        ids = [id(p) for p in params]
        relayout = self._sharing is None or self._sharing.num_tasks != T
        # Which parameters several tasks reach is read off the values on the first step (see
        # gradsurgery.sharing): the graph cannot tell a fused head from a shared trunk.
        measure = relayout and self._explicit_shared is None and T > 1
        early = None
        if write_early and not accumulate:
            if not relayout:
                early = self._buffer
            else:
                layout = self._layout_before_backward(losses, params)
                if layout:
                    early = SharedBuffer(layout, T, storage_dtype=self.storage_dtype)
        # A first-step buffer narrower than its parameters cannot give back a fused head's exact
        # gradient: the graph is kept to recompute it.
        narrow = measure and early is not None and early.matrix.dtype != torch.promote_types(early.matrix.dtype, _widest(early.params))
        norms: list[tuple[list[int], torch.Tensor]] = []

        def on_task(t: int, row: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            if measure:
                present = [i for i, g in enumerate(row) if g is not None]
                norms.append((present, grad_norms([row[i] for i in present])))  # type: ignore[misc]
            return row if early is None else _write_row(early, t, params, row)

        grads = task_gradients(
            losses,
            params,
            engine=self._engine,
            chunk_size=self.chunk_size,
            on_task=on_task if (measure or early is not None) else None,
            keep_graph=narrow,
        )
        if self._engine == "auto" and grads.engine == "batched":
            self._engine = "batched"  # vmap handles this graph: stop keeping it alive for a fallback
        structural = grads.reached
        self._check_every_loss_reaches(structural)
        self._check_untrained(losses, params, structural)
        sharing = self._sharing_after(ids, structural, grads.grads, norms if measure else None, accumulate=accumulate)
        reached = sharing.reached(ids, structural)
        # The owners' other tasks contribute zeros, checked on this step, or unchecked (propagate):
        # then they are summed like any task-specific gradient, so nothing is ever dropped.
        specific_reach = reached if self.nonfinite != "propagate" else structural
        buffer = self._buffer_for(sharing, params, T)
        rows_written = early is not None and buffer is not None
        recomputed: dict[tuple[int, int], torch.Tensor] = {}
        if early is not None and early is not buffer:  # the first step's layout was not the final one
            if buffer is not None:
                buffer.copy_rows_from(early)
            recomputed = self._rows_of_consumed(losses, params, specific_reach, sharing, early, narrow)
        consumed = early.param_ids if early is not None else frozenset()
        shared_ids = buffer.param_ids if buffer is not None else frozenset()
        shared_rows = [
            {pid: g for pid, g, hit in zip(ids, row, hits) if hit and g is not None and pid in shared_ids}
            for row, hits in zip(grads.grads, reached)
        ]
        specific: SpecificGradients = []
        specific_tasks: list[list[int]] = []
        reached_shared: set[int] = set()
        for i, (pid, column) in enumerate(zip(ids, zip(*specific_reach))):
            if pid in shared_ids:
                if any(column):
                    reached_shared.add(pid)
                continue
            kept = [
                (t, recomputed.get((t, i)) if pid in consumed else grads.grads[t][i]) for t, hit in enumerate(column) if hit
            ]
            kept = [(t, g) for t, g in kept if g is not None]
            if kept:
                specific.append((params[i], [g for _, g in kept]))
                specific_tasks.append([t for t, _ in kept])
        shared = buffer.params if buffer is not None else []
        return PreparedGradients(
            grads.grads, shared, shared_rows, specific, specific_tasks, buffer, rows_written, sharing, reached_shared
        )

    def _buffer_for(self, sharing: Sharing, params: list[torch.Tensor], num_tasks: int) -> SharedBuffer | None:
        """The buffer of the shared parameters: the current one while the shared set and ``T`` stay."""
        buffer = self._buffer
        if sharing is self._sharing and buffer is not None and buffer.num_tasks == num_tasks:
            return buffer
        shared = [p for p in params if id(p) in sharing.shared]
        return self._ensure_buffer(shared, num_tasks) if shared else None

    def _layout_before_backward(self, losses: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The shared parameters as far as the graph tells, before any backward (a walk, no gradient):
        what the rows are written into while the first step's gradients are computed."""
        if self._explicit_shared is not None:
            return [p for p in params if id(p) in self._explicit_shared]
        counts = [sum(column) for column in zip(*reach(losses, params))]
        return [p for p, n in zip(params, counts) if n > 1]

    def _sharing_after(
        self,
        ids: list[int],
        structural: list[list[bool]],
        grads: list[list[torch.Tensor | None]],
        norms: list[tuple[list[int], torch.Tensor]] | None,
        *,
        accumulate: bool,
    ) -> Sharing:
        """The shared set and the owners for this step: measured (first step), fixed (``shared=``),
        or the last step's, grown by what became shared since."""
        T = len(structural)
        if self._explicit_shared is not None:
            if self._sharing is not None and self._sharing.num_tasks == T:
                return self._sharing
            return Sharing(T, set(self._explicit_shared))
        if norms is not None:
            values = torch.cat([v for _, v in norms]).tolist() if norms else []  # one host sync, first step only
            nonzero = [[False] * len(ids) for _ in range(T)]
            position = 0
            for t, (present, _) in enumerate(norms):
                for i in present:
                    nonzero[t][i] = values[position] != 0  # NaN and Inf count as non-zero
                    position += 1
            return Sharing(T, *classify(ids, structural, nonzero))
        sharing = self._sharing if self._sharing is not None and self._sharing.num_tasks == T else Sharing(T)
        reached = sharing.reached(ids, structural)
        promoted = {pid for pid, column in zip(ids, zip(*reached)) if sum(column) > 1 and pid not in sharing.shared}
        if sharing.owners and self.nonfinite != "propagate":
            promoted |= _owned_but_shared(sharing, ids, grads)
        if not promoted:
            return sharing
        if accumulate:
            raise ValueError(
                "a parameter became shared between accumulated backward() calls; pass shared= to fix the set"
            )
        owners = {pid: t for pid, t in sharing.owners.items() if pid not in promoted}
        return Sharing(T, sharing.shared | promoted, owners)

    def _rows_of_consumed(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        reach_of: list[list[bool]],
        sharing: Sharing,
        early: SharedBuffer,
        narrow: bool,
    ) -> dict[tuple[int, int], torch.Tensor]:
        """The gradients of parameters that were written into the first step's buffer but turned out
        task-specific (a fused head): read back from that buffer, or recomputed from the graph when
        the buffer stores them at a lower precision than the parameter's."""
        wanted = [
            (t, i)
            for i, p in enumerate(params)
            if id(p) in early.param_ids and id(p) not in sharing.shared
            for t in range(len(losses))
            if reach_of[t][i]
        ]
        if not wanted:
            return {}
        if not narrow:
            return {(t, i): early.row_views[t][early.index[id(params[i])]] for t, i in wanted}
        out: dict[tuple[int, int], torch.Tensor] = {}
        for t in sorted({t for t, _ in wanted}):
            indices = [i for s, i in wanted if s == t]
            exact = torch.autograd.grad(losses[t], [params[i] for i in indices], retain_graph=True, allow_unused=True)
            out.update({(t, i): g for i, g in zip(indices, exact) if g is not None})
        return out

    def _check_every_loss_reaches(self, structural: list[list[bool]]) -> None:
        for t, row in enumerate(structural):
            if not any(row):
                raise ValueError(f"loss {t} reaches no parameter of the optimizer")

    def _check_untrained(self, losses: list[torch.Tensor], params: list[torch.Tensor], structural: list[list[bool]]) -> None:
        """Refuse a graph whose parameters ``torch.autograd.grad`` cannot reach: a reentrant
        ``torch.utils.checkpoint`` computes its gradients by a nested ``.backward()`` that only
        ``loss.backward()`` runs, so the checkpointed parameters would silently never train. Looked
        for only when some parameter is reached by no task, and once per such set."""
        unreached = frozenset(id(p) for p, column in zip(params, zip(*structural)) if not any(column))
        if not unreached or unreached == self._unreached_checked:
            return
        if _graph_holds(losses, "CheckpointFunctionBackward"):
            raise ValueError(
                "the losses' graph holds a torch.utils.checkpoint region with use_reentrant=True, whose "
                "parameters only loss.backward() reaches: gradsurgery computes per-task gradients with "
                "torch.autograd.grad, so they would never train. Use checkpoint(..., use_reentrant=False)."
            )
        self._unreached_checked = unreached

    def _feature_gradients(
        self, losses: list[torch.Tensor], features: torch.Tensor, params: list[torch.Tensor]
    ) -> FeatureGradients:
        """Representation mode: ``∂L_t/∂features`` per task and the heads' plain gradients."""
        if not isinstance(features, torch.Tensor) or not features.requires_grad:
            raise ValueError("features must be a tensor that requires grad (the encoder's output)")
        upstream = _params_upstream_of(features)
        encoder = [p for p in params if id(p) in upstream]
        if not encoder:
            raise ValueError("features does not lead to any parameter of the optimizer: pass the encoder's output")
        heads = [p for p in params if id(p) not in upstream]
        rows = []
        head_grads: list[list[torch.Tensor | None]] = []
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, [features, *heads], retain_graph=True, allow_unused=True)
            if grads[0] is None:
                raise ValueError(f"loss {t} does not depend on features")
            rows.append(grads[0].reshape(-1))
            head_grads.append(list(grads[1:]))
        specific: SpecificGradients = []
        tasks: list[list[int]] = []
        for p, column in zip(heads, zip(*head_grads)):
            kept = [(t, g) for t, g in enumerate(column) if g is not None]
            if kept:
                specific.append((p, [g for _, g in kept]))
                tasks.append([t for t, _ in kept])
        bypass = features.grad_fn is not None and _reaches_around(losses, features, {id(p) for p in encoder})
        return FeatureGradients(encoder, torch.stack(rows), specific, tasks, features, losses, bypass)

    def _ensure_buffer(self, shared: list[torch.Tensor], num_tasks: int) -> SharedBuffer:
        buffer = self._buffer
        if buffer is None or buffer.num_tasks != num_tasks or buffer.param_ids != frozenset(id(p) for p in shared):
            buffer = self._buffer = SharedBuffer(shared, num_tasks, storage_dtype=self.storage_dtype)
        return buffer

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self) -> dict[str, Any]:
        """The last step's gradient norms, cosine similarities, conflicts and weights as plain floats.

        This reads tensors back to the host: call it when logging, not on every step of a fast loop.
        """
        if self._num_tasks is not None and self.last_gram is None:
            raise RuntimeError(
                "the last backward() had no shared parameters (each parameter was reached by one task), so there "
                "was no Gram matrix or weights to report"
            )
        if self.last_gram is None or self.last_weights is None:
            raise RuntimeError("diagnostics() needs a backward() first")
        from .diagnostics import gram_diagnostics, to_floats

        return to_floats(gram_diagnostics(self.last_gram, self.last_weights))


class Sum(GradSurgery):
    """Naive summation: ``.grad`` is what ``sum(losses).backward()`` gives. The baseline."""

    uses_loss_values = False

    def __init__(self, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        super().__init__(optimizer, **options)

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(G.shape[0], dtype=torch.float64, device=G.device)


class Mean(GradSurgery):
    """The mean of the task gradients: what ``mean(losses).backward()`` gives."""

    uses_loss_values = False

    def __init__(self, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        if "reduction" in options:
            raise ValueError("Mean is Sum with reduction='mean'; it takes no reduction= of its own")
        super().__init__(optimizer, reduction="mean", **options)

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(G.shape[0], dtype=torch.float64, device=G.device)


class PCGrad(GradSurgery):
    __doc__ = "PCGrad as an optimizer wrapper.\n\n" + (_pcgrad.__doc__ or "") + """
    The visiting orders come from the wrapper's own ``torch.Generator`` on the parameters' device,
    seeded with ``seed`` (drawn from torch's global generator when ``None``, so ``torch.manual_seed``
    makes runs reproducible); its state is part of :meth:`state_dict`.
    """
    uses_loss_values = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(optimizer, **options)
        params = _all_params(optimizer)
        device = params[0].device if params else torch.device("cpu")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        if seed is None and self._dist is not None:
            self.seed = self._dist.broadcast_seed(self.seed)  # every rank must draw the same orders
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        chains = _backend.solvers(self.backend, G).get("pcgrad")
        return _pcgrad.pcgrad_weights(G, generator=self.generator, chains=chains)

    def _method_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])


class CAGrad(GradSurgery):
    __doc__ = "CAGrad as an optimizer wrapper.\n\n" + (_cagrad.__doc__ or "")
    uses_loss_values = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        c: float = 0.4,
        rescale: str | None = "1+c^2",
        max_iter: int = DEFAULT_ITERATIONS,
        **options: Any,
    ) -> None:
        _cagrad.check_cagrad_options(c, rescale)
        _check_max_iter(max_iter)
        super().__init__(optimizer, **options)
        self.c, self.rescale, self.max_iter = c, rescale, max_iter

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        solve = _backend.solvers(self.backend, G).get("cagrad")
        return _cagrad.cagrad_weights(G, c=self.c, rescale=self.rescale, max_iter=self.max_iter, solve=solve)


class MGDA(GradSurgery):
    __doc__ = "MGDA as an optimizer wrapper (MGDA-UB with ``backward(losses, features=z)``).\n\n" + (_mgda.__doc__ or "")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        normalization: str = "none",
        max_iter: int = DEFAULT_ITERATIONS,
        **options: Any,
    ) -> None:
        _mgda.check_normalization(normalization)
        _check_max_iter(max_iter)
        super().__init__(optimizer, **options)
        self.normalization, self.max_iter = normalization, max_iter

    @property
    def uses_loss_values(self) -> bool:  # type: ignore[override]
        return self.normalization in ("loss", "loss+")

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        solve = _backend.solvers(self.backend, G).get("mgda")
        return _mgda.mgda_weights(G, normalization=self.normalization, losses=losses, max_iter=self.max_iter, solve=solve)


# ---------------------------------------------------------------------- helpers


def _all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seen: set[int] = set()
    for index, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter {index} (shape {tuple(p.shape)}) appears twice in the optimizer")
        seen.add(id(p))
    return params


def _check_max_iter(max_iter: int) -> None:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")


def _check_shared(shared: Iterable[torch.Tensor] | torch.nn.Module, params: list[torch.Tensor]) -> set[int]:
    listed = list(shared.parameters()) if isinstance(shared, torch.nn.Module) else list(shared)
    held = {id(p) for p in params}
    ids: set[int] = set()
    for index, p in enumerate(listed):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"shared[{index}] is a {type(p).__name__}, not a parameter tensor")
        if id(p) not in held:
            raise ValueError(f"shared[{index}] (shape {tuple(p.shape)}) is not a parameter of the optimizer")
        if id(p) in ids:
            raise ValueError(f"shared[{index}] (shape {tuple(p.shape)}) is listed twice")
        ids.add(id(p))
    return ids


def _check_losses(losses: Losses) -> list[torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses as a tensor must be 1-D (one loss per task), got shape {tuple(losses.shape)}")
        items = list(losses.unbind())
    else:
        items = list(losses)
    if not items:
        raise ValueError("losses is empty: pass one scalar loss per task")
    for t, loss in enumerate(items):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {t} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {t} is not a scalar: shape {tuple(loss.shape)}")
        if not loss.dtype.is_floating_point:
            raise ValueError(f"loss {t} has non-floating dtype {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(f"loss {t} does not require grad (computed under no_grad, or detached?)")
        if loss.device != items[0].device:
            raise ValueError(f"loss {t} is on {loss.device} but loss 0 is on {items[0].device}")
    return items


def _params_upstream_of(features: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor the autograd graph of ``features`` reaches."""
    found: set[int] = set()
    stack = [features.grad_fn] if features.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    if features.grad_fn is None and features.is_leaf:
        found.add(id(features))
    return found


def _write_row(
    buffer: SharedBuffer, task: int, params: list[torch.Tensor], row: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Copy ``row``'s gradients of the buffer's parameters into row ``task``; return the rest."""
    held = buffer.param_ids
    buffer.write(task, {id(p): g for p, g in zip(params, row) if g is not None and id(p) in held}, accumulate=False)
    return [None if id(p) in held else g for p, g in zip(params, row)]


def _nonfinite_tasks(G: torch.Tensor | None, checked: list[list[torch.Tensor]]) -> list[int]:
    """Tasks whose squared norm ``G[t, t]`` or listed gradients are NaN/Inf. Reads ``T`` flags back: one host sync."""
    T = len(checked)
    tensors = [g for row in checked for g in row]
    device = G.device if G is not None else (tensors[0].device if tensors else torch.device("cpu"))
    bad = torch.zeros(T, dtype=torch.bool, device=device)
    if tensors:
        norms = grad_norms(tensors).to(device)
        sizes = [len(row) for row in checked]
        per_task = torch.split(~norms.isfinite(), sizes)
        bad |= torch.stack([flags.any() for flags in per_task])
    if G is not None:
        bad |= ~G.diagonal().isfinite()  # the diagonal: an off-diagonal NaN would blame both tasks
    return bad.nonzero().flatten().tolist()


def _per_task(specific: SpecificGradients, tasks: list[list[int]], num_tasks: int) -> list[list[torch.Tensor]]:
    """The task-specific gradients regrouped by task."""
    out: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
    for (_, grads), owners in zip(specific, tasks):
        for g, t in zip(grads, owners):
            out[t].append(g)
    return out


def _owned_but_shared(sharing: Sharing, ids: list[int], grads: list[list[torch.Tensor | None]]) -> set[int]:
    """The owned parameters that another task's gradient now reaches with a non-zero value (one host
    sync, on steps where the graph leads every task to them: fused outputs)."""
    suspects = [
        (pid, g)
        for i, pid in enumerate(ids)
        if pid in sharing.owners
        for t, row in enumerate(grads)
        if t != sharing.owners[pid] and (g := row[i]) is not None
    ]
    if not suspects:
        return set()
    nonzero = (grad_norms([g for _, g in suspects]) != 0).tolist()
    return {pid for (pid, _), hit in zip(suspects, nonzero) if hit}


def _check_real(params: list[torch.Tensor]) -> None:
    for index, p in enumerate(params):
        if p.is_complex():
            raise ValueError(
                f"parameter {index} (shape {tuple(p.shape)}) is complex ({p.dtype}): the methods compare task "
                "gradients by real inner products; view it as real (torch.view_as_real) to train it with gradsurgery"
            )


def _widest(params: list[torch.Tensor]) -> torch.dtype:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _walk(roots: list[torch.Tensor], stop: object = None):
    """Every autograd node reachable from ``roots``' graphs, each once, not descending below ``stop``."""
    stack = [loss.grad_fn for loss in roots if loss.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if node is not stop:
            stack.extend(child for child, _ in node.next_functions if child is not None)


def _graph_holds(losses: list[torch.Tensor], node_name: str) -> bool:
    return any(type(node).__name__ == node_name for node in _walk(losses))


def _reaches_around(losses: list[torch.Tensor], features: torch.Tensor, encoder: set[int]) -> bool:
    """Whether a loss reaches an encoder parameter by a path that does not pass through ``features``."""
    for node in _walk(losses, stop=features.grad_fn):
        if node is features.grad_fn:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in encoder:
            return True
    return False
