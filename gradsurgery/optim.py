"""Optimizer wrappers: any ``torch.optim`` optimizer, with the shared gradient replaced by surgery.

Orchestration only: ``taskgrads`` fills the ``(T, P)`` buffer, ``backend`` computes the Gram matrix and
combines, ``methods`` turns the Gram matrix into weights.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from . import backend as _backend
from . import distributed as _distributed
from .errors import NonFiniteGradientError
from .methods import cagrad as _cagrad
from .methods import mgda as _mgda
from .methods import pcgrad as _pcgrad
from .methods._common import check_reduction, to_reduction
from .methods._simplex import DEFAULT_ITERATIONS
from .taskgrads import ENGINES, SharedBuffer, reach, task_gradients

Losses = Sequence[torch.Tensor] | torch.Tensor
NONFINITE_POLICIES = ("raise", "skip", "propagate")
SpecificGradients = list[tuple[torch.Tensor, list[torch.Tensor]]]  # a parameter and its tasks' gradients


@dataclass
class PreparedGradients:
    """Parameter mode, before anything is written: what the tasks' gradients are and where they go."""

    grads: list[list[torch.Tensor | None]]  # per task, per trainable parameter (None: not reached)
    shared: list[torch.Tensor]
    shared_rows: list[dict[int, torch.Tensor]]  # per task: id(shared parameter) → its gradient not yet written
    specific: SpecificGradients


@dataclass
class FeatureGradients:
    """Representation mode, before anything is written."""

    encoder: list[torch.Tensor]  # the parameters upstream of the features
    rows: torch.Tensor  # (T, numel of features): ∂L_t/∂features
    specific: SpecificGradients  # the heads' plain gradients


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
        if storage_dtype is not None and (not isinstance(storage_dtype, torch.dtype) or not storage_dtype.is_floating_point):
            raise ValueError(f"storage_dtype must be a floating-point torch.dtype, got {storage_dtype!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        _distributed.check_sync(sync)
        params = _all_params(optimizer)
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
        self._pending_tasks: int | None = None
        self._pending_losses: torch.Tensor | None = None
        self._num_tasks: int | None = None  # T of the last backward, or of a loaded checkpoint
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
        if self._skip_step:
            self._skip_step = False
            self.skipped_steps += 1
            return None
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every ``.grad`` (as the inner optimizer does) and the accumulated per-task gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending_tasks = None
        self._pending_losses = None

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"gradsurgery"`` entry with the method's own state."""
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
        carries ``Σ_t w_t ∂L_t/∂features``; the heads get their own plain gradients.
        """
        if self._dist is not None:
            return self._dist.backward(self, losses, features)
        losses, params, loss_values = self._begin(losses, values=self.uses_loss_values)
        T = len(losses)
        if features is not None:
            self._backward_features(losses, features, params, loss_values)
            self._num_tasks = T
            return
        accumulate = self._pending_tasks is not None
        if self._buffer is None:
            # First call: lay the buffer out from a walk of the autograd graph (no backward needed),
            # so that the rows can be written early from the very first step.
            shared = self._shared_params(params, reach(losses, params))
            if shared:
                self._ensure_buffer(shared, T)
        # With a buffer laid out and nothing accumulated, each task's shared gradients go into its
        # row as soon as they exist, so at most one task's full gradient is alive besides the buffer.
        early = None if accumulate or self._buffer is None else self._buffer
        on_task = None if early is None else lambda t, row: _write_row(early, t, params, row)
        prepared = self._task_gradients(losses, params, on_task=on_task)
        shared, shared_rows, specific = prepared.shared, prepared.shared_rows, prepared.specific
        shared_ids = {id(p) for p in shared}
        buffer = self._ensure_buffer(shared, T) if shared else None
        if early is not None and buffer is not early and buffer is not None:
            buffer.copy_rows_from(early)  # the layout grew: keep the rows already written

        # Non-finite check before any .grad changes. A fresh buffer is checked through the diagonal of
        # its Gram matrix (free: the surgery needs it); accumulating, the incoming rows are checked
        # before they are added, so that a refused batch leaves the accumulated ones intact.
        G = None
        in_range = False
        if buffer is not None and not accumulate:
            for t in range(T):  # what was not written early (everything, without a layout yet)
                buffer.write(t, shared_rows[t], accumulate=False, zero_missing=early is None)
            G = _backend.gram(buffer.matrix, backend=self.backend)
            if self.nonfinite != "propagate":
                G, in_range = _backend.rescued(buffer.matrix, G)
        if self.nonfinite != "propagate":
            specific_rows = [
                [g for p, g in zip(params, row) if g is not None and id(p) not in shared_ids] for row in prepared.grads
            ]
            checked = [specific_rows[t] + (list(shared_rows[t].values()) if accumulate else []) for t in range(T)]
            # The rescue check read G's diagonal back already: when it was in range and nothing else
            # needs checking, a second host sync would find nothing.
            if (not in_range or any(checked)) and self._refuse_nonfinite(_nonfinite_tasks(G, checked)):
                return
        if buffer is not None and accumulate:
            for t in range(T):
                buffer.write(t, shared_rows[t], accumulate=True)
        _accumulate_plain(specific)
        if loss_values is not None:
            self._pending_losses = loss_values if self._pending_losses is None else self._pending_losses + loss_values
        self._pending_tasks = T
        self._num_tasks = T
        if buffer is not None:
            self._surgery(buffer, G)

    def _refuse_nonfinite(self, bad: list[int]) -> bool:
        """Apply the non-finite policy to the tasks in ``bad``: raise, or mark the step skipped (True)."""
        if not bad:
            return False
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN/Inf, or a squared norm that overflows) for task(s) {bad}; "
                "no .grad, parameter or optimizer state was changed",
                tasks=bad,
            )
        self._skip_step = True
        return True

    def _surgery(self, buffer: SharedBuffer, G: torch.Tensor | None = None) -> None:
        if G is None:
            G = _backend.gram(buffer.matrix, backend=self.backend, rescue=self.nonfinite != "propagate")
        w = to_reduction(self.weights(G, self._pending_losses), self.reduction)
        for columns, update in buffer.groups:
            _backend.combine(w, buffer.matrix[:, columns], update, backend=self.backend, validate=False)
        buffer.attach_grads()
        self.last_gram, self.last_weights = G, w

    def _backward_features(
        self, losses: list[torch.Tensor], features: torch.Tensor, params: list[torch.Tensor], loss_values: torch.Tensor | None
    ) -> None:
        prepared = self._feature_gradients(losses, features, params)
        J = prepared.rows
        G = _backend.gram(J, backend=self.backend, rescue=self.nonfinite != "propagate")
        if self.nonfinite != "propagate" and self._refuse_nonfinite(_nonfinite_tasks(G, [[] for _ in losses])):
            return
        w = to_reduction(self.weights(G, loss_values), self.reduction)
        combined = _backend.combine(w, J, torch.empty(J.shape[1], dtype=J.dtype, device=J.device), backend=self.backend)
        _accumulate_plain(prepared.specific)
        features.backward(combined.view_as(features))
        self.last_gram, self.last_weights = G, w

    def _begin(
        self, losses: Losses, *, values: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Checks shared by every backward: the losses, the trainable parameters, the loss values
        (float64, unless ``values=False``)."""
        losses = _check_losses(losses)
        T = len(losses)
        if self._pending_tasks is not None and T != self._pending_tasks:
            raise ValueError(f"got {T} losses, but {self._pending_tasks} were accumulated since zero_grad()")
        if self._buffer is None and self._num_tasks is not None and T != self._num_tasks:
            raise ValueError(f"got {T} losses, but the loaded checkpoint was trained with {self._num_tasks}")
        params = [p for p in _all_params(self.optimizer) if p.requires_grad]
        if not params:
            raise ValueError("the optimizer holds no parameter that requires grad")
        if not values:
            return losses, params, None
        return losses, params, torch.stack([loss.detach().reshape(()) for loss in losses]).to(torch.float64)

    def _task_gradients(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        *,
        on_task: Callable[[int, list[torch.Tensor | None]], list[torch.Tensor | None]] | None = None,
    ) -> PreparedGradients:
        """Per-task gradients, checked, split into the shared rows and the task-specific ones."""
        grads = task_gradients(losses, params, engine=self._engine, chunk_size=self.chunk_size, on_task=on_task)
        if self._engine == "auto" and grads.engine == "batched":
            self._engine = "batched"  # vmap handles this graph: stop keeping it alive for a fallback
        for t, row in enumerate(grads.reached):
            if not any(row):
                raise ValueError(f"loss {t} reaches no parameter of the optimizer")
        shared = self._shared_params(params, grads.reached)
        shared_ids = {id(p) for p in shared}
        specific = [
            (p, [g for g in column if g is not None])
            for p, column in zip(params, zip(*grads.grads))
            if id(p) not in shared_ids
        ]
        shared_rows = [
            {id(p): g for p, g in zip(params, row) if g is not None and id(p) in shared_ids} for row in grads.grads
        ]
        return PreparedGradients(grads.grads, shared, shared_rows, [(p, g) for p, g in specific if g])

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
        specific = [(p, [g for g in column if g is not None]) for p, column in zip(heads, zip(*head_grads))]
        return FeatureGradients(encoder, torch.stack(rows), [(p, g) for p, g in specific if g])

    def _shared_params(self, params: list[torch.Tensor], reached: list[list[bool]]) -> list[torch.Tensor]:
        if self._explicit_shared is not None:
            return [p for p in params if id(p) in self._explicit_shared]
        current = [] if self._buffer is None else self._buffer.params
        current_ids = {id(p) for p in current}
        counts = [sum(column) for column in zip(*reached)]
        promoted = [p for p, n in zip(params, counts) if n > 1 and id(p) not in current_ids]
        if promoted and self._pending_tasks is not None:
            raise ValueError(
                "a parameter became shared between accumulated backward() calls; pass shared= to fix the set"
            )
        return [p for p in params if id(p) in current_ids or any(p is q for q in promoted)]

    def _ensure_buffer(self, shared: list[torch.Tensor], num_tasks: int) -> SharedBuffer:
        buffer = self._buffer
        if buffer is None or buffer.num_tasks != num_tasks or {id(p) for p in buffer.params} != {id(p) for p in shared}:
            buffer = self._buffer = SharedBuffer(shared, num_tasks, storage_dtype=self.storage_dtype)
        return buffer

    # ------------------------------------------------------------------ diagnostics

    def diagnostics(self) -> dict[str, Any]:
        """The last step's gradient norms, cosine similarities, conflicts and weights as plain floats.

        This reads tensors back to the host: call it when logging, not on every step of a fast loop.
        """
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
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
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


def _accumulate_plain(pairs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    """``p.grad += Σ grads`` (or ``=`` when ``None``), as ``loss.backward()`` would accumulate."""
    for p, grads in pairs:
        if not grads:
            continue
        total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
        if p.grad is None:
            p.grad = total.detach().clone() if len(grads) == 1 else total.detach()
        else:
            p.grad.add_(total)


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
        owner = torch.tensor([t for t, row in enumerate(checked) for _ in row], device=device)
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(tensors)])
        bad |= torch.zeros(T, device=device).index_add_(0, owner, (~norms.isfinite()).float()) > 0
    if G is not None:
        bad |= ~G.diagonal().isfinite()  # the diagonal: an off-diagonal NaN would blame both tasks
    return bad.nonzero().flatten().tolist()
