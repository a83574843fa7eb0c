"""Mean of the task gradients: ``d = (1/T) Σ_t g_t``, what ``mean(losses).backward()`` computes."""

from __future__ import annotations

import torch

from .sum import sum_weights

BIBTEX = ""


def mean_weights(G: torch.Tensor) -> torch.Tensor:
    """``w = 1/T``, float64 on G's device."""
    return sum_weights(G, reduction="mean")
