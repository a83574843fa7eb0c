"""Naive summation: ``d = Σ_t g_t``, what ``sum(losses).backward()`` computes. The baseline.

``Sum`` goes through the same machinery as every method (per-task gradients, Gram matrix,
diagnostics), so it costs the ``T`` backward passes of the methods rather than the single backward
of ``sum(losses).backward()``: it is the fair baseline for a method's overhead. ``Mean`` is ``Sum``
with ``reduction="mean"``: what ``mean(losses).backward()`` computes.
"""

from __future__ import annotations

import torch

from ._common import check_gram, check_reduction, to_reduction
from .spec import Method


def sum_weights(G: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """``w = 1`` (``1/T`` with ``reduction="mean"``), float64 on G's device; ``(..., T)`` for a batch."""
    check_gram(G)
    check_reduction(reduction)
    return to_reduction(torch.ones(G.shape[:-1], dtype=torch.float64, device=G.device), reduction)


METHOD = Method(name="Sum", function=None, weights=sum_weights, doc=__doc__ or "")
MEAN = Method(
    name="Mean",
    function=None,
    weights=sum_weights,
    doc="The mean of the task gradients: what ``mean(losses).backward()`` gives (``Sum`` with "
    "``reduction='mean'``).",
    fixed={"reduction": "mean"},
)
