"""torch.distributed support for the wrappers: ``process_group=`` and ``sync="exact" | "local" | "sharded"``.

Every rank runs the same training loop on its own batch. Each ``backward`` first computes the local
per-task gradients, then:

``exact`` (default)
    The ``(T, P)`` buffer and the task-specific gradients are averaged across ranks (one all-reduce of
    the buffer, one bucketed all-reduce of the rest); every rank then runs the surgery on the same
    matrix and gets the same weights. With losses that are means over equal-size local batches, the
    average of the ranks' gradients is the gradient of the mean over the global batch, so this *is*
    single-process training on the concatenated batch. With accumulation, the *accumulated* buffer is
    all-reduced after each ``backward``: after the first call it holds the average ``B`` on every rank,
    so ``mean_r(B + J_r) = B + mean_r(J_r)`` — already-averaged parts stay what they were.

``local``
    The surgery runs on each rank's local gradients; only the final gradients (shared and
    task-specific) are averaged: ``d = mean_r method(J_r)``. ``T`` times less communication than
    ``exact``, but it is an approximation: the surgery of an average is not the average of surgeries.

``sharded``
    The buffer is reduce-scattered so that each rank owns ``1/N`` of the columns of the averaged
    ``J``; the partial Gram matrices (``T²`` numbers) are all-reduced, every rank computes the same
    weights, combines its own columns, and the update is all-gathered: the ``exact`` answer (up to
    fp32 summation order) with ``(N−1)/N·(T+1)·P`` values sent per rank instead of ``2(N−1)/N·T·P``,
    and ``1/N`` of the Gram and combine work on each rank. gloo has no native reduce-scatter (torch
    emulates it with a full all-reduce), so on gloo the buffer is all-reduced instead — same result,
    no saving — and a warning says so once.

**Before any collective that could hang**, each ``backward`` all-gathers a fixed-size descriptor (one
``int64`` tensor of 14 values): whether the local preparation raised, a call counter, a hash of the
method and its options (``sync`` included), ``T``, the representation-mode flag, whether the rank is
accumulating, the number, size and hash of the shapes of the shared parameters, a hash of the
task-specific parameters, a hash of the method's generator state (PCGrad, RLW, GradVac, GradDrop), the
number of tasks whose local gradients may hold NaN/Inf (a non-finite 2-norm; confirmed exactly, on the
rare path) and the number of shared parameters that fewer than two tasks reach on this rank (then, in
``exact`` and ``sharded``, an all-reduce of which tasks reach each shared parameter decides, over all
ranks, which of them get a single task's plain gradient on this step). Every rank sees
the same table, so every rank raises the same error on a disagreement (``ValueError``), on an
exception in one rank's preparation (re-raised there; reported on the others), or on a non-finite
gradient anywhere (:class:`~gradsurgery.NonFiniteGradientError` naming the tasks and the ranks) — and
the ranks stay in step for the next ``backward``. Reading the table back is one host synchronisation
per ``backward``.

**Representation mode** (``features=z``): ``exact`` and ``sharded`` all-reduce the ``T × T`` Gram
matrix of ``∂L_t/∂z`` (the global one is ``Σ_r G_r / N²``), so every rank uses the weights of the
global batch; ``local`` uses its own. The encoder's and the heads' gradients are then averaged.

**DistributedDataParallel.** The wrappers compute gradients with ``torch.autograd.grad``, which does not
run the autograd hooks through which DDP's reducer all-reduces ``.grad``: a DDP-wrapped model trains
correctly, the reduction being the wrapper's own (DDP still broadcasts the parameters at construction
and the buffers at each forward). ``no_sync()`` is not needed. Pass the DDP's ``process_group`` to
the wrapper when it is not the default group.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import apply as _apply
from .errors import NonFiniteGradientError
from .grads import dense, grad_norms
from .hints import SYNC_MODES
from .kernels.blocks import BlockLayout
from .pipeline import Aggregate, Elementwise, Target, WeightsOf, aggregate
from .prepare import FeatureGradients, GradOptions, Prepared, PreparedGradients, SpecificGradients, features_extra, through_features
from .state import Accumulation, Layout
from .taskgrads import SharedBuffer

# Backends whose reduce-scatter sends (N−1)/N of the input; gloo's is a full all-reduce in disguise.
NATIVE_REDUCE_SCATTER = ("nccl", "xccl")
BUCKET_BYTES = 25 * 2**20  # the task-specific gradients are flattened into buckets of at most this size
_PROTOCOL = 0x67735F6473_02  # "gs_ds" v2: a descriptor from anything else means the ranks are out of step
_FIELDS = (
    "protocol",
    "failed",
    "backward call",
    "method and options",
    "number of tasks",
    "representation mode",
    "accumulation state",
    "number of shared parameters",
    "shared numel",
    "shared parameter shapes",
    "task-specific parameters",
    "generator state",
    "non-finite tasks",
    "partly reached shared parameters",
)
_COMPARED = _FIELDS[2:12]
_warned_fallback: set[str] = set()


def check_sync(sync: str) -> None:
    """``ValueError`` for an unknown ``sync`` (raised at construction, before any collective)."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")


def started_since() -> bool:
    """Whether torch.distributed now runs more than one process (for a wrapper that found it not
    initialised when it was built)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def connect(process_group: Any, sync: str) -> DistributedSync | None:
    """The synchroniser for ``process_group`` (``None``: the default group when torch.distributed is
    initialised), or ``None`` for a single process — a group of one included."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised")
    world = dist.get_world_size(process_group)
    if world < 1:
        raise ValueError("this process is not a member of process_group")
    return None if world == 1 else DistributedSync(process_group, sync)


@dataclass
class CommStats:
    """Collectives issued by a wrapper: calls, payload bytes and bytes sent per rank.

    ``payload`` is the size ``n`` of the tensor handed to the collective (the input of an all-reduce or
    a reduce-scatter, the output of an all-gather). ``sent`` is what each rank sends under the ring
    algorithms NCCL uses for large messages: ``2(N−1)/N·n`` for an all-reduce, ``(N−1)/N·n`` for the
    others (reduce-scatter, all-gather, the descriptor's all-gather, PCGrad's one seed broadcast).
    Collectives of the error paths (``all_gather_object``) are counted in ``calls`` only.
    """

    calls: Counter[str] = field(default_factory=Counter)
    payload: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)

    def add(self, op: str, nbytes: int, world: int) -> None:
        factor = (2 if op == "all_reduce" else 1) * (world - 1) / world
        self.calls[op] += 1
        self.payload[op] += nbytes
        self.sent[op] += round(factor * nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        self.sent.clear()

    def summary(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "payload_bytes": dict(self.payload),
            "sent_bytes": dict(self.sent),
            "sent_bytes_total": sum(self.sent.values()),
        }


@dataclass
class _Local:
    """What one rank prepared before talking to the others."""

    prepared: Prepared
    suspects: torch.Tensor | None = None  # (T,) bool: tasks whose gradients may hold NaN/Inf

    @property
    def shared(self) -> list[torch.Tensor]:
        """The shared parameters (representation mode: the encoder's)."""
        if self.prepared.features is not None:
            return self.prepared.features.encoder
        assert self.prepared.parameters is not None
        return self.prepared.parameters.shared

    @property
    def specific(self) -> SpecificGradients:
        grads = self.prepared.features or self.prepared.parameters
        assert grads is not None
        return grads.specific

    def specific_signature(self) -> list[tuple[int, tuple[int, ...], str, tuple[int, ...]]]:
        """Each task-specific parameter (index, shape, dtype) and the tasks that reach it on this rank:
        a parameter that different single tasks reach on different ranks is shared on the global batch."""
        grads = self.prepared.features or self.prepared.parameters
        assert grads is not None
        index = {id(p): i for i, p in enumerate(self.prepared.params)}
        return [
            (*_signature([p], index)[0], tuple(tasks)) for (p, _), tasks in zip(grads.specific, grads.specific_tasks)
        ]


@dataclass
class BackwardCall:
    """One ``backward()`` as the distributed code sees it: the wrapper's state and callables, made
    explicit (nothing here reaches into the wrapper)."""

    prepare: Callable[[], Prepared]  # checks and per-task gradients; writes nothing
    layout: Layout
    accumulation: Accumulation
    options: GradOptions
    reduction: str
    weights_of: Callable[[torch.Tensor | None], WeightsOf]  # loss values → (G → weights, reduction applied)
    elementwise: Elementwise | None  # a method that combines J itself (GradDrop)
    identity: dict[str, Any]  # the method and its options, compared across ranks
    generator: torch.Generator | None  # compared across ranks
    record: Callable[[Aggregate], None]  # last_gram, last_weights


@dataclass
class _Shard:
    """This rank's columns of the ``(T, P)`` buffer in sharded mode, and the staging tensors."""

    width: int  # columns per rank (the last ranks may own fewer, even none)
    start: int
    stop: int
    packed: torch.Tensor | None  # (N, T, width): the buffer reordered so that rank r's columns are chunk r
    owned: torch.Tensor | None  # (T, width): the reduce-scatter's output
    update: torch.Tensor  # (width,): this rank's part of the update
    gathered: torch.Tensor  # (N·width,): the all-gathered update
    blocks: BlockLayout | None = None  # granularity=: the blocks within this rank's columns


class DistributedSync:
    """The collectives of one wrapper over one process group (built by :func:`connect`)."""

    def __init__(self, group: Any, sync: str) -> None:
        check_sync(sync)
        self.group = group
        self.sync = sync
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = str(dist.get_backend(group))
        self.native_reduce_scatter = self.backend in NATIVE_REDUCE_SCATTER
        self.stats = CommStats()
        self._calls = 0
        self._shard: _Shard | None = None
        self._shard_key: tuple[int, torch.Size, torch.dtype, bool] | None = None

    # ------------------------------------------------------------------ collectives (counted)

    def _device(self, like: torch.Tensor | None = None) -> torch.device:
        if self.backend != "nccl":
            return torch.device("cpu")
        return like.device if like is not None and like.is_cuda else torch.device("cuda", torch.cuda.current_device())

    def _all_reduce(self, tensor: torch.Tensor) -> Any:
        self.stats.add("all_reduce", tensor.numel() * tensor.element_size(), self.world)
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> Any:
        self.stats.add("reduce_scatter", input.numel() * input.element_size(), self.world)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return fn(output, input, group=self.group, async_op=True)

    def _all_gather(self, output: torch.Tensor, input: torch.Tensor, *, label: str = "all_gather") -> Any:
        self.stats.add(label, output.numel() * output.element_size(), self.world)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return fn(output, input, group=self.group, async_op=True)

    def _all_gather_objects(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world
        self.stats.calls["all_gather_object"] += 1
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's ``seed`` on every rank (PCGrad's generator must draw the same orders everywhere)."""
        value = torch.tensor([seed], dtype=torch.int64, device=self._device())
        self.stats.add("broadcast", 8, self.world)
        dist.broadcast(value, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(value.item())

    def _mean_whole(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Launch the in-place averaging of each (contiguous) tensor: pre-divided by N, as DDP does."""
        return [self._all_reduce(t.div_(self.world)) for t in tensors if t.numel()]

    def _mean_bucketed(self, tensors: Sequence[torch.Tensor]) -> tuple[list[Any], list[torch.Tensor]]:
        """Launch the averaging of small tensors, flattened into buckets (one per dtype, at most
        ``BUCKET_BYTES`` each); returns the works and, per tensor, the view of its bucket that holds its
        mean once they are done. The inputs are left alone (autograd's gradients may be expanded views)."""
        works: list[Any] = []
        means = list(tensors)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                by_dtype.setdefault((t.dtype, t.device), []).append(i)
        for indices in by_dtype.values():
            for bucket in _buckets(indices, [tensors[i].numel() * tensors[i].element_size() for i in indices]):
                flat = torch.cat([tensors[i].reshape(-1) for i in bucket]).div_(self.world)
                works.append(self._all_reduce(flat))
                offset = 0
                for i in bucket:
                    means[i] = flat[offset : offset + tensors[i].numel()].view_as(tensors[i])
                    offset += tensors[i].numel()
        return works, means

    # ------------------------------------------------------------------ the backward pass

    def backward(self, call: BackwardCall) -> None:
        """The distributed counterpart of :meth:`GradSurgery.backward` (same contract, same errors)."""
        try:
            local: _Local | None = self._prepare(call)
            error: Exception | None = None
        except Exception as exc:  # re-raised below, after telling the other ranks
            local, error = None, exc
        try:
            self._agree(call, local, error)
        except _Skip:
            return
        assert local is not None
        if local.prepared.features is not None:
            self._features_step(call, local, local.prepared.features)
        else:
            assert local.prepared.parameters is not None
            self._step(call, local, local.prepared.parameters)

    def _prepare(self, call: BackwardCall) -> _Local:
        """Everything ``GradSurgery.backward`` does before it writes: checks and per-task gradients."""
        prepared = call.prepare()
        local = _Local(prepared)
        if prepared.parameters is not None and call.options.nonfinite != "propagate":
            local.suspects = _suspect_flags(prepared.parameters.grads, prepared.params[0].device)
        return local

    def _agree(self, call: BackwardCall, local: _Local | None, error: Exception | None) -> None:
        """All-gather the descriptors; raise the same error on every rank when anything disagrees."""
        self._calls += 1
        values = self._descriptor(call, local)
        device = self._device(local.prepared.params[0] if local is not None else None)
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        if local is not None and local.suspects is not None:
            mine[_FIELDS.index("non-finite tasks")] = local.suspects.to(device).sum()
        table_tensor = torch.empty(self.world * len(_FIELDS), dtype=torch.int64, device=device)
        self._all_gather(table_tensor, mine, label="descriptor").wait()
        table = [dict(zip(_FIELDS, row)) for row in table_tensor.view(self.world, len(_FIELDS)).tolist()]

        if any(row["protocol"] != _PROTOCOL for row in table):
            raise RuntimeError(
                "the ranks are out of step: another rank is in a different collective (did every rank call "
                "backward() the same number of times, at the same point of the loop?)"
            )
        failed = [r for r, row in enumerate(table) if row["failed"]]
        if failed:
            reports = self._all_gather_objects(None if error is None else (type(error).__name__, str(error)))
            if error is not None:
                raise error
            name, message = reports[failed[0]]
            kind = {"ValueError": ValueError, "TypeError": TypeError}.get(name, RuntimeError)
            raise kind(f"backward() failed on rank {failed[0]} with {name}: {message}")
        for name in _COMPARED:
            if len({row[name] for row in table}) > 1:
                details = self._all_gather_objects(_details(call, local, name, self))
                listing = "; ".join(f"rank {r}: {d}" for r, d in enumerate(details))
                raise ValueError(f"the ranks disagree on the {name} ({listing}). {_ADVICE[name]}")
        if self.sync != "local" and any(row["partly reached shared parameters"] for row in table):
            assert local is not None and local.prepared.parameters is not None
            self._global_reach(local.prepared.parameters, device)
        if any(row["non-finite tasks"] for row in table):
            assert local is not None and local.prepared.parameters is not None and local.suspects is not None
            T = local.prepared.num_tasks
            confirmed = _nonfinite_tasks(local.prepared.parameters.grads, local.suspects)
            ranks = torch.zeros(self.world, dtype=torch.int32)
            ranks[self.rank] = int(confirmed.any())
            flags = torch.cat([confirmed, ranks]).to(device)
            self._all_reduce(flags).wait()  # sums of 0/1 flags: per task, then per rank
            counts = flags.tolist()
            bad = [t for t, n in enumerate(counts[:T]) if n]
            bad_ranks = [r for r, n in enumerate(counts[T:]) if n]
            if not bad:  # only finite entries with an overflowing norm: the Gram's rescue handles those
                return
            if call.options.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN/Inf) for task(s) {bad} "
                    f"on rank(s) {bad_ranks}; no .grad, parameter or optimizer state was changed on any rank",
                    tasks=bad,
                )
            call.accumulation.skipped(T)
            raise _Skip

    def _global_reach(self, grads: PreparedGradients, device: torch.device) -> None:
        """Which tasks reach each shared parameter, over all ranks (a task reaching it on any rank has a
        non-zero row in the averaged buffer): one all-reduce (max) of a (parameters × T) table."""
        buffer = grads.buffer
        assert buffer is not None
        T = buffer.num_tasks
        table = torch.tensor(
            [[(grads.reach_masks.get(id(p), 0) >> t) & 1 for t in range(T)] for p in buffer.params],
            dtype=torch.int32,
            device=device,
        )
        self.stats.add("all_reduce", table.numel() * table.element_size(), self.world)
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=self.group)
        masks = [sum(bit << t for t, bit in enumerate(row)) for row in table.tolist()]
        grads.reach_masks = {id(p): mask for p, mask in zip(buffer.params, masks) if mask}

    def _descriptor(self, call: BackwardCall, local: _Local | None) -> list[int]:
        values = dict.fromkeys(_FIELDS, 0)
        values["protocol"] = _PROTOCOL
        values["backward call"] = self._calls
        values["method and options"] = _hash(repr(_options(call, self)))
        values["generator state"] = _generator_hash(call.generator)
        if local is None:
            values["failed"] = 1
            return list(values.values())
        prepared = local.prepared
        shared = local.shared
        index = {id(p): i for i, p in enumerate(prepared.params)}
        values["number of tasks"] = prepared.num_tasks
        values["representation mode"] = int(prepared.features is not None)
        values["accumulation state"] = int(prepared.accumulate)
        values["number of shared parameters"] = len(shared)
        values["shared numel"] = sum(p.numel() for p in shared)
        values["shared parameter shapes"] = _hash(repr(_signature(shared, index)))
        values["task-specific parameters"] = _hash(repr(local.specific_signature()))
        if prepared.parameters is not None:
            masks = prepared.parameters.reach_masks
            values["partly reached shared parameters"] = sum(bin(masks.get(id(p), 0)).count("1") < 2 for p in shared)
        return list(values.values())

    # ------------------------------------------------------------------ the three modes

    def _step(self, call: BackwardCall, local: _Local, grads: PreparedGradients) -> None:
        prepared = local.prepared
        accumulate = prepared.accumulate
        buffer = grads.buffer
        _apply.open_writes(grads, call.layout, call.accumulation, accumulate=accumulate)
        if buffer is not None:
            for t, rows in enumerate(grads.shared_rows):
                buffer.write(t, rows, accumulate=accumulate)
        sums = [_total(g) for _, g in grads.specific]
        loss_values = prepared.loss_values
        owned = None
        if self.sync != "local":
            works, sums = self._mean_bucketed(sums)
            if loss_values is not None:
                more, (loss_values,) = self._mean_bucketed([loss_values])
                works += more
            if buffer is not None:
                if self.sync == "exact" or not self.native_reduce_scatter:
                    if self.sync == "sharded":
                        self._warn_fallback()
                    works += self._mean_whole([buffer.matrix])
                else:
                    owned, work = self._reduce_scatter_buffer(buffer)
                    works.append(work)
            _wait(works)
        prepared.loss_values = loss_values
        _apply.count(prepared, call.layout, call.accumulation, grads.reach_masks)
        rescue = call.options.nonfinite != "propagate"
        weights_of = call.weights_of(call.accumulation.losses)
        if buffer is not None:
            if self.sync == "sharded":
                result = self._sharded_surgery(call, buffer, owned, weights_of)
            else:
                result = aggregate(
                    buffer.matrix,
                    _apply.targets(buffer),
                    weights_of,
                    backend=call.options.backend,
                    rescue=rescue,
                    elementwise=call.elementwise,
                    plain=_apply.plain_spans(buffer, call.accumulation),
                    blocks=buffer.blocks,
                    unchecked=not rescue,
                )
                if self.sync == "local":
                    more, sums = self._mean_bucketed(sums)
                    _wait(self._mean_whole([update for _, update in buffer.groups]) + more)
            _apply.attach(buffer, call.accumulation)
            call.record(result)
        else:
            if self.sync == "local":
                more, sums = self._mean_bucketed(sums)
                _wait(more)
            call.accumulation.wrote(None)
        _apply.write_specific([(p, [s]) for (p, _), s in zip(grads.specific, sums)])

    def _shard_for(self, buffer: SharedBuffer) -> _Shard:
        key = (id(buffer), buffer.matrix.shape, buffer.matrix.dtype, self.native_reduce_scatter)
        if self._shard is None or self._shard_key != key:
            T, P = buffer.matrix.shape
            width = -(-P // self.world)
            start = min(P, self.rank * width)
            stop = min(P, start + width)
            out_dtype = buffer.groups[0][1].dtype
            for _, update in buffer.groups[1:]:
                out_dtype = torch.promote_types(out_dtype, update.dtype)
            device = buffer.matrix.device
            native = self.native_reduce_scatter
            self._shard = _Shard(
                width,
                start,
                stop,
                torch.zeros(self.world, T, width, dtype=buffer.matrix.dtype, device=device) if native else None,
                torch.empty(T, width, dtype=buffer.matrix.dtype, device=device) if native else None,
                torch.zeros(width, dtype=out_dtype, device=device),
                torch.empty(self.world * width, dtype=out_dtype, device=device),
                None if buffer.blocks is None else buffer.blocks.clipped(start, stop),
            )
            self._shard_key = key
        return self._shard

    def _reduce_scatter_buffer(self, buffer: SharedBuffer) -> tuple[torch.Tensor, Any]:
        """Launch the reduce-scatter of the (local, accumulated) buffer: this rank's columns of the mean.

        The local buffer keeps the local rows, so with accumulation the next call scatters the new sum.
        """
        shard = self._shard_for(buffer)
        J, packed = buffer.matrix, shard.packed
        assert packed is not None and shard.owned is not None
        P = J.shape[1]
        for r in range(self.world):
            a, b = min(P, r * shard.width), min(P, (r + 1) * shard.width)
            torch.div(J[:, a:b], self.world, out=packed[r, :, : b - a])
        work = self._reduce_scatter(shard.owned.view(-1), packed.view(-1))
        return shard.owned[:, : shard.stop - shard.start], work

    def _sharded_surgery(
        self, call: BackwardCall, buffer: SharedBuffer, owned: torch.Tensor | None, weights_of: WeightsOf
    ) -> Aggregate:
        """Gram of this rank's columns → all-reduce → weights → combine of its columns → all-gather."""
        shard = self._shard_for(buffer)
        if owned is None:  # fallback: the whole mean was all-reduced into the buffer
            owned = buffer.matrix[:, shard.start : shard.stop]
        width = shard.stop - shard.start

        def reduce_gram(G: torch.Tensor) -> torch.Tensor:
            G = G.to(torch.float64)  # whatever the rescue did on each rank: every rank all-reduces one dtype
            self._all_reduce(G).wait()
            return G

        result = aggregate(
            owned,
            [Target(slice(0, width), shard.update[:width])] if width else [],
            weights_of,
            backend=call.options.backend,
            rescue=call.options.nonfinite != "propagate",
            reduce_gram=reduce_gram,
            elementwise=call.elementwise,
            plain=_apply.plain_spans(buffer, call.accumulation, shard.start, shard.stop),
            blocks=shard.blocks,
            unchecked=call.options.nonfinite == "propagate",
        )
        self._all_gather(shard.gathered, shard.update).wait()
        for target in _apply.targets(buffer):
            target.out.copy_(shard.gathered[target.columns])
            if target.base is not None:
                target.out.add_(target.base)
        return result

    def _features_step(self, call: BackwardCall, local: _Local, grads: FeatureGradients) -> None:
        """Representation mode: weights from the Gram of ``∂L_t/∂z``; the encoder's and heads' gradients averaged.

        With the global loss the mean of the ranks' (equal-batch) losses, ``∂L/∂z_r = ∂L_r/∂z_r / N``, so the
        global Gram is ``Σ_r G_r / N²`` — one all-reduce of ``T²`` numbers (``exact`` and ``sharded``).
        """
        prepared = local.prepared
        rows = grads.rows
        loss_values = prepared.loss_values
        reduce_gram: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.sync != "local":
            if loss_values is not None:
                works, (loss_values,) = self._mean_bucketed([loss_values])
                _wait(works)

            def reduce_all(G: torch.Tensor) -> torch.Tensor:
                self._all_reduce(G).wait()
                return G / self.world**2

            reduce_gram = reduce_all

        combined = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
        result = aggregate(
            rows,
            [Target(slice(None), combined)],
            call.weights_of(loss_values),
            backend=call.options.backend,
            reduce_gram=reduce_gram,
            elementwise=call.elementwise,
            unchecked=call.options.nonfinite == "propagate",
        )
        extra = features_extra(rows, combined, result, call.options.backend) if grads.bypass else None
        encoder_grads = through_features(grads, combined, extra)
        pairs = [(p, g) for p, g in zip(grads.encoder, encoder_grads) if g is not None]
        pairs += [(p, _total(g)) for p, g in grads.specific]
        works, means = self._mean_bucketed([g for _, g in pairs])
        _wait(works)
        _apply.write_specific([(p, [g]) for (p, _), g in zip(pairs, means)])
        call.record(result)
        call.layout.num_tasks = prepared.num_tasks
        call.layout.checkpoint_tasks = None
        call.accumulation.unstepped = True

    def _warn_fallback(self) -> None:
        if self.backend not in _warned_fallback:
            _warned_fallback.add(self.backend)
            warnings.warn(
                f'sync="sharded" on the {self.backend!r} backend all-reduces the task-gradient buffer instead of '
                "reduce-scattering it (it has no native reduce-scatter): same result, no communication saved — "
                "the Gram and combine work is still split across ranks. Use NCCL for the saving.",
                RuntimeWarning,
                stacklevel=5,  # the user's opt.backward(...)
            )


class _Skip(Exception):
    """``nonfinite="skip"`` agreed on every rank: leave ``backward`` without changing anything."""


def _total(grads: list[torch.Tensor]) -> torch.Tensor:
    """One parameter's local gradient summed over the tasks."""
    return grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)


def _wait(works: list[Any]) -> None:
    for work in works:
        work.wait()


def _buckets(items: list[int], sizes: list[int]) -> list[list[int]]:
    """``items`` cut into consecutive runs of at most ``BUCKET_BYTES`` (a larger item alone)."""
    out: list[list[int]] = [[]]
    total = 0
    for item, nbytes in zip(items, sizes):
        if out[-1] and total + nbytes > BUCKET_BYTES:
            out.append([])
            total = 0
        out[-1].append(item)
        total += nbytes
    return out


def _suspect_flags(grads: list[list[torch.Tensor | None]], device: torch.device) -> torch.Tensor:
    """``(T,)`` bool, a superset of the tasks with a NaN/Inf gradient entry: a non-finite 2-norm (one fused
    pass; it is also Inf for finite entries beyond ~1e19 in fp32, which :func:`_nonfinite_tasks` clears)."""
    flags = [~grad_norms([g for g in row if g is not None]).isfinite().all() for row in grads]
    return torch.stack(flags).to(device)


def _nonfinite_tasks(grads: list[list[torch.Tensor | None]], suspects: torch.Tensor) -> torch.Tensor:
    """``(T,)`` int32: 1 for the suspected tasks that really hold a NaN/Inf entry (the rare path: exact test)."""
    flags = [
        bool(suspect) and not all(bool(dense(g).isfinite().all()) for g in row if g is not None)
        for row, suspect in zip(grads, suspects.tolist())
    ]
    return torch.tensor(flags, dtype=torch.int32)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _signature(params: list[torch.Tensor], index: dict[int, int]) -> list[tuple[int, tuple[int, ...], str]]:
    return [(index[id(p)], tuple(p.shape), str(p.dtype).removeprefix("torch.")) for p in params]


def _options(call: BackwardCall, sync: DistributedSync) -> dict[str, Any]:
    options = call.options
    return {
        **call.identity,
        "sync": sync.sync,
        "reduction": call.reduction,
        "nonfinite": options.nonfinite,
        "storage_dtype": options.storage_dtype,
        "backend": options.backend,
    }


def _generator_hash(generator: torch.Generator | None) -> int:
    if generator is None:
        return 0
    return int.from_bytes(hashlib.blake2b(bytes(generator.get_state().tolist()), digest_size=7).digest(), "little")


def _details(call: BackwardCall, local: _Local | None, name: str, sync: DistributedSync) -> str:
    """A readable account of one descriptor field on this rank, for the error message."""
    if name == "method and options":
        return repr(_options(call, sync))
    if name == "generator state":
        return f"state hash {_generator_hash(call.generator):x}"
    if name == "backward call":
        return f"call {sync._calls}"
    assert local is not None
    prepared = local.prepared
    index = {id(p): i for i, p in enumerate(prepared.params)}
    if name == "number of tasks":
        return f"{prepared.num_tasks} losses"
    if name == "representation mode":
        return "features=" + ("given" if prepared.features is not None else "None")
    if name == "accumulation state":
        return "accumulating since the gradients were cleared" if prepared.accumulate else "fresh after clearing"
    if name in ("number of shared parameters", "shared numel", "shared parameter shapes"):
        return f"{len(local.shared)} shared parameters (index, shape, dtype): {_signature(local.shared, index)}"
    return f"task-specific parameters (index, shape, dtype, tasks reaching it): {local.specific_signature()}"


_ADVICE = {
    "backward call": "Every rank must call backward() the same number of times.",
    "method and options": "Construct the wrapper with the same method, sync= and options on every rank.",
    "number of tasks": "Every rank must pass the same number of losses.",
    "representation mode": "Pass features= on every rank or on none.",
    "accumulation state": "Call zero_grad() at the same points on every rank.",
    "number of shared parameters": "Every rank must train the same model with the same shared parameters "
    "(pass shared= to fix the set when a task does not reach a parameter on some batches).",
    "shared numel": "Every rank must train the same model with the same shared parameters.",
    "shared parameter shapes": "Every rank must train the same model with the same shared parameters.",
    "task-specific parameters": "Every task must reach the same parameters on every rank (a parameter that "
    "different tasks reach on different ranks is shared on the global batch: pass shared= to name it).",
    "generator state": "Pass the same seed= on every rank (or none: rank 0's is then shared), and load "
    "checkpoints on every rank.",
}
