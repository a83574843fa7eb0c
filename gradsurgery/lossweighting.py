"""Loss-weighting methods: one backward of an objective of the losses, through the same wrapper API.

Where the gradient methods pay ``T`` backward passes for the per-task gradients, these (UW, DWA,
FAMO, GeometricMean, IMTL-L, STCH, ...) only need the loss values: each step backpropagates one
scalar, ``Σ_t w_t L_t`` or another function of the losses, so a step costs what
``sum(losses).backward()`` costs. Every ``.grad`` — heads included, weighted as the objective weights
them — is written as that backward would write it (accumulated, in each parameter's layout).

Learnable parameters of a method (UW's log-variances, IMTL-L's scales) are created at construction
for ``num_tasks`` tasks and added to the inner optimizer as a parameter group of their own (no weight
decay), so schedulers, ``GradScaler`` and checkpoints see them like any other parameter: construct LR
schedulers after the wrapper.
"""

from __future__ import annotations

from typing import Any, Literal, cast, overload

import torch

from . import leaves as _leaves
from .errors import NonFiniteGradientError
from .grads import Written, accumulate_plain, grad_peaks
from .hints import LossWeightingDiagnostics
from .methods.spec import Objective
from .optim import MethodWrapper, state_tasks
from .prepare import Losses, all_params, check_losses, check_real, check_scaler_policy, check_task_count, eager, outside_autocast


# Options of the gradient methods that mean nothing without per-task gradients.
NOT_APPLICABLE = (
    "shared",
    "storage_dtype",
    "engine",
    "chunk_size",
    "process_group",
    "sync",
    "every",
    "tasks_per_step",
    "granularity",
)


class LossWeightingWrapper(MethodWrapper):
    """A wrapper built from a loss-weighting :class:`~gradsurgery.methods.spec.Method`."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, num_tasks: int | None = None, **options: Any) -> None:
        loss = self._objective()
        if loss.learnable is not None and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1):
            raise ValueError(
                f"{self.method.name} learns one parameter per task: pass num_tasks= (a positive integer), got {num_tasks!r}"
            )
        for name in NOT_APPLICABLE:
            if name in options:
                raise ValueError(f"{self.method.name} computes no per-task gradients: {name}= does not apply to it")
        super().__init__(optimizer, **options)
        self.uses_loss_values = True  # the objective is a function of the losses
        if self._dist is not None:
            raise ValueError(
                f"{self.method.name} does not train over torch.distributed yet; construct it before "
                "torch.distributed.init_process_group, or use a gradient method"
            )
        self.num_tasks = num_tasks
        self.learned: dict[str, torch.Tensor] = {}
        if loss.learnable is not None:
            assert num_tasks is not None
            params = all_params(optimizer)
            device = params[0].device if params else torch.device("cpu")
            self.learned = {name: torch.nn.Parameter(value) for name, value in loss.learnable(num_tasks, device).items()}
            group: dict[str, Any] = {"params": list(self.learned.values())}
            if "weight_decay" in optimizer.defaults:
                group["weight_decay"] = 0.0
            optimizer.add_param_group(group)

    def _objective(self) -> Objective:
        loss = self.method.loss
        assert loss is not None
        return loss

    @eager
    def backward(self, losses: Losses, *, features: torch.Tensor | None = None, scaler: Any = None) -> None:
        """Backpropagate the method's objective of the losses once; ``.grad`` as that backward gives it.

        With mixed precision pass the unscaled losses and ``scaler=`` (a ``torch.amp.GradScaler``): the
        objective of the losses, not of scaled ones, is scaled (an objective like ``Σ log L_t`` or
        ``Σ exp(−s_t)·L_t + s_t`` is not homogeneous in the losses)."""
        with outside_autocast(losses):
            self._backward_objective(losses, features, scaler)

    def _backward_objective(self, losses: Losses, features: torch.Tensor | None, scaler: Any) -> None:
        if features is not None:
            raise ValueError(f"{self.method.name} weights the losses, not gradients: it takes no features=")
        if scaler is not None:
            check_scaler_policy(self.nonfinite)
        loss = self._objective()
        checked = check_losses(losses)
        T = len(checked)
        if self.num_tasks is not None and T != self.num_tasks:
            raise ValueError(f"got {T} losses, but {self.method.name} was built for num_tasks={self.num_tasks}")
        accumulation = self._accumulation
        # Whoever cleared or changed .grad since the last call (model.zero_grad() included) ends the
        # accumulation: a skipped batch is then forgotten, and the number of tasks may change.
        accumulating = accumulation.continues()
        check_task_count(T, accumulation.tasks if accumulating else None, self._layout.checkpoint_tasks)
        if not accumulating:
            accumulation.start()
            self._step_start = self._draws_and_state()
        elif self.method.random and self._step_start is not None:
            # RLW on losses draws once per step, as RLW on gradients does (the calls of an accumulation
            # are one step); the stateful methods' state counts calls (documented per method).
            self.generator.set_state(self._step_start[0])
        params = [p for p in all_params(self.optimizer) if p.requires_grad]
        check_real(params)
        stacked = torch.stack([value.reshape(()) for value in checked])
        if self.nonfinite != "propagate" or self._positive():
            self._check_values(stacked.detach())
        outcome = self._outcome
        state = outcome.method_state
        if state is None or (state and state_tasks(state) != T):
            state = loss.init(T, stacked.device)
        extra: dict[str, Any] = {"generator": self.generator} if self.method.random else {}
        objective, new_state = loss.objective(stacked, state=state, params=self.learned, **extra, **self.options)
        if self.reduction == "mean":
            objective = objective / T
        weights = torch.autograd.grad(objective, stacked, retain_graph=True)[0]
        if scaler is not None:
            objective = scaler.scale(objective)
        # The leaves the optimizer does not hold get the objective's gradient too, as from
        # objective.backward() (see gradsurgery.leaves).
        beyond = _leaves.beyond([objective], all_params(self.optimizer))
        targets = [*params, *beyond.leaves]
        grads = torch.autograd.grad(objective, targets, allow_unused=True)
        if self.nonfinite != "propagate":
            present = [g for g in grads if g is not None]
            if present and not bool(grad_peaks(present).isfinite().all()):
                self._refuse_nonfinite(list(range(T)), T)
                return
        if self.nonfinite == "propagate" and new_state:
            # A non-finite loss makes this step's gradients non-finite (GradScaler skips the step): the
            # method's state skips it too, on the device (FAMO's logits, DWA's history, STCH's warm-up).
            finite = stacked.detach().isfinite().all()
            new_state = {name: torch.where(finite, value, state[name]) if name in state and state[name].shape == value.shape else value for name, value in new_state.items()}
        # From here on, .grad and the method's state change.
        accumulate_plain([(p, [g]) for p, g in zip(targets, grads) if g is not None])
        accumulation.tasks = T
        accumulation.written = Written.of([p for p, g in zip(params, grads) if g is not None])
        _leaves.run_post_accumulate_hooks([*beyond.hooked, *beyond.leaves])
        outcome.method_state = new_state
        outcome.gram, outcome.weights = None, weights.detach().to(torch.float64)
        self._layout.num_tasks = T
        self._layout.checkpoint_tasks = None
        self._accumulation.unstepped = True

    def _positive(self) -> bool:
        positive = self._objective().positive
        return positive(self.options) if callable(positive) else positive

    def _check_values(self, values: torch.Tensor) -> None:
        """The loss values, read back once: non-finite ones follow the policy; a loss ≤ 0 is refused
        where the method takes its logarithm."""
        host = values.tolist()
        if self._positive():
            bad = [t for t, v in enumerate(host) if v <= 0]  # NaN follows the non-finite policy below
            if bad:
                raise ValueError(
                    f"{self.method.name} takes the logarithm of the losses: loss(es) {bad} are ≤ 0 "
                    f"({[host[t] for t in bad]}); nothing was changed"
                )
        bad = [t for t, v in enumerate(host) if v != v or v in (float("inf"), float("-inf"))]
        if bad and self.nonfinite == "raise":
            raise NonFiniteGradientError(f"non-finite loss for task(s) {bad}; nothing was changed", tasks=bad)

    def _refuse_nonfinite(self, bad: list[int], num_tasks: int) -> bool:
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                "non-finite gradient (NaN/Inf) in the backward of the weighted losses; no .grad, parameter or "
                "optimizer state was changed",
                tasks=bad,
            )
        self._accumulation.skipped(num_tasks)
        return True

    def _method_state(self) -> dict[str, Any]:
        out = super()._method_state()
        out["learned"] = {name: value.detach().clone() for name, value in self.learned.items()}
        state = self._outcome.method_state
        out["state"] = None if state is None else {k: v.detach().clone() for k, v in state.items()}
        return out

    def _check_method_state(self, state: dict[str, Any]) -> None:
        saved = state.get("state")
        if saved and self._layout.num_tasks is not None and state_tasks(saved) != self._layout.num_tasks:
            raise ValueError(
                f"checkpoint's {self.method.name} state is for {state_tasks(saved)} tasks, not {self._layout.num_tasks}"
            )
        for name, value in state.get("learned", {}).items():
            mine = self.learned.get(name)
            if mine is None or mine.shape != value.shape:
                raise ValueError(
                    f"checkpoint's {self.method.name} parameter {name!r} has shape {tuple(value.shape)}, "
                    f"not {None if mine is None else tuple(mine.shape)} (another number of tasks?)"
                )

    def _load_method_state(self, state: dict[str, Any]) -> None:
        super()._load_method_state(state)
        saved = state.get("state")
        self._outcome.method_state = None if saved is None else {k: v.clone() for k, v in saved.items()}
        with torch.no_grad():
            for name, value in state.get("learned", {}).items():
                self.learned[name].copy_(value)

    # A report of its own kind (no Gram matrix, so no norms or cosines): the override narrows nothing,
    # it replaces the gradient methods' report, which is why the type checkers are told.
    @overload  # type: ignore[override]
    def diagnostics(self, *, flat: Literal[False] = False) -> LossWeightingDiagnostics: ...
    @overload
    def diagnostics(self, *, flat: Literal[True]) -> dict[str, float]: ...
    @overload
    def diagnostics(self, *, flat: bool) -> LossWeightingDiagnostics | dict[str, float]: ...

    def diagnostics(self, *, flat: bool = False) -> LossWeightingDiagnostics | dict[str, float]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """The last step's effective weights ``∂objective/∂L_t`` as plain floats (there is no Gram
        matrix: no per-task gradient is computed); ``flat=True``: ``{"weight/<t>": float}``."""
        if self._accumulation.skip:
            raise RuntimeError("this step is skipped (nonfinite='skip': a non-finite gradient), so there are no weights to report")
        if self.last_weights is None:
            raise RuntimeError("diagnostics() needs a backward() first")
        from .diagnostics import flatten, to_floats

        report = cast(LossWeightingDiagnostics, to_floats({"weights": self.last_weights}))
        return flatten(report) if flat else report
