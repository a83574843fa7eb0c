"""Validation and scale handling shared by the methods (pure torch, no host sync).

Everything here accepts a leading batch of independent problems: ``G`` of shape ``(..., T, T)``, weights
of shape ``(..., T)``; each entry is treated exactly as the unbatched call would treat it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..hints import REDUCTIONS


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_gram(G: torch.Tensor) -> None:
    """Shape and dtype checks on a Gram matrix, or a batch of them (``(..., T, T)``, ``T ≥ 1``; an empty
    batch is allowed). No look at its values: that would sync the host."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"G must be a square (T, T) matrix or a batch (..., T, T) of them, got shape {tuple(G.shape)}")
    if G.shape[-1] == 0:
        raise ValueError("G is empty: T = 0 tasks")
    if not G.dtype.is_floating_point:
        raise ValueError(f"G must be floating point, got dtype {G.dtype}")


def as_losses(losses: torch.Tensor | Sequence[float] | None, G: torch.Tensor, *, needed_by: str) -> torch.Tensor:
    """The loss values as float64 on G's device, checked against T: a ``(T,)`` vector for a ``(T, T)`` ``G``
    (any shape with ``T`` values); for a batch ``(..., T, T)``, shape ``G.shape[:-1]``, from losses of a
    shape that broadcasts to it (``(T,)``: the same losses for every entry)."""
    if losses is None:
        raise ValueError(f"{needed_by} needs the loss values: pass losses=")
    values = torch.as_tensor(losses).detach().to(device=G.device, dtype=torch.float64)
    T = G.shape[-1]
    if G.dim() == 2:
        values = values.reshape(-1)
        if values.shape[0] != T:
            raise ValueError(f"losses has {values.shape[0]} values but there are T={T} tasks")
        return values
    batch = G.shape[:-1]
    if not (values.dim() >= 1 and values.shape[-1] == T and broadcasts_to(values.shape, batch)):
        raise ValueError(f"losses has shape {tuple(values.shape)}; for G of shape {tuple(G.shape)} it must broadcast to {tuple(batch)}")
    return values.expand(batch)


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target``."""
    if len(shape) > len(target):
        return False
    return all(size in (1, goal) for size, goal in zip(reversed(shape), reversed(target)))


def symmetric64(G: torch.Tensor) -> torch.Tensor:
    """G in float64, symmetrised: a Gram from a BLAS ``J @ J.T`` can differ from its transpose by ulps."""
    G = G.detach().to(torch.float64)
    return (G + G.mT) / 2


def normalized(G: torch.Tensor) -> torch.Tensor:
    """``symmetric64(G)`` divided by its largest diagonal entry (unchanged when that is not positive);
    for a batch, each entry by its own.

    Every method is invariant to a positive rescaling of G, so the solvers work on an O(1) problem
    whatever the gradients' magnitude.
    """
    G = symmetric64(G)
    scale = G.diagonal(dim1=-2, dim2=-1).amax(dim=-1)[..., None, None]
    return G / torch.where(scale > 0, scale, torch.ones_like(scale))


def to_reduction(weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weights on the sum scale (``(..., T)``) → the requested scale."""
    return weights / weights.shape[-1] if reduction == "mean" else weights
