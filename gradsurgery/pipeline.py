"""Gram → weights → combine, written once.

Every path runs it: the wrappers (parameter and representation mode), the functional API, and
``torch.distributed``, which only inserts its collectives around it (an all-reduce of the buffer
before, of the partial Gram matrices in the middle, an all-gather of the update after).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import backend as _backend

WeightsOf = Callable[[torch.Tensor], torch.Tensor]
# An elementwise method (GradDrop): writes its update of the columns J into out, in one pass.
Elementwise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Target(NamedTuple):
    """Columns of ``J`` and the flat tensor their update is written into (``base`` is added, if any)."""

    columns: slice
    out: torch.Tensor
    base: torch.Tensor | None = None


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
) -> Aggregate:
    """``out = base + wᵀJ[:, columns]`` for each target, ``w = weights_of(G)`` and ``G = J Jᵀ``.

    ``G``: the Gram matrix when the caller has it already (it checked it for NaN/Inf); ``rescue``:
    recompute it from scaled rows where fp32 overflowed or underflowed (one host read); ``reduce_gram``:
    what makes the local Gram matrix the global one (distributed training). A Gram matrix recomputed
    in fp64 means rows whose magnitudes fp32 cannot multiply together: so are the weights, and the
    combine runs in fp64 too. ``elementwise`` replaces the weights and the combine.
    """
    if G is None:
        G = _backend.gram(J, backend=backend)
        if rescue:
            G = _backend.rescued(J, G)[0]
    wide = G.dtype == torch.float64 and J.dtype != torch.float64
    if reduce_gram is not None:
        G = reduce_gram(G)
    if elementwise is not None:
        for target in targets:
            elementwise(J[:, target.columns], target.out)
            if target.base is not None:
                target.out.add_(target.base)
        return Aggregate(G, None)
    assert weights_of is not None
    w = weights_of(G)
    for target in targets:
        if target.base is not None:
            target.out.copy_(target.base)
        _backend.combine(
            w, J[:, target.columns], target.out, accumulate=target.base is not None, backend=backend, validate=False, wide=wide
        )
    return Aggregate(G, w)
