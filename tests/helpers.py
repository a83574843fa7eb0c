"""Gradient matrices with named structures, shared by the tests."""

from __future__ import annotations

import torch

KINDS = ("conflicting", "agreeing", "parallel", "antiparallel", "zero_row", "rank_deficient")


def make_J(kind: str, T: int, P: int, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """A (T, P) task-gradient matrix of the given structure."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(P, generator=gen, dtype=torch.float64)
    if kind == "conflicting":
        J = torch.randn(T, P, generator=gen, dtype=torch.float64)
    elif kind == "agreeing":
        J = base + 0.3 * torch.randn(T, P, generator=gen, dtype=torch.float64)
    elif kind == "parallel":
        J = torch.rand(T, 1, generator=gen, dtype=torch.float64).add(0.5) * base
    elif kind == "antiparallel":
        signs = torch.tensor([(-1.0) ** t for t in range(T)], dtype=torch.float64)[:, None]
        J = signs * torch.rand(T, 1, generator=gen, dtype=torch.float64).add(0.5) * base
    elif kind == "zero_row":
        J = torch.randn(T, P, generator=gen, dtype=torch.float64)
        J[T // 2] = 0
    elif kind == "rank_deficient":
        rank = max(1, min(2, T - 1))
        J = torch.randn(T, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, P, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return J.to(dtype)
