"""Everything a ``backward`` does before it writes: checks, per-task gradients, which parameters are
shared, the rows of the buffer. Nothing here touches ``.grad``, a parameter or optimizer state, so a
refusal (bad input, a non-finite gradient) leaves everything as it was.

Used by the single-process path (:mod:`gradsurgery.optim`) and by :mod:`gradsurgery.distributed`,
which prepares on every rank before the ranks agree.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, cast

import torch

from . import backend as _backend
from .grads import grad_peaks
from .kernels.blocks import BlockLayout
from .pipeline import Aggregate
from .sharing import Sharing, classify
from .state import Accumulation, Layout
from .taskgrads import SharedBuffer, reach, task_gradients

Losses = Sequence[torch.Tensor] | torch.Tensor
SpecificGradients = list[tuple[torch.Tensor, list[torch.Tensor]]]  # a parameter and its tasks' gradients


@dataclass(frozen=True)
class GradOptions:
    """The wrapper's options that decide how gradients are prepared."""

    nonfinite: str
    storage_dtype: torch.dtype | None
    chunk_size: int | None
    backend: str


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
    reach_masks: dict[int, int]  # id of each shared parameter some task reached on this call → bitmask of those tasks


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


@dataclass
class Prepared:
    """One ``backward`` call, checked and differentiated, nothing written yet."""

    losses: list[torch.Tensor]
    params: list[torch.Tensor]  # the trainable parameters of the optimizer
    loss_values: torch.Tensor | None  # float64, when the method reads them
    accumulate: bool  # adds to the calls since the gradients were last cleared
    parameters: PreparedGradients | None = None  # parameter mode
    features: FeatureGradients | None = None  # representation mode

    @property
    def num_tasks(self) -> int:
        return len(self.losses)


# ---------------------------------------------------------------------- the entry point


def prepare(
    losses: Losses,
    features: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    layout: Layout,
    accumulation: Accumulation,
    options: GradOptions,
    *,
    reads_losses: bool,
    write_early: bool,
) -> Prepared:
    """Check the call and compute every task's gradients (``write_early``: each task's shared rows go
    into the buffer as soon as they exist, so at most one task's full gradient is alive besides it)."""
    accumulate = accumulation.continues()
    checked = check_losses(losses)
    T = len(checked)
    check_task_count(T, accumulation.tasks if accumulate else None, layout.checkpoint_tasks)
    params = [p for p in all_params(optimizer) if p.requires_grad]
    if not params:
        raise ValueError("the optimizer holds no parameter that requires grad")
    check_real(params)
    values = torch.stack([loss.detach().reshape(()) for loss in checked]).to(torch.float64) if reads_losses else None
    prepared = Prepared(checked, params, values, accumulate)
    if features is not None:
        prepared.features = feature_gradients(checked, features, params)
    else:
        prepared.parameters = task_gradients_of(checked, params, layout, options, accumulate=accumulate, write_early=write_early)
        if prepared.parameters.shared and isinstance(optimizer, torch.optim.SparseAdam):
            raise ValueError(
                "SparseAdam takes sparse gradients only, and a shared parameter's .grad is the dense combination "
                "of the tasks' gradients: train the shared parameters with a dense optimizer (Adam), and keep "
                "SparseAdam for task-specific embeddings, or in a second optimizer, whose parameters get their "
                "plain (sparse) gradient"
            )
    return prepared


# ---------------------------------------------------------------------- parameter mode


def task_gradients_of(
    losses: list[torch.Tensor],
    params: list[torch.Tensor],
    layout: Layout,
    options: GradOptions,
    *,
    accumulate: bool,
    write_early: bool,
) -> PreparedGradients:
    """Per-task gradients, split into the shared rows and the task-specific ones."""
    T = len(losses)
    ids = [id(p) for p in params]
    relayout = layout.sharing is None or layout.sharing.num_tasks != T
    # Which parameters several tasks reach is read off the values on the first step (see
    # gradsurgery.sharing): the graph cannot tell a fused head from a shared trunk.
    measure = relayout and layout.explicit_shared is None and T > 1
    early = None
    if write_early and not accumulate:
        if not relayout:
            early = layout.buffer
        else:
            provisional = _layout_before_backward(losses, params, layout)
            layout.buffer = None  # the old layout's buffer goes before the new one is allocated
            if provisional:
                early = SharedBuffer(provisional, T, storage_dtype=options.storage_dtype)
    # A first-step buffer narrower than its parameters cannot give back a fused head's exact
    # gradient: the graph is kept to recompute it.
    narrow = measure and early is not None and early.matrix.dtype != torch.promote_types(early.matrix.dtype, _widest(early.params))
    norms: list[tuple[list[int], torch.Tensor]] = []

    def on_task(t: int, row: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        if measure:
            present = [i for i, g in enumerate(row) if g is not None]
            # The largest magnitude, not the 2-norm: squares of fp32 entries below ~1e-19 underflow to
            # 0, and a tiny but non-zero gradient must count as reaching the parameter.
            norms.append((present, grad_peaks([g for g in row if g is not None])))
        return row if early is None else _write_row(early, t, params, row)

    grads = task_gradients(
        losses,
        params,
        engine=layout.engine,
        chunk_size=options.chunk_size,
        on_task=on_task if (measure or early is not None) else None,
        keep_graph=narrow,
    )
    if layout.engine == "auto" and grads.engine == "batched":
        layout.engine = "batched"  # vmap handles this graph: stop keeping it alive for a fallback
    structural = grads.reached
    for t, row in enumerate(structural):
        if not any(row):
            raise ValueError(f"loss {t} reaches no parameter of the optimizer")
    _check_untrained(losses, params, structural, layout)
    sharing = _sharing_after(ids, structural, grads.grads, norms if measure else None, layout, options, accumulate=accumulate)
    reached = sharing.reached(ids, structural)
    # The owners' other tasks contribute zeros, checked on this step, or unchecked (propagate): then
    # they are summed like any task-specific gradient, so nothing is ever dropped.
    specific_reach = reached if options.nonfinite != "propagate" else structural
    buffer = _buffer_for(sharing, params, T, layout, options, early)
    if buffer is not None and buffer.blocks is None and layout.granularity is not None:
        buffer.blocks = BlockLayout(layout.granularity.blocks(buffer.params, buffer.columns))
    rows_written = early is not None and buffer is not None
    recomputed: dict[tuple[int, int], torch.Tensor] = {}
    if early is not None and early is not buffer:  # the first step's layout was not the final one
        if buffer is not None:
            buffer.copy_rows_from(early)
        recomputed = _rows_of_consumed(losses, params, specific_reach, sharing, early, narrow)
    consumed = early.param_ids if early is not None else frozenset()
    shared_ids = buffer.param_ids if buffer is not None else frozenset()
    shared_rows = [
        {pid: g for pid, g, hit in zip(ids, row, hits) if hit and g is not None and pid in shared_ids}
        for row, hits in zip(grads.grads, reached)
    ]
    specific: SpecificGradients = []
    specific_tasks: list[list[int]] = []
    reach_masks: dict[int, int] = {}
    for i, (pid, column) in enumerate(zip(ids, zip(*specific_reach))):
        if pid in shared_ids:
            mask = sum(1 << t for t, hit in enumerate(column) if hit)
            if mask:
                reach_masks[pid] = mask
            continue
        found = [(t, recomputed.get((t, i)) if pid in consumed else grads.grads[t][i]) for t, hit in enumerate(column) if hit]
        kept = [(t, g) for t, g in found if g is not None]
        if kept:
            specific.append((params[i], [g for _, g in kept]))
            specific_tasks.append([t for t, _ in kept])
    shared = buffer.params if buffer is not None else []
    return PreparedGradients(grads.grads, shared, shared_rows, specific, specific_tasks, buffer, rows_written, sharing, reach_masks)


def _buffer_for(
    sharing: Sharing,
    params: list[torch.Tensor],
    num_tasks: int,
    layout: Layout,
    options: GradOptions,
    early: SharedBuffer | None,
) -> SharedBuffer | None:
    """The buffer of the shared parameters: the current one while the shared set and ``T`` stay, or the
    first step's when it holds exactly the shared set (no second buffer at the first step)."""
    buffer = layout.buffer
    if sharing is layout.sharing and buffer is not None and buffer.num_tasks == num_tasks:
        return buffer
    shared = [p for p in params if id(p) in sharing.shared]
    if early is not None and early.num_tasks == num_tasks and early.param_ids == frozenset(id(p) for p in shared):
        layout.buffer = early
        return early
    return layout.ensure_buffer(shared, num_tasks, options.storage_dtype) if shared else None


def _layout_before_backward(losses: list[torch.Tensor], params: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """The shared parameters as far as the graph tells, before any backward (a walk, no gradient):
    what the rows are written into while the first step's gradients are computed."""
    if layout.explicit_shared is not None:
        return [p for p in params if id(p) in layout.explicit_shared]
    counts = [sum(column) for column in zip(*reach(losses, params))]
    return [p for p, n in zip(params, counts) if n > 1]


def _sharing_after(
    ids: list[int],
    structural: list[list[bool]],
    grads: list[list[torch.Tensor | None]],
    norms: list[tuple[list[int], torch.Tensor]] | None,
    layout: Layout,
    options: GradOptions,
    *,
    accumulate: bool,
) -> Sharing:
    """The shared set and the owners for this step: measured (first step), fixed (``shared=``), or
    the last step's, grown by what became shared since."""
    T = len(structural)
    current = layout.sharing if layout.sharing is not None and layout.sharing.num_tasks == T else None
    if layout.explicit_shared is not None:
        return current or Sharing(T, set(layout.explicit_shared))
    if norms is not None:
        values = torch.cat([v for _, v in norms]).tolist() if norms else []  # one host sync, first step only
        nonzero = [[False] * len(ids) for _ in range(T)]
        position = 0
        for t, (present, _) in enumerate(norms):
            for i in present:
                nonzero[t][i] = values[position] != 0  # NaN and Inf count as non-zero
                position += 1
        shared, owners = classify(ids, structural, nonzero)
        _warn_undecided(ids, structural, nonzero, owners, options.nonfinite)
        return Sharing(T, shared, owners)
    sharing = current or Sharing(T)
    reached = sharing.reached(ids, structural)
    promoted = {pid for pid, column in zip(ids, zip(*reached)) if pid not in sharing.shared and sum(column) > 1}
    if sharing.owners and options.nonfinite != "propagate":
        promoted |= _owned_but_shared(sharing, ids, grads)
    if not promoted:
        return sharing
    if accumulate:
        raise ValueError("a parameter became shared between accumulated backward() calls; pass shared= to fix the set")
    owners = {pid: t for pid, t in sharing.owners.items() if pid not in promoted}
    return Sharing(T, sharing.shared | promoted, owners)


def _warn_undecided(
    ids: list[int], structural: list[list[bool]], nonzero: list[list[bool]], owners: dict[int, int], nonfinite: str
) -> None:
    """Say when the first step's values leave sharing open for good: a parameter several tasks' graphs
    reach whose gradients are all zero (taken as shared: a task absent from a fused batch leaves its
    head so), or, with ``nonfinite="propagate"`` (which never reads back again), one whose gradient
    only one task made non-zero (taken as that task's: a task absent from the first batch leaves the
    trunk so)."""
    zero = [i for i in range(len(ids)) if sum(row[i] for row in structural) > 1 and not any(row[i] for row in nonzero)]
    owned = sorted(i for i, pid in enumerate(ids) if pid in owners) if nonfinite == "propagate" else []
    if not zero and not owned:
        return
    said = []
    if zero:
        said.append(f"parameter(s) {zero} (positions among the optimizer's trainable ones) had a zero gradient "
                    "for every task and are taken as shared")
    if owned:
        said.append(f"parameter(s) {owned} had a non-zero gradient for one task only and are taken as that task's "
                    "(with nonfinite='propagate' this reading is never revisited)")
    warnings.warn(
        "which parameters are shared was read off the first step's gradients: " + "; ".join(said) + ". If a task "
        "was absent from that batch or a head starts at zero, this is wrong for the rest of training: pass "
        "shared= (the shared module or parameters) to fix the set.",
        RuntimeWarning,
        stacklevel=_outside_the_package(),
    )


def _outside_the_package() -> int:
    """The ``stacklevel`` of the first caller outside gradsurgery and torch (``torch.compiler.disable``
    sits between the user's ``opt.backward`` and the wrapper)."""
    inside = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__ or ""))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


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
    nonzero = (grad_peaks([g for _, g in suspects]) != 0).tolist()
    return {pid for (pid, _), hit in zip(suspects, nonzero) if hit}


def _rows_of_consumed(
    losses: list[torch.Tensor],
    params: list[torch.Tensor],
    reach_of: list[list[bool]],
    sharing: Sharing,
    early: SharedBuffer,
    narrow: bool,
) -> dict[tuple[int, int], torch.Tensor]:
    """The gradients of parameters that were written into the first step's buffer but turned out
    task-specific (a fused head): read back from that buffer, or recomputed from the graph when the
    buffer stores them at a lower precision than the parameter's."""
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


def _check_untrained(losses: list[torch.Tensor], params: list[torch.Tensor], structural: list[list[bool]], layout: Layout) -> None:
    """Refuse a graph whose parameters ``torch.autograd.grad`` cannot reach: a reentrant
    ``torch.utils.checkpoint`` computes its gradients by a nested ``.backward()`` that only
    ``loss.backward()`` runs, so the checkpointed parameters would silently never train. Looked for
    only when some parameter is reached by no task, and once per such set."""
    unreached = frozenset(id(p) for p, column in zip(params, zip(*structural)) if not any(column))
    if not unreached or unreached == layout.unreached_checked:
        return
    if any(is_reentrant_checkpoint(node) for node in _walk(losses)):
        raise ValueError(REENTRANT_CHECKPOINT)
    layout.unreached_checked = unreached


REENTRANT_CHECKPOINT = (
    "the losses' graph holds a torch.utils.checkpoint region with use_reentrant=True, whose parameters only "
    "loss.backward() reaches: gradsurgery computes per-task gradients with torch.autograd.grad, so they would "
    "never train. Use checkpoint(..., use_reentrant=False)."
)


def is_reentrant_checkpoint(node: object) -> bool:
    return type(node).__name__ == "CheckpointFunctionBackward"


def _write_row(buffer: SharedBuffer, task: int, params: list[torch.Tensor], row: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copy ``row``'s gradients of the buffer's parameters into row ``task``; return the rest."""
    held = buffer.param_ids
    buffer.write(task, {id(p): g for p, g in zip(params, row) if g is not None and id(p) in held}, accumulate=False)
    return [None if id(p) in held else g for p, g in zip(params, row)]


# ---------------------------------------------------------------------- representation mode


def feature_gradients(losses: list[torch.Tensor], features: torch.Tensor, params: list[torch.Tensor]) -> FeatureGradients:
    """``∂L_t/∂features`` per task, the heads' plain gradients, and whether any loss reaches the
    encoder by a path around the features."""
    if not isinstance(features, torch.Tensor) or not features.requires_grad:
        raise ValueError("features must be a tensor that requires grad (the encoder's output)")
    upstream = params_upstream_of(features)
    encoder = [p for p in params if id(p) in upstream]
    if not encoder:
        raise ValueError("features does not lead to any parameter of the optimizer: pass the encoder's output")
    heads = [p for p in params if id(p) not in upstream]
    rows = []
    head_grads: list[list[torch.Tensor | None]] = []
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, [features, *heads], retain_graph=True, allow_unused=True)
        if grads[0] is None:
            raise ValueError(
                f"loss {t} does not depend on features (with a torch.compile'd model, compile the encoder alone: a "
                "whole model compiled into one graph returns the features beside the outputs, not before them)"
            )
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


def through_features(prepared: FeatureGradients, combined: torch.Tensor, extra: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The encoder's gradients for the feature cotangent ``combined = Σ_t w_t ∂L_t/∂features``, plus
    the plain gradient of every path around the features (tied embeddings, skip connections). With
    such paths (``prepared.bypass``), ``extra = Σ_t (w_t − 1)·∂L_t/∂features``: one backward of
    ``Σ_t L_t`` reaches every path, and the features also receive ``extra``, so that in total they
    carry ``combined`` (and ``extra`` is exactly zero for ``Sum``)."""
    features, losses = prepared.features, prepared.losses
    if not prepared.bypass:
        return torch.autograd.grad(features, prepared.encoder, grad_outputs=combined.view_as(features), allow_unused=True)
    assert extra is not None
    ones = [torch.ones_like(loss) for loss in losses]
    return torch.autograd.grad([*losses, features], prepared.encoder, grad_outputs=[*ones, extra.view_as(features)], allow_unused=True)


def features_extra(J: torch.Tensor, combined: torch.Tensor, result: Aggregate, backend: str) -> torch.Tensor:
    """``Σ_t (w_t − 1)·∂L_t/∂features``: what the features receive on top of ``Σ_t ∂L_t/∂features``
    in a backward of ``Σ_t L_t`` (exactly zero for ``Sum``). An elementwise method has no weights:
    its combined cotangent minus the plain sum."""
    if result.weights is None:
        return combined - J.sum(0)
    out = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
    return _backend.combine(result.weights - 1, J, out, backend=backend)


def params_upstream_of(features: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor the autograd graph of ``features`` reaches."""
    found = {id(variable) for node in _walk([features]) if (variable := getattr(node, "variable", None)) is not None}
    if features.grad_fn is None and features.is_leaf:
        found.add(id(features))
    return found


def _reaches_around(losses: list[torch.Tensor], features: torch.Tensor, encoder: set[int]) -> bool:
    """Whether a loss reaches an encoder parameter by a path that does not pass through ``features``."""
    for node in _walk(losses, stop=features.grad_fn):
        if node is features.grad_fn:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in encoder:
            return True
    return False


# ---------------------------------------------------------------------- checks


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seen: set[int] = set()
    for index, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter {index} (shape {tuple(p.shape)}) appears twice in the optimizer")
        seen.add(id(p))
    return params


def check_real(params: list[torch.Tensor]) -> None:
    for index, p in enumerate(params):
        if p.is_complex():
            raise ValueError(
                f"parameter {index} (shape {tuple(p.shape)}) is complex ({p.dtype}): the methods compare task "
                "gradients by real inner products; view it as real (torch.view_as_real) to train it with gradsurgery"
            )


def check_shared(shared: Iterable[torch.Tensor] | torch.nn.Module, params: list[torch.Tensor]) -> set[int]:
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


def check_task_count(num_tasks: int, accumulated: int | None, checkpoint: int | None) -> None:
    """Refuse ``num_tasks`` losses where the accumulation under way or a loaded checkpoint has another
    number of tasks (``None``: nothing to agree with)."""
    if accumulated is not None and num_tasks != accumulated:
        raise ValueError(f"got {num_tasks} losses, but {accumulated} were accumulated since the gradients were last cleared")
    if checkpoint is not None and num_tasks != checkpoint:
        raise ValueError(f"got {num_tasks} losses, but the loaded checkpoint was trained with {checkpoint}")


def check_scaler_policy(nonfinite: str) -> None:
    """A GradScaler must see an overflow to skip the step and back off: ``"skip"`` would hide it
    (a skipped batch leaves ``.grad`` as it was; with cleared gradients the scaler cannot step at all)."""
    if nonfinite == "skip":
        raise ValueError(
            "nonfinite='skip' with a GradScaler: the scaler must see the overflow to skip the step and back off; "
            "use nonfinite='propagate' (the AMP setting)"
        )


def check_losses(losses: Losses) -> list[torch.Tensor]:
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


def one_tensor(losses: list[torch.Tensor]) -> bool:
    """Whether the losses are entries of one tensor (``torch.stack(losses)``, a vectorised loss): one
    node yields them all, or each is picked by its own node from the same parent. Their graphs then
    lead every loss to every head, before any gradient says otherwise."""
    nodes = [loss.grad_fn for loss in losses]
    if len(losses) < 2 or any(node is None for node in nodes):
        return False
    if len({id(node) for node in nodes}) == 1:
        return True
    parents = {tuple(id(child) for child, _ in node.next_functions if child is not None) for node in nodes if node is not None}
    return len(parents) == 1 and len(next(iter(parents))) == 1


def nonfinite_tasks(G: torch.Tensor | None, checked: list[list[torch.Tensor]], values: torch.Tensor | None = None) -> list[int]:
    """Tasks whose squared norm ``G[t, t]``, listed gradients or, for a method that reads them, loss
    ``values`` are NaN/Inf (a NaN loss over an empty batch has zero gradients, but would make the
    weights NaN). Reads ``T`` flags back: one host sync."""
    T = len(checked)
    tensors = [g for row in checked for g in row]
    device = G.device if G is not None else (tensors[0].device if tensors else torch.device("cpu"))
    bad = torch.zeros(T, dtype=torch.bool, device=device)
    if tensors:
        flags = ~grad_peaks(tensors).to(device).isfinite()
        bad |= torch.stack([part.any() for part in torch.split(flags, [len(row) for row in checked])])
    if G is not None:
        bad |= ~G.diagonal().isfinite()  # the diagonal: an off-diagonal NaN would blame both tasks
    if values is not None:
        bad |= ~values.to(device).isfinite()
    return bad.nonzero().flatten().tolist()


def per_task(specific: SpecificGradients, tasks: list[list[int]], num_tasks: int) -> list[list[torch.Tensor]]:
    """The task-specific gradients regrouped by task."""
    out: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
    for (_, grads), owners in zip(specific, tasks):
        for g, t in zip(grads, owners):
            out[t].append(g)
    return out


def rescue_gram(J: torch.Tensor, options: GradOptions, blocks: BlockLayout | None = None) -> tuple[torch.Tensor, bool]:
    """The Gram matrix of ``J`` (``(B, T, T)`` with ``blocks``) and whether it was in range (the rescue's
    check reads its diagonal back; with ``nonfinite="propagate"``, which never synchronises, it is not
    checked: ``False``)."""
    if blocks is not None:
        G = _backend.gram_blocks(J, blocks, backend=options.backend)
        return (G, False) if options.nonfinite == "propagate" else _backend.rescued_blocks(J, G, blocks)
    G = _backend.gram(J, backend=options.backend)
    if options.nonfinite == "propagate":
        return G, False
    return _backend.rescued(J, G)


def _widest(params: list[torch.Tensor]) -> torch.dtype:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _walk(roots: list[torch.Tensor], stop: object = None) -> Iterator[object]:
    """Every autograd node reachable from ``roots``' graphs, each once, not descending below ``stop``."""
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if node is not stop:
            stack.extend(child for child, _ in node.next_functions if child is not None)


_Function = TypeVar("_Function", bound=Callable[..., Any])


def eager(function: _Function) -> _Function:
    """``torch.compiler.disable``, applied on the first call: the wrappers' backward runs eagerly inside
    a compiled training step (``T`` backward passes through the model: one graph break).

    Applying it at import would import ``torch._dynamo`` with gradsurgery (most of a second, and Triton
    with it); by the first call inside a compiled step, ``torch.compile`` has imported it anyway.
    """
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disable: Callable[[Callable[..., Any]], Callable[..., Any]] = torch.compiler.disable
            disabled.append(disable(function))
        return disabled[0](*args, **kwargs)

    return cast(_Function, call)


@contextlib.contextmanager
def outside_autocast(losses: Losses) -> Iterator[None]:
    """Autocast switched off on the losses' device for the wrapper's backward.

    Frameworks call the backward inside the forward's autocast region (Lightning runs the whole
    ``training_step`` in it), where the wrapper's Gram matrix and combine — matrix products — would
    run in fp16/bf16 (a Gram of 45.0 for 44.97 in bf16). PyTorch's advice is to leave the region
    before the backward: backward ops run in the dtype their forward chose either way, so this changes
    only the wrapper's own arithmetic, back to what a backward outside the region does.
    """
    # No check here: bad losses are refused inside backward, where distributed training reports the
    # error to every rank; this only needs a device, when there is one.
    first = losses if isinstance(losses, torch.Tensor) else next(iter(losses), None) if isinstance(losses, (list, tuple)) else None
    device = first.device.type if isinstance(first, torch.Tensor) else None
    if device is None or not torch.is_autocast_enabled(device):
        yield
        return
    with torch.autocast(device, enabled=False):
        yield
