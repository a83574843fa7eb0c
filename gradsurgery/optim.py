"""Optimizer wrappers: any ``torch.optim`` optimizer, with the shared gradient replaced by surgery.

Orchestration only: :mod:`~gradsurgery.prepare` checks the call and computes the per-task gradients,
:mod:`~gradsurgery.pipeline` runs Gram → weights → combine, :mod:`~gradsurgery.apply` writes ``.grad``,
and each method is a :class:`~gradsurgery.methods.spec.Method` from which
:func:`gradsurgery.wrappers.wrapper_class` builds its wrapper (``gs.PCGrad``, ``gs.CAGrad``, ...).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, cast, overload

import torch

from . import apply as _apply
from . import backend as _backend
from . import distributed as _distributed
from . import leaves as _leaves
from .errors import NonFiniteGradientError
from .grads import Written, grad_peaks
from .hints import ENGINES, NONFINITE_POLICIES, Backend, Diagnostics, Engine, Granularity, NonFinite, Reduction, Sync
from .methods._common import check_reduction, to_reduction
from .methods.spec import Method
from .pipeline import Aggregate, Target, aggregate
from .prepare import (
    FeatureGradients,
    GradOptions,
    Losses,
    Prepared,
    PreparedGradients,
    all_params,
    check_losses,
    check_real,
    check_scaler_policy,
    check_shared,
    check_task_count,
    one_tensor,
    eager,
    nonfinite_tasks,
    outside_autocast,
    params_upstream_of,
    per_task,
    prepare,
    rescue_gram,
    features_extra,
    through_features,
)
from .cheap import Cheap, Draw, backward_weights, check_every, check_tasks_per_step, draw, expand, mean_last, mean_rows, pseudo_losses
from .granularity import Granularity as CheckedGranularity
from .sharing import Sharing
from .state import Accumulation, Layout, Outcome
from .taskgrads import SharedBuffer, reach

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class GradSurgery(torch.optim.Optimizer):
    """Base wrapper: per-task gradients → Gram matrix → weights → the shared parameters' ``.grad``.

    The training loop::

        opt.zero_grad()
        opt.backward(losses)   # T scalar losses
        opt.step()

    ``backward`` computes each task's gradient of the optimizer's parameters (the graph is kept until
    the last task). A parameter that more than one task reaches with a non-zero gradient is *shared*
    (or: the ones listed in ``shared=``); their rows form the ``(T, P)`` matrix ``J``, and their
    ``.grad`` becomes ``wᵀJ`` with ``w`` the method's weights for ``G = J Jᵀ``. A parameter reached by
    one task gets that task's plain gradient, accumulated into ``.grad`` as ``loss.backward()`` would;
    one reached by no task keeps its ``.grad``. Several ``backward`` calls with nothing touching
    ``.grad`` in between accumulate the per-task gradients, and the shared ``.grad`` is always the
    surgery of the accumulated ones; clearing the gradients (``zero_grad()``, ``model.zero_grad()``)
    starts afresh, and a gradient already there is a plain term (see the README's training-loop
    contract).

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so LR
    schedulers, ``torch.amp.GradScaler`` and checkpoints work on the wrapper.

    A method of your own is a subclass that implements :meth:`weights` (and sets
    ``uses_loss_values = False`` when it ignores the loss values, which spares gathering them every
    step), or a :class:`~gradsurgery.methods.spec.Method` given to :func:`wrapper_class`.

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
    - ``chunk_size``: tasks per vmapped backward (bounds its memory);
    - ``backend``: ``"auto"``, ``"torch"`` or ``"triton"``;
    - ``process_group``: the ``torch.distributed`` group to train over (default: the default group when
      torch.distributed is initialised, otherwise a single process; a group of one is a single process);
    - ``sync``: ``"exact"`` (default: single-process training on the concatenated batch), ``"local"``
      (surgery per rank, final gradients averaged: an approximation) or ``"sharded"`` (``exact``'s
      answer, less communication); see :mod:`gradsurgery.distributed`;
    - ``every``: the weights are computed every ``every`` steps, one weighted backward in between;
    - ``tasks_per_step``: ``k − 1`` drawn tasks and the mean of the others per step (``k`` backward
      passes); see :mod:`gradsurgery.cheap` for both;
    - ``granularity``: ``"all"`` (default: one Gram matrix for the whole model), ``"parameter"``,
      ``"module"`` (the layers of ``shared=``), a module, or a list of parameter groups: the method
      runs on each block separately, from the same two passes (:mod:`gradsurgery.granularity`);
      ``last_gram`` is then ``(B, T, T)`` and ``last_weights`` ``(B, T)``.

    Example:
        A method of your own: each task's gradient scaled to unit length, then summed.

        >>> import torch, gradsurgery as gs
        >>> class UnitLength(gs.GradSurgery):
        ...     uses_loss_values = False
        ...     def weights(self, G, losses):
        ...         return G.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).rsqrt()
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
        >>> opt = UnitLength(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1))
        >>> features = trunk(torch.randn(16, 4))
        >>> opt.zero_grad()
        >>> opt.backward([head(features).pow(2).mean() for head in heads])
        >>> opt.step()
        >>> opt.diagnostics()["conflicts"] in (0, 1)
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        shared: Iterable[torch.Tensor] | torch.nn.Module | None = None,
        reduction: Reduction = "sum",
        nonfinite: NonFinite = "raise",
        storage_dtype: torch.dtype | None = None,
        engine: Engine = "auto",
        chunk_size: int | None = None,
        backend: Backend = "auto",
        process_group: ProcessGroup | None = None,
        sync: Sync = "exact",
        every: int = 1,
        tasks_per_step: int | None = None,
        granularity: Granularity = "all",
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
        if storage_dtype == torch.float16 and any(p.dtype in (torch.float32, torch.float64) for p in all_params(optimizer)):
            # fp16 tops out at 65504: gradients of fp32 parameters, scaled by a GradScaler or not, overflow it.
            raise ValueError(
                "storage_dtype=torch.float16 cannot hold the gradients of float32/float64 parameters (its range ends "
                "at 65504, below what a GradScaler's scaled gradients reach): use torch.bfloat16, which has fp32's range"
            )
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        _distributed.check_sync(sync)
        check_every(every)
        check_tasks_per_step(tasks_per_step)
        params = all_params(optimizer)
        check_real(params)
        _backend.check_backend(backend, params[0].device if params else None)
        self.optimizer = optimizer
        self.reduction = reduction
        self.nonfinite = nonfinite
        self.storage_dtype = storage_dtype
        self.engine = engine
        self.chunk_size = chunk_size
        self.backend = backend
        self.sync = sync
        self._dist = _distributed.connect(process_group, sync)  # None: a single process
        self._single_by_default = self._dist is None and process_group is None  # torch.distributed not started
        self._outcome = Outcome()
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        explicit = None if shared is None else check_shared(shared, params)
        blocks = CheckedGranularity(granularity, params, shared)
        if not blocks.whole and every > 1:
            raise ValueError(
                "granularity= gives each block its own weights, which one weighted backward between refreshes "
                "cannot apply: every= must be 1 with it"
            )
        self.granularity = granularity
        self._layout = Layout(explicit, engine, None if blocks.whole else blocks)
        self._accumulation = Accumulation()
        self._grad_options = GradOptions(nonfinite, storage_dtype, chunk_size, backend)
        self.every, self.tasks_per_step = every, tasks_per_step
        self._cheap = Cheap(every, tasks_per_step)
        self._slots: Draw | None = None  # tasks_per_step: this step's drawn tasks, while the full step runs
        self._step_start: Any = None  # the draws and method state at the step's first backward
        if tasks_per_step is not None:
            self._cheap.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        if self._dist is not None and (every > 1 or tasks_per_step is not None):
            raise ValueError(
                "every= and tasks_per_step= are not implemented over torch.distributed: the steps between refreshes "
                "and the task draws would need their own agreement between the ranks (same weights, same draws, "
                "averaged gradients), which does not exist yet. Train these modes in one process, or use "
                "representation mode (features=) for a cheaper distributed step"
            )

    # ------------------------------------------------------------------ torch.optim.Optimizer citizen
    # The inner optimizer's attributes, read through: a property where torch.optim declares a plain
    # attribute, which the type checkers are told is intended.

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @property
    def last_gram(self) -> torch.Tensor | None:
        """The last step's ``T × T`` Gram matrix (a tensor on the device: reading it does not sync)."""
        return self._outcome.gram

    @property
    def last_weights(self) -> torch.Tensor | None:
        """The last step's weights, with ``reduction`` applied (``None`` for an elementwise method)."""
        return self._outcome.weights

    @property
    def last_slots(self) -> list[list[int]] | None:
        """With ``tasks_per_step``: the tasks behind each row of the last step's Gram matrix and weights
        (the drawn ones, then the others' pseudo-task); ``None`` otherwise."""
        draw = self._cheap.draw
        return None if draw is None else draw.slots

    @property
    def blocks(self) -> list[list[int]] | None:
        """With ``granularity=``: the parameters of each block, as indices into the optimizer's
        parameters (in ``param_groups`` order), in the order of ``last_gram`` and ``last_weights``."""
        buffer = self._layout.buffer
        if buffer is None or buffer.blocks is None:
            return None
        index = {id(p): i for i, p in enumerate(all_params(self.optimizer))}
        out = []
        for spans in buffer.blocks.blocks:
            members = [p for p, c in zip(buffer.params, buffer.columns) if any(a <= c.start < b for a, b in spans)]
            out.append(sorted(index[id(p)] for p in members))
        return out

    @property
    def refreshed(self) -> bool:
        """Whether the last step computed the weights (``False``: an ``every=`` step that reused them)."""
        return self._outcome.refreshed

    @property
    def skipped_steps(self) -> int:
        """Steps skipped under ``nonfinite="skip"``."""
        return self._outcome.skipped_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the inner optimizer's step.

        With ``nonfinite="skip"``, a step whose gradients held NaN/Inf is skipped instead (the inner
        optimizer's state is untouched) and :attr:`skipped_steps` counts it.

        Args:
            closure: for optimizers that re-evaluate the loss (LBFGS): it calls ``zero_grad`` and
                :meth:`backward` and returns the loss.

        Returns:
            What the inner optimizer's ``step`` returns (the closure's loss), or ``None`` for a
            skipped step.
        """
        accumulation = self._accumulation
        accumulation.unstepped = False
        if accumulation.skip:
            accumulation.skip = False
            self._outcome.skipped_steps += 1
            return None
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every ``.grad`` (as the inner optimizer does) and the accumulated per-task gradients;
        a step marked to be skipped (``nonfinite="skip"``) is no longer skipped.

        Clearing through the model (``model.zero_grad()``) or anything else that changes the shared
        ``.grad`` has the same effect on the next :meth:`backward`.

        Args:
            set_to_none: ``.grad = None`` (default) rather than zeros, as ``torch.optim``.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._accumulation.clear()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"gradsurgery"`` entry with the method's own state.

        Take checkpoints between steps: per-task gradients accumulated by ``backward()`` calls that no
        ``step()`` has used yet are not saved (a warning says so when there are any)."""
        if self._accumulation.unstepped:
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
            "num_tasks": self._layout.num_tasks,
            "skipped_steps": self.skipped_steps,
            **self._method_state(),
            **self._cheap_state(),
            **self._sharing_state(),
        }
        return state

    def _sharing_state(self) -> dict[str, Any]:
        """The shared set and owners read off the first step's values (see :mod:`gradsurgery.sharing`):
        a resumed run must not read them again off another batch."""
        sharing = self._layout.sharing
        if sharing is None or self._layout.explicit_shared is not None:
            return {}
        index = {id(p): i for i, p in enumerate(all_params(self.optimizer))}
        return {
            "sharing": {
                "num_tasks": sharing.num_tasks,
                "shared": sorted(index[pid] for pid in sharing.shared if pid in index),
                "owners": {index[pid]: t for pid, t in sharing.owners.items() if pid in index},
            }
        }

    def _load_sharing_state(self, state: dict[str, Any]) -> None:
        saved = state.get("sharing")
        if saved is None or self._layout.explicit_shared is not None:
            return
        params = all_params(self.optimizer)
        self._layout.sharing = Sharing(
            saved["num_tasks"], {id(params[i]) for i in saved["shared"]}, {id(params[i]): t for i, t in saved["owners"].items()}
        )
        self._layout.buffer = None  # rebuilt for that set by the next backward

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer).

        Args:
            state_dict: what :meth:`state_dict` returned, possibly moved to another device.

        Raises:
            ValueError: the checkpoint is of another method, or of another number of tasks than the
                one this wrapper is training (nothing is loaded then).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradsurgery", None)
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"state_dict['gradsurgery'] must be the dict state_dict() saved, got {type(extra).__name__}")
        layout = self._layout
        if extra is not None:
            if extra.get("method") != type(self).__name__:
                raise ValueError(f"checkpoint is for {extra.get('method')!r}, not {type(self).__name__!r}")
            saved_tasks = extra.get("num_tasks")
            if saved_tasks is not None and layout.num_tasks not in (None, saved_tasks):
                raise ValueError(f"checkpoint has {saved_tasks} tasks but this optimizer is training {layout.num_tasks}")
            self._check_method_state(extra)
        self.optimizer.load_state_dict(state_dict)
        if extra is not None:
            layout.num_tasks = extra.get("num_tasks") or layout.num_tasks
            layout.checkpoint_tasks = extra.get("num_tasks")
            self._outcome.skipped_steps = extra.get("skipped_steps", 0)
            self._load_method_state(extra)
            self._load_cheap_state(extra)
            self._load_sharing_state(extra)

    # ------------------------------------------------------------------ the method

    # Whether weights() reads the loss values (a subclass that does not says so, and the wrapper skips
    # gathering them: on a small model that is a noticeable part of the step).
    uses_loss_values = True

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        """The method: weights ``w`` on the sum scale (``reduction`` is applied afterwards).

        Args:
            G: the ``(T, T)`` Gram matrix of the task gradients (``(B, T, T)`` with ``granularity=``:
                one per block; return ``(B, T)``).
            losses: the ``(T,)`` loss values (``None`` when the class sets ``uses_loss_values = False``).

        Returns:
            ``w`` ``(T,)``: the update is ``Σ_t w_t g_t``. Read nothing back to the host here (no
            ``.item()``): the step stays free of synchronisations.
        """
        raise NotImplementedError

    def _elementwise(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """For a method that combines ``J`` itself (GradDrop): ``(J, out) → out`` on the sum scale."""
        return None

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _check_method_state(self, state: dict[str, Any]) -> None:
        pass

    def _load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def _identity(self) -> dict[str, Any]:
        """The method and its options, which every rank of a distributed run must share."""
        return {"method": type(self).__name__}

    def _generator(self) -> torch.Generator | None:
        return None

    def _draws_and_state(self) -> Any:
        """What a random or stateful method's weights depend on besides ``G`` (``None``: nothing)."""
        return None

    def _restore_draws_and_state(self, saved: Any) -> None:
        pass

    # ------------------------------------------------------------------ backward

    @eager
    def backward(self, losses: Losses, *, features: torch.Tensor | None = None, scaler: Any = None) -> None:
        """Per-task gradients → surgery → ``.grad`` of every parameter the losses reach.

        ``features``: the shared representation every task head reads (representation mode): the
        weights come from the Gram matrix of ``∂L_t/∂features`` and one backward through the encoder
        carries ``Σ_t w_t ∂L_t/∂features``; the heads, and any path from a loss to an encoder
        parameter that bypasses ``features``, get their plain gradients.

        ``scaler``: a ``torch.amp.GradScaler`` that scales the losses (the same as passing
        ``scaler.scale(losses)``: the methods are positively homogeneous).

        Called inside an autocast region (as frameworks do), the wrapper leaves it for its own
        arithmetic: the Gram matrix and the combine run in the gradients' precision, as a backward
        outside the region would.

        Inside a ``torch.compile``d training step it runs eagerly (one graph break): it is ``T`` calls
        of ``torch.autograd.grad``, which dynamo does not trace, and host-side bookkeeping; the
        forward before it and the optimizer step after it compile as usual.

        Args:
            losses: the ``T`` scalar losses: a sequence of 0-d tensors or a 1-D tensor.
            features: the shared representation, for representation mode (see above).
            scaler: a ``torch.amp.GradScaler``, for mixed precision.

        Raises:
            TypeError: ``losses`` is not a sequence of tensors or a 1-D tensor.
            ValueError: a loss is not a scalar or not floating point, no loss requires grad, or the
                number of tasks differs from the steps being accumulated (named with the values);
                ``scaler=`` with ``nonfinite="skip"``; under torch.distributed, a parameter the
                losses reach that the wrapped optimizer does not hold.
            NonFiniteGradientError: with ``nonfinite="raise"``, a task's gradient holds NaN/Inf; its
                ``.tasks`` names them. No ``.grad``, parameter or optimizer state changed.
        """
        with outside_autocast(losses):
            self._backward(losses, features, scaler)

    def _backward(self, losses: Losses, features: torch.Tensor | None, scaler: Any) -> None:
        if self._single_by_default and _distributed.started_since():
            raise ValueError(
                "this wrapper was built before torch.distributed.init_process_group, so it runs as a single "
                "process and nothing would average the ranks' gradients: build it after init_process_group (or, "
                "to train each rank on its own, pass process_group=torch.distributed.new_group([rank]))"
            )
        if not isinstance(losses, (list, tuple, torch.Tensor)) and isinstance(losses, Iterator):
            losses = list(losses)  # read once, by the checks here and the path below
        if scaler is not None:
            check_scaler_policy(self.nonfinite)
            losses = _scaled(losses, scaler)
        try:
            checked = check_losses(losses)
        except (TypeError, ValueError):
            if self._dist is None:
                raise
            # Bad input on one rank is refused by every rank together (see gradsurgery.distributed).
            return self._dist.backward(self._call(losses, features))
        # What loss.backward() would also do: the other leaves' gradients (computed first, written
        # only if this call is not refused) and the post-accumulate hooks (see gradsurgery.leaves).
        extra = _leaves.beyond(checked, all_params(self.optimizer))
        if not extra:
            self._backward_checked(checked, features)
            return
        outside = sum(isinstance(leaf, torch.nn.Parameter) for leaf in extra.leaves)
        if self._dist is not None and outside:
            # DDP would average their gradients over the ranks; this wrapper does not know them. Refused
            # through the ranks' agreement, so that every rank raises and none waits for the others.
            refusal = ValueError(
                f"with torch.distributed, every parameter the losses reach must be in the wrapped optimizer: {outside} "
                "are not (a second optimizer's?)"
            )
            return self._dist.backward(self._call(checked, features, refusal=refusal))
        extra_grads = _leaves.gradients(checked, extra.leaves)
        already_skipped = self._accumulation.skip
        self._backward_checked(checked, features)
        if self._accumulation.skip and not already_skipped:
            return
        _leaves.accumulate(extra.leaves, extra_grads)
        _leaves.run_post_accumulate_hooks([*extra.hooked, *extra.leaves])

    def _backward_checked(self, checked: list[torch.Tensor], features: torch.Tensor | None) -> None:
        # A step's surgery is redone on every accumulated call, from the draws and state the step
        # started with: the last call's is then the one a single call on the whole batch makes.
        if not self._accumulation.continues():
            self._step_start = self._draws_and_state()
        elif self._step_start is not None:
            self._restore_draws_and_state(self._step_start)
        if self._dist is not None:
            return self._dist.backward(self._call(checked, features))
        cheap = self._cheap
        if cheap.every == 1 and cheap.tasks_per_step is None:
            self._backward_full(checked, features)
            return
        if cheap.tasks_per_step is not None and cheap.tasks_per_step > len(checked):
            raise ValueError(f"tasks_per_step={cheap.tasks_per_step} is more than the {len(checked)} losses given")
        if not self._accumulation.continues():
            cheap.start_step(len(checked))
            k, generator = cheap.tasks_per_step, cheap.generator
            cheap.draw = draw(len(checked), k, generator) if k is not None and generator is not None else None
        if cheap.refreshing:
            self._backward_refresh(checked, features)
        else:
            self._backward_weighted(checked)

    def _backward_full(self, losses: Losses, features: torch.Tensor | None) -> None:
        prepared = self._prepare(losses, features, write_early=True)
        if prepared.features is not None:
            self._backward_features(prepared, prepared.features)
        else:
            assert prepared.parameters is not None
            self._backward_parameters(prepared, prepared.parameters)

    def _backward_refresh(self, losses: list[torch.Tensor], features: torch.Tensor | None) -> None:
        """A full step (on the drawn tasks with ``tasks_per_step``) whose weights, over all ``T`` tasks,
        the steps until the next refresh reuse."""
        cheap = self._cheap
        T = len(losses)
        drawn = cheap.draw
        fused = self._layout.sharing is not None and bool(self._layout.sharing.owners)
        if drawn is not None and self._layout.explicit_shared is None and (fused or one_tensor(losses)):
            raise ValueError(
                "tasks_per_step with losses fused into one tensor (a stacked or vectorised loss, a compiled model): "
                "which head belongs to which task cannot be told apart from step to step; pass shared= to name the "
                "shared parameters, or pass the losses as separate tensors"
            )
        self._slots = drawn
        if drawn is not None:
            # The full step below sees k slots: a loaded checkpoint's T is checked here, against the T losses.
            check_task_count(T, None, self._layout.checkpoint_tasks)
            self._layout.checkpoint_tasks = None
        try:
            self._backward_full(losses if drawn is None else pseudo_losses(losses, drawn), features)
        finally:
            self._slots = None
        self._layout.num_tasks = T  # what a checkpoint records: the tasks, not the slots
        weights = self.last_weights
        if weights is None:  # refused (skip), or nothing shared: the next step refreshes again
            cheap.weights = None
            return
        if cheap.every > 1 and self.nonfinite == "propagate" and not bool(weights.isfinite().all()):
            # An overflowing refresh (its .grad is NaN: the GradScaler skips it) must not set the
            # weights of the steps until the next one: refresh again. One host read per refresh.
            cheap.weights = None
            return
        cheap.weights = weights if drawn is None else expand(weights, drawn, T)
        # The heads' owners serve the weighted steps between refreshes: with every=1 there are none
        # (a graph walk per step saved).
        cheap.owners, cheap.plain = self._owners(losses, features) if cheap.every > 1 else ({}, set())
        self._outcome.refreshed = True

    def _owners(self, losses: list[torch.Tensor], features: torch.Tensor | None) -> tuple[dict[int, int], set[int]]:
        """For the parameters outside the surgery (the shared set; the encoder in representation mode):
        the task of each that one task reaches (a head), as the graph and the sharing tell, and those
        several tasks reach (outside an explicit ``shared=``, or heads of fused losses it names):
        between refreshes they get their plain gradient."""
        params = [p for p in all_params(self.optimizer) if p.requires_grad]
        sharing = self._layout.sharing if features is None else None
        if features is not None:
            surgery = params_upstream_of(features)
        else:
            surgery = sharing.shared if sharing is not None else set()
        owners = dict(sharing.owners) if sharing is not None else {}
        plain: set[int] = set()
        for p, column in zip(params, zip(*reach(losses, params))):
            if id(p) in surgery or id(p) in owners:
                continue
            tasks = [t for t, hit in enumerate(column) if hit]
            if len(tasks) == 1:
                owners[id(p)] = tasks[0]
            elif tasks:
                plain.add(id(p))
        return owners, plain

    def _backward_weighted(self, losses: list[torch.Tensor]) -> None:
        """Between refreshes: one backward of ``Σ_t w_t L_t``; each head's gradient divided by its task's
        weight (its plain gradient); a parameter outside the surgery that several tasks reach gets
        its plain gradient from a second backward of ``Σ_t L_t``, restricted to it."""
        cheap = self._cheap
        assert cheap.weights is not None
        T = len(losses)
        params = [p for p in all_params(self.optimizer) if p.requires_grad]
        weights = backward_weights(cheap.weights)
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        plain = [i for i, p in enumerate(params) if id(p) in cheap.plain]
        weighted = [i for i, p in enumerate(params) if id(p) not in cheap.plain]
        grads: list[torch.Tensor | None] = [None] * len(params)
        found = torch.autograd.grad(
            stacked, [params[i] for i in weighted], grad_outputs=weights.to(stacked.dtype), retain_graph=bool(plain), allow_unused=True
        )
        for i, g in zip(weighted, found):
            grads[i] = g
        if plain:
            ones = torch.ones_like(stacked)
            for i, g in zip(plain, torch.autograd.grad(stacked, [params[i] for i in plain], grad_outputs=ones, allow_unused=True)):
                grads[i] = g
        if self.nonfinite != "propagate":
            values = stacked.detach()
            bad = (~values.isfinite()).nonzero().flatten().tolist()
            present = [g for g in grads if g is not None]
            if not bad and present and not bool(grad_peaks(present).isfinite().all()):
                bad = list(range(T))
            if self._refuse_nonfinite(bad, T):
                return
        for i, p in enumerate(params):
            owner, grad = cheap.owners.get(id(p)), grads[i]
            if owner is not None and grad is not None:
                grads[i] = grad / weights[owner].to(grad.dtype)
        accumulation = self._accumulation
        if not accumulation.continues():
            accumulation.start()
        _apply.write_specific([(p, [g]) for p, g in zip(params, grads) if g is not None])
        accumulation.tasks = T
        accumulation.unstepped = True
        if self._layout.buffer is not None:
            accumulation.wrote(self._layout.buffer)
        else:  # representation mode: no buffer, the step ends when any .grad written here changes
            accumulation.written = Written.of([p for p, g in zip(params, grads) if g is not None])
        self._outcome.refreshed = False

    def _cheap_state(self) -> dict[str, Any]:
        cheap = self._cheap
        if cheap.every == 1 and cheap.tasks_per_step is None:
            return {}
        index = {id(p): i for i, p in enumerate(all_params(self.optimizer))}
        return {
            "cheap": {
                "steps": cheap.steps,
                "weights": None if cheap.weights is None else cheap.weights.clone(),
                "owners": {index[pid]: t for pid, t in cheap.owners.items() if pid in index},
                "plain": sorted(index[pid] for pid in cheap.plain if pid in index),
                "generator": None if cheap.generator is None else cheap.generator.get_state(),
            }
        }

    def _load_cheap_state(self, state: dict[str, Any]) -> None:
        saved = state.get("cheap")
        if saved is None:
            return
        cheap = self._cheap
        params = all_params(self.optimizer)
        cheap.steps = saved["steps"]
        cheap.weights = saved["weights"]
        cheap.owners = {id(params[i]): t for i, t in saved["owners"].items()}
        cheap.plain = {id(params[i]) for i in saved.get("plain", [])}
        if cheap.generator is not None and saved["generator"] is not None:
            cheap.generator.set_state(saved["generator"].cpu())

    def _prepare(self, losses: Losses, features: torch.Tensor | None, *, write_early: bool) -> Prepared:
        return prepare(
            losses,
            features,
            self.optimizer,
            self._layout,
            self._accumulation,
            self._grad_options,
            reads_losses=self.uses_loss_values,
            write_early=write_early,
        )

    def _weights_of(self, losses: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        slots = self._slots
        if slots is None:
            return lambda G: to_reduction(self._weights(G, losses), self.reduction)

        def of_slots(G: torch.Tensor) -> torch.Tensor:
            # tasks_per_step: the last row is the sum of the others' gradients; their mean chooses the
            # weights, and "mean" is over the T tasks, not the k slots.
            w = self._weights(mean_rows(G, slots), mean_last(losses, slots))
            return w / (len(slots.chosen) + len(slots.rest)) if self.reduction == "mean" else w

        return of_slots

    def _weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        """:meth:`weights` for one Gram matrix, or for each block's (``granularity=``): a method of
        the registry solves them as one batch; a subclass's ``weights`` is called block by block.
        Checked: one weight per task (and block)."""
        w = self.weights(G, losses) if G.dim() == 2 else torch.stack([self.weights(block, losses) for block in G])
        return _checked_weights(type(self).__name__, w, G)

    def _call(
        self, losses: Losses, features: torch.Tensor | None, *, refusal: Exception | None = None
    ) -> _distributed.BackwardCall:
        """This call as torch.distributed sees it: explicit state and callables, no wrapper internals.
        ``refusal``: raised by its preparation, so that the ranks agree on it."""

        def prepare() -> Prepared:
            if refusal is not None:
                raise refusal
            prepared = self._prepare(losses, features, write_early=False)
            grads = prepared.parameters or prepared.features
            if grads is not None and any(g.is_sparse for _, row in grads.specific for g in row):
                raise ValueError(
                    "sparse gradients of task-specific parameters (nn.Embedding(sparse=True)) are not averaged over "
                    "torch.distributed ranks: use a dense embedding, or pass it in shared= (shared gradients are dense)"
                )
            return prepared

        return _distributed.BackwardCall(
            prepare=prepare,
            layout=self._layout,
            accumulation=self._accumulation,
            options=self._grad_options,
            reduction=self.reduction,
            weights_of=self._weights_of,
            elementwise=self._elementwise(),
            identity=self._identity(),
            generator=self._generator(),
            record=self._record,
        )

    def _backward_parameters(self, prepared: Prepared, grads: PreparedGradients) -> None:
        """Check for NaN/Inf, then write every ``.grad`` and run the surgery (one process)."""
        buffer = grads.buffer
        accumulate = prepared.accumulate
        # Non-finite check before any .grad changes. A fresh buffer is checked through the diagonal of
        # its Gram matrix (free: the surgery needs it); accumulating, the incoming rows are checked
        # before they are added, so that a refused batch leaves the accumulated ones intact.
        G = None
        in_range = False
        if buffer is not None and not accumulate:
            _apply.write_fresh_rows(grads)
            G, in_range = rescue_gram(buffer.matrix, self._grad_options, buffer.blocks)
        if self.nonfinite != "propagate":
            checked = per_task(grads.specific, grads.specific_tasks, prepared.num_tasks)
            if accumulate:
                for t, rows in enumerate(grads.shared_rows):
                    checked[t] += rows.values()
            # The rescue check read G's diagonal back already: when it was in range and nothing else
            # needs checking, a second host sync would find nothing.
            whole = None if G is None else G if G.dim() == 2 else G.sum(0)
            values = prepared.loss_values
            if (not in_range or any(checked) or values is not None) and self._refuse_nonfinite(
                nonfinite_tasks(whole, checked, values), prepared.num_tasks
            ):
                return
        # From here on, .grad changes.
        _apply.open_writes(grads, self._layout, self._accumulation, accumulate=accumulate)
        if accumulate:
            _apply.add_rows(grads)
        _apply.write_specific(grads.specific)
        _apply.count(prepared, self._layout, self._accumulation, grads.reach_masks)
        if buffer is None:
            self._outcome.gram = self._outcome.weights = None
            self._accumulation.wrote(None)
            return
        result = aggregate(
            buffer.matrix,
            _apply.targets(buffer),
            self._weights_of(self._accumulation.losses),
            backend=self.backend,
            G=G,
            rescue=self.nonfinite != "propagate",
            elementwise=self._elementwise(),
            plain=_apply.plain_spans(buffer, self._accumulation),
            blocks=buffer.blocks,
            unchecked=self.nonfinite == "propagate",
        )
        _apply.attach(buffer, self._accumulation)
        self._record(result)

    def _backward_features(self, prepared: Prepared, grads: FeatureGradients) -> None:
        """Representation mode (one process)."""
        T = prepared.num_tasks
        J = grads.rows
        G, _ = rescue_gram(J, self._grad_options)
        if self.nonfinite != "propagate":
            heads = per_task(grads.specific, grads.specific_tasks, T)
            if self._refuse_nonfinite(nonfinite_tasks(G, heads, prepared.loss_values), T):
                return
        combined = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
        result = aggregate(J, [Target(slice(None), combined)], self._weights_of(prepared.loss_values), backend=self.backend, G=G, elementwise=self._elementwise(), unchecked=self.nonfinite == "propagate")
        encoder_grads = through_features(grads, combined, features_extra(J, combined, result, self.backend) if grads.bypass else None)
        if self.nonfinite != "propagate" and grads.bypass:
            # Only the paths around the features are new here: a NaN there is every task's at once.
            norms = grad_peaks([g for g in encoder_grads if g is not None])
            if not bool(norms.isfinite().all()) and self._refuse_nonfinite(list(range(T)), T):
                return
        pairs = [(p, [g]) for p, g in zip(grads.encoder, encoder_grads) if g is not None]
        _apply.write_specific(pairs + grads.specific)
        self._layout.num_tasks = T
        self._layout.checkpoint_tasks = None
        self._accumulation.unstepped = True
        if self._cheap.every > 1 or self._cheap.tasks_per_step is not None:
            # The cheap modes count steps, not calls: later calls before the gradients are cleared
            # or changed belong to this step.
            self._accumulation.tasks = T
            self._accumulation.written = Written.of([p for p, _ in pairs + grads.specific])
        self._record(result)

    def _refuse_nonfinite(self, bad: list[int], num_tasks: int) -> bool:
        """Apply the non-finite policy to the tasks in ``bad``: raise, or mark the step skipped (True)."""
        if not bad:
            return False
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN/Inf, or a squared norm that overflows), or a non-finite loss value where "
                f"the method reads them, for task(s) {bad}; "
                "no .grad, parameter or optimizer state was changed",
                tasks=bad,
            )
        self._accumulation.skipped(num_tasks)
        self._outcome.gram = self._outcome.weights = None  # not left to be read as this step's
        return True

    def _record(self, result: Aggregate) -> None:
        self._outcome.gram, self._outcome.weights = result.gram, result.weights

    # ------------------------------------------------------------------ introspection

    @property
    def _buffer(self) -> SharedBuffer | None:
        """The shared parameters' buffer (tests and benchmarks look at its layout)."""
        return self._layout.buffer

    @overload
    def diagnostics(self, *, flat: Literal[False] = False) -> Diagnostics: ...
    @overload
    def diagnostics(self, *, flat: Literal[True]) -> dict[str, float]: ...
    @overload
    def diagnostics(self, *, flat: bool) -> Diagnostics | dict[str, float]: ...

    def diagnostics(self, *, flat: bool = False) -> Diagnostics | dict[str, float]:
        """The last step's gradient norms, cosine similarities, conflicts and weights as plain floats
        (:class:`~gradsurgery.hints.Diagnostics`).

        ``flat=True`` returns ``{name: float}`` with stable names — ``norm/<t>``, ``cos/<i>-<j>`` (``i < j``),
        ``weight/<t>``, ``conflicts`` (and ``refreshed`` with ``every=``) — ready for
        ``SummaryWriter.add_scalars``, Lightning's ``log_dict`` or any dict-logging tracker. With
        ``granularity=`` the norms, cosines and conflicts are the whole shared gradient's (the sum of the
        blocks' Gram matrices) and ``blocks`` holds one report per block (flat: ``block/<b>/...``).

        This reads tensors back to the host: call it when logging, not on every step of a fast loop.

        Args:
            flat: ``{name: float}`` for loggers instead of the nested report.

        Raises:
            RuntimeError: before the first :meth:`backward`, when the last one had no shared
                parameter (no Gram matrix), or when the step is skipped (``nonfinite="skip"``).
        """
        if self._accumulation.skip:
            raise RuntimeError(
                "this step is skipped (nonfinite='skip': a backward() since the gradients were last cleared had a "
                "non-finite gradient), so there is no Gram matrix or weights to report for it"
            )
        if self._layout.num_tasks is not None and self.last_gram is None:
            raise RuntimeError(
                "the last backward() had no shared parameters (each parameter was reached by one task), so there "
                "was no Gram matrix or weights to report"
            )
        if self.last_gram is None:
            raise RuntimeError("diagnostics() needs a backward() first")
        from .diagnostics import flatten, gram_diagnostics, to_floats

        G, w = self.last_gram, self.last_weights
        if G.dim() == 3:  # granularity=: the blocks partition the shared parameters, so their Grams sum to the whole
            report = cast(Diagnostics, to_floats(gram_diagnostics(G.sum(0), None)))
            report["blocks"] = [
                cast(Diagnostics, to_floats(gram_diagnostics(G[b], None if w is None else w[b]))) for b in range(G.shape[0])
            ]
        else:
            report = cast(Diagnostics, to_floats(gram_diagnostics(G, w)))
        if self.every > 1:
            report["refreshed"] = self.refreshed
        return flatten(report) if flat else report


class MethodWrapper(GradSurgery):
    """A wrapper built from a :class:`~gradsurgery.methods.spec.Method` (see
    :func:`gradsurgery.wrappers.wrapper_class`)."""

    method: Method

    def __init__(self, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        method = self.method
        own = {name: options.pop(name) for name in [o.name for o in method.options] if name in options}
        seed = options.pop("seed", None) if method.random else None
        for name in method.fixed:
            if name in options:
                raise ValueError(f"{method.name} fixes {name}={method.fixed[name]!r}; it takes no {name}= of its own")
        checked = method.checked(own)
        if method.random:
            _check_seed(seed)
        sync = options.get("sync", "exact")
        if method.combine is not None and sync == "sharded":
            raise ValueError(
                f'{method.name} draws its random numbers per column of the buffer: sync="sharded" splits the columns '
                'across ranks and would repeat the draws on each; use sync="exact" (the same update, more traffic)'
            )
        if method.combine is not None and options.get("every", 1) != 1:
            raise ValueError(f"{method.name} has no weights to reuse between steps: every= does not apply to it")
        if method.state is not None and options.get("tasks_per_step") is not None:
            raise ValueError(
                f"{method.name}'s state belongs to the tasks, step after step; tasks_per_step= would mix other tasks "
                "into its pseudo-task every step"
            )
        if method.state is not None and sync == "local":
            raise ValueError(
                f'{method.name} carries state from step to step, which sync="local" would let drift apart on each '
                'rank; use sync="exact" or "sharded"'
            )
        super().__init__(optimizer, **method.fixed, **options)
        self.options = checked
        self.uses_loss_values = method.uses_losses(checked)
        for name, value in checked.items():
            setattr(self, name, value)
        if method.random:
            params = all_params(optimizer)
            device = params[0].device if params else torch.device("cpu")
            drawn = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
            if seed is None and self._dist is not None:
                drawn = self._dist.broadcast_seed(drawn)  # every rank must draw the same numbers
            self._outcome.seed = drawn
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(drawn)

    @property
    def seed(self) -> int | None:
        """The seed of the wrapper's generator (random methods)."""
        return self._outcome.seed

    def _weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        # A method's spec takes a batch of Gram matrices (granularity=: one per block).
        return _checked_weights(self.method.name, self.weights(G, losses), G)

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        method = self.method
        weights_of = method.weights
        if weights_of is None:
            raise TypeError(f"{method.name} weights the losses: it has no weights from a Gram matrix")
        extra: dict[str, Any] = {}
        if method.uses_losses(self.options):
            extra["losses"] = losses
        if method.random:
            extra["generator"] = self.generator
        if method.solve is not None:
            extra["solve"] = _backend.solvers(self.backend, G).get(method.solve)
        if method.state is None:
            weights: torch.Tensor = weights_of(G, reduction="sum", **self.options, **extra)
            return weights
        T = G.shape[-1]
        outcome = self._outcome
        batch = G.shape[:-2]
        state = outcome.method_state
        if state is None or state_tasks(state) != T or next(iter(state.values())).shape[: len(batch)] != batch:
            outcome.method_state = {k: v.expand(*batch, *v.shape).clone() for k, v in method.state.init(T, G.device).items()}
        stateful: tuple[torch.Tensor, dict[str, torch.Tensor]]
        stateful = weights_of(G, reduction="sum", **self.options, **extra, state=outcome.method_state)
        w, outcome.method_state = stateful
        return w

    def _elementwise(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        combine = self.method.combine
        if combine is None:
            return None
        generator = getattr(self, "generator", None)
        reduction, backend, options = self.reduction, self.backend, self.options
        return lambda J, out: combine(J, out=out, reduction=reduction, generator=generator, backend=backend, **options)

    def _identity(self) -> dict[str, Any]:
        return {"method": type(self).__name__, **{name: repr(value) for name, value in self.options.items()}}

    def _generator(self) -> torch.Generator | None:
        return getattr(self, "generator", None)

    def _draws_and_state(self) -> Any:
        generator = getattr(self, "generator", None)
        state = self._outcome.method_state
        if generator is None and self.method.state is None:
            return None
        return (
            None if generator is None else generator.get_state(),
            None if state is None else {k: v.clone() for k, v in state.items()},
        )

    def _restore_draws_and_state(self, saved: Any) -> None:
        generator_state, state = saved
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self._outcome.method_state = None if state is None else {k: v.clone() for k, v in state.items()}

    def _method_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.method.random:
            out.update(seed=self.seed, generator=self.generator.get_state())
        if self.method.state is not None:
            state = self._outcome.method_state
            out["state"] = None if state is None else {k: v.detach().clone() for k, v in state.items()}
        return out

    def _check_method_state(self, state: dict[str, Any]) -> None:
        saved = state.get("state")
        if self.method.state is not None and saved is not None:
            tasks = state_tasks(saved)
            if self._layout.num_tasks is not None and tasks != self._layout.num_tasks:
                raise ValueError(f"checkpoint's {self.method.name} state is for {tasks} tasks, not {self._layout.num_tasks}")
            # One state per block with granularity=, one in all otherwise: a checkpoint of the other
            # kind, or of another number of blocks, would be dropped or fail at the next backward.
            initial = self.method.state.init(tasks, torch.device("cpu"))
            shapes = {tuple(saved[k].shape[: saved[k].dim() - v.dim()]) for k, v in initial.items() if k in saved}
            theirs = shapes.pop() if len(shapes) == 1 else None
            buffer = self._layout.buffer
            if self._layout.granularity is None:
                mine: tuple[int, ...] | None = ()
            else:  # the number of blocks is known from the first backward on
                mine = (len(buffer.blocks.blocks),) if buffer is not None and buffer.blocks is not None else None
            fits = theirs is not None and (theirs == mine if mine is not None else theirs != ())
            if not fits:
                here = "one block (granularity='all')" if mine == () else f"blocks {mine or 'per block'}"
                raise ValueError(
                    f"checkpoint's {self.method.name} state has block shape {theirs} but this wrapper has {here}: "
                    "load it into a wrapper with the granularity it was saved with"
                )

    def _load_method_state(self, state: dict[str, Any]) -> None:
        if self.method.random and "generator" in state:
            self._outcome.seed = state["seed"]
            self.generator.set_state(state["generator"].cpu())  # a framework may have moved it to the device
        if self.method.state is not None and "state" in state:
            saved = state["state"]
            device = self.generator.device if self.method.random else None
            self._outcome.method_state = None if saved is None else {k: v.to(device) if device else v.clone() for k, v in saved.items()}


def _checked_weights(name: str, w: object, G: torch.Tensor) -> torch.Tensor:
    """A method's weights, checked: one per task (and block) for ``G`` ``(..., T, T)`` — a user's method
    that gets it wrong is told so, not left to the combine's shape errors."""
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(G.shape[:-1]) or not w.is_floating_point():
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(
            f"{name}'s weights must be a floating-point tensor of shape {tuple(G.shape[:-1])} (one per task"
            f"{', per block' if G.dim() > 2 else ''}) for G of shape {tuple(G.shape)}, got {got}"
        )
    return w


def _scaled(losses: Losses, scaler: Any) -> Losses:
    """The losses scaled by a ``GradScaler``; bad losses are passed on as they are, to be refused inside
    ``backward`` (where distributed training reports the error to every rank)."""
    try:
        checked = check_losses(losses)
    except (TypeError, ValueError):
        return losses
    # Each loss scaled on its own: stacked, they would be one fused tensor, whose heads the graph
    # cannot tell apart (see gradsurgery.sharing).
    scaled: list[torch.Tensor] = scaler.scale(checked)
    return scaled


def state_tasks(state: dict[str, torch.Tensor]) -> int:
    """T of a method's state: the last dimension of its tensors."""
    return next(iter(state.values())).shape[-1]


def _check_seed(seed: Any) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
