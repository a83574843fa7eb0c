"""What the closed-form methods (IMTL-G, Aligned-MTL, ConFIG) share: a finite, symmetric float64 copy of
``G``, the cosine matrix of the task gradients, and the tolerance below which an eigenvalue is zero.

Everything here is tensor work on G's device, with no value read back to the host. The eigenvalue
decompositions themselves are ``torch.linalg.eigh`` calls in the methods: on the CPU nothing is read
back, on CUDA ``eigh`` checks its LAPACK-style error code on the host, which waits for the device.
"""

from __future__ import annotations

import torch

from ._common import symmetric64


def finite_symmetric64(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(symmetric64(G), finite)`` with a non-finite ``G`` replaced by zeros and ``finite`` the 0-d flag
    that says it was not: ``eigh`` raises on NaN input, and the contract is NaN weights instead (the
    caller applies them with :func:`nan_unless`)."""
    G = symmetric64(G)
    finite = G.isfinite().all()
    return torch.where(finite, G, torch.zeros_like(G)), finite


def nan_unless(finite: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, w, torch.full_like(w, float("nan")))


def rank_tolerance(dtype: torch.dtype, size: int) -> float:
    """Eigenvalues of a Gram matrix at or below ``size·ε·λ_max`` are zero (``ε`` of the dtype the Gram
    matrix arrived in, which is as accurate as its entries are: a Gram matrix from fp32 gradients is
    accurate to ~fp32 rounding of ``λ_max`` whatever it is later converted to). It is the rule of
    NumPy's ``matrix_rank`` and the one the official Aligned-MTL code and TorchJD use. In terms of the
    gradients it drops the directions whose singular value is below ``sqrt(size·ε)·σ_max``: a Gram
    matrix cannot resolve smaller ones."""
    return size * torch.finfo(dtype).eps


def unit_gram(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, norms, nonzero)`` for a symmetric float64 ``G``: ``C`` the Gram matrix of the unit gradients
    ``u_t = g_t/‖g_t‖`` (the cosines; unit diagonal), with a zero row and column for a zero gradient;
    ``norms`` the gradient norms divided by the largest (all-zero when every gradient is zero);
    ``nonzero`` the float mask of non-zero gradients. ``G_tt = 0`` is exact for a zero gradient (a sum
    of squares), so nothing smaller counts as zero."""
    squared = G.diagonal().clamp_min(0)
    nonzero = squared > 0
    ones = torch.ones_like(squared)
    safe = torch.where(nonzero, squared, ones).sqrt()
    C = G / safe[:, None] / safe[None, :]
    mask = nonzero.to(G.dtype)
    # The diagonal is 1 up to rounding; make it exact (and 0 for a zero gradient).
    C = torch.diagonal_scatter(C, mask)
    norms = torch.where(nonzero, safe, torch.zeros_like(safe))
    largest = norms.amax()
    norms = norms / torch.where(largest > 0, largest, torch.ones_like(largest))
    return C, norms, mask
