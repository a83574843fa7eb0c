"""Naive summation: ``d = Σ_t g_t``, what ``sum(losses).backward()`` computes. The baseline."""

from __future__ import annotations

import torch

from ._common import check_gram, check_reduction, to_reduction

BIBTEX = ""


def sum_weights(G: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """``w = 1`` (``1/T`` with ``reduction="mean"``), float64 on G's device."""
    check_gram(G)
    check_reduction(reduction)
    return to_reduction(torch.ones(G.shape[0], dtype=torch.float64, device=G.device), reduction)
