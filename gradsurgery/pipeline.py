"""Gram → weights → combine, written once.

Every path runs it: the wrappers (parameter and representation mode), the functional API, and
``torch.distributed``, which only inserts its collectives around it (an all-reduce of the buffer
before, of the partial Gram matrices in the middle, an all-gather of the update after).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from . import backend as _backend
from .kernels.blocks import BlockLayout

WeightsOf = Callable[[torch.Tensor], torch.Tensor]
# An elementwise method (GradDrop): writes its update of the columns J into out, in one pass.
Elementwise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Target(NamedTuple):
    """Columns of ``J`` and the flat tensor their update is written into (``base`` is added, if any)."""

    columns: slice
    out: torch.Tensor
    base: torch.Tensor | None = None


class PlainSpan(NamedTuple):
    """Columns of ``J`` that only ``task`` reaches: left out of the Gram matrix, given the plain row."""

    task: int
    columns: slice


class Aggregate(NamedTuple):
    gram: torch.Tensor
    weights: torch.Tensor | None  # None for an elementwise method


def aggregate(
    J: torch.Tensor,
    targets: list[Target],
    weights_of: WeightsOf | None,
    *,
    backend: str,
    G: torch.Tensor | None = None,
    rescue: bool = False,
    reduce_gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
    elementwise: Elementwise | None = None,
    plain: Sequence[PlainSpan] = (),
    blocks: BlockLayout | None = None,
    unchecked: bool = False,
) -> Aggregate:
    """``out = base + wᵀJ[:, columns]`` for each target, ``w = weights_of(G)`` and ``G = J Jᵀ``.

    ``G``: the Gram matrix when the caller has it already (it checked it for NaN/Inf); ``rescue``:
    recompute it from scaled rows where fp32 overflowed or underflowed (one host read); ``reduce_gram``:
    what makes the local Gram matrix the global one (distributed training). A Gram matrix recomputed
    in fp64 means rows whose magnitudes fp32 cannot multiply together: so are the weights, and the
    combine runs in fp64 too. ``elementwise`` replaces the weights and the combine.

    ``plain``: columns that a single task reaches. They are not shared on this step, so they take no
    part in the surgery: their squared norms leave that task's diagonal entry of ``G`` (their other
    rows are zero, so nothing else changes) and their update is that task's row, as is.

    ``blocks``: the method runs on each block of columns separately (``granularity=``): ``G`` is
    ``(B, T, T)``, one Gram matrix per block from the same pass over ``J``, ``weights_of`` returns
    ``(B, T)`` and each block's columns are combined with its own row.

    ``unchecked``: nothing checked ``G`` for NaN/Inf (``nonfinite="propagate"``): a non-finite ``G``
    then makes the weights NaN, whatever the method does with it.
    """
    if G is None:
        if blocks is not None:
            G = _backend.gram_blocks(J, blocks, backend=backend, rescue=rescue)
        else:
            G = _backend.gram(J, backend=backend)
            if rescue:
                G = _backend.rescued(J, G)[0]
    wide = G.dtype == torch.float64 and J.dtype != torch.float64
    if plain:
        G = G.clone()
        for span in plain:
            diagonal = (G if blocks is None else G[_block_of(blocks, span.columns.start)]).diagonal()
            diagonal[span.task] -= torch.linalg.vector_norm(J[span.task, span.columns], dtype=G.dtype) ** 2
    if reduce_gram is not None:
        G = reduce_gram(G)
    if elementwise is not None:
        for target in targets:
            elementwise(J[:, target.columns], target.out)
            if target.base is not None:
                target.out.add_(target.base)
        w = None
    else:
        assert weights_of is not None
        w = weights_of(G)
        if unchecked:
            # The update must be NaN whatever the method does with a non-finite G (PCGrad's conflict
            # tests, false on NaN, would give the plain sum), so that a GradScaler skips the step:
            # 0·x is 0 for finite x and NaN for NaN and ±inf. No host read.
            w = w + (G * 0).sum(dim=(-2, -1)).unsqueeze(-1).to(w.dtype)
        for target in targets:
            if target.base is not None:
                target.out.copy_(target.base)
            accumulate = target.base is not None
            if blocks is not None:
                lo = target.columns.start or 0
                _backend.combine_blocks(
                    w, J[:, target.columns], target.out, blocks, lo=lo, accumulate=accumulate, backend=backend, wide=wide
                )
            else:
                _backend.combine(w, J[:, target.columns], target.out, accumulate=accumulate, backend=backend, validate=False, wide=wide)
    for span in plain:
        _keep_row(J, targets, span)
    return Aggregate(G, w)


def _block_of(blocks: BlockLayout, column: int) -> int:
    for b, spans in enumerate(blocks.blocks):
        if any(start <= column < stop for start, stop in spans):
            return b
    raise ValueError(f"column {column} is in no block")


def _keep_row(J: torch.Tensor, targets: list[Target], span: PlainSpan) -> None:
    """The update of ``span``'s columns ← its task's row (plus the target's base)."""
    for target in targets:
        start, stop = target.columns.start or 0, J.shape[1] if target.columns.stop is None else target.columns.stop
        a, b = max(span.columns.start, start), min(span.columns.stop, stop)
        if a < b:
            out = target.out[a - start : b - start]
            out.copy_(J[span.task, a:b])
            if target.base is not None:
                out.add_(target.base[a - start : b - start])
