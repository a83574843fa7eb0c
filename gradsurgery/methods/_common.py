"""Validation and scale handling shared by the methods (pure torch, no host sync)."""

from __future__ import annotations

from typing import Sequence

import torch

REDUCTIONS = ("sum", "mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_gram(G: torch.Tensor) -> None:
    """Shape and dtype checks on a Gram matrix (no look at its values: that would sync the host)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square (T, T) matrix, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError("G is empty: T = 0 tasks")
    if not G.dtype.is_floating_point:
        raise ValueError(f"G must be floating point, got dtype {G.dtype}")


def as_losses(losses: torch.Tensor | Sequence[float] | None, G: torch.Tensor, *, needed_by: str) -> torch.Tensor:
    """The loss values as a float64 vector on G's device, checked against T."""
    if losses is None:
        raise ValueError(f"{needed_by} needs the loss values: pass losses=")
    values = torch.as_tensor(losses).detach().to(device=G.device, dtype=torch.float64).reshape(-1)
    if values.shape[0] != G.shape[0]:
        raise ValueError(f"losses has {values.shape[0]} values but there are T={G.shape[0]} tasks")
    return values


def symmetric64(G: torch.Tensor) -> torch.Tensor:
    """G in float64, symmetrised: a Gram from a BLAS ``J @ J.T`` can differ from its transpose by ulps."""
    G = G.detach().to(torch.float64)
    return (G + G.mT) / 2


def normalized(G: torch.Tensor) -> torch.Tensor:
    """``symmetric64(G)`` divided by its largest diagonal entry (unchanged when that is not positive).

    Every method is invariant to a positive rescaling of G, so the solvers work on an O(1) problem
    whatever the gradients' magnitude.
    """
    G = symmetric64(G)
    scale = G.diagonal().amax()
    return G / torch.where(scale > 0, scale, torch.ones_like(scale))


def to_reduction(weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weights on the sum scale → the requested scale."""
    return weights / weights.shape[0] if reduction == "mean" else weights
