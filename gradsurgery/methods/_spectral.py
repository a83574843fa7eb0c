"""What the closed-form methods (IMTL-G, Aligned-MTL, ConFIG) share: ``G`` in float64 with a flag for
non-finite input, the cosine matrix of the task gradients, and the tolerance below which an eigenvalue
is zero.

Everything here is tensor work on G's device, with no value read back to the host and no tensor built
from host data. The eigenvalue decompositions themselves are ``torch.linalg.eigh`` calls in the
methods: on the CPU nothing is read back, on CUDA ``eigh`` checks its LAPACK-style error code on the
host, which waits for the device.
"""

from __future__ import annotations

import torch


def prepare(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G64, poison, zero)``: ``G`` in float64; ``poison``, a 0-d tensor that is 0 when ``G`` is finite
    and NaN when it holds a NaN or an infinity (added to the weights, it makes them NaN as the contract
    asks, without a branch); a 0-d zero for ``torch.where`` (a Python scalar there costs a conversion).

    ``G`` is not symmetrised: ``torch.linalg.eigh`` reads one triangle only, which is the same as
    symmetrising with it, so a BLAS Gram that differs from its transpose by ulps is fine. Entries that
    sum past the float64 range count as non-finite."""
    G64 = G.detach().to(torch.float64)
    return G64, G64.sum() * 0.0, G64.new_zeros(())


def rank_tolerance(dtype: torch.dtype, size: int) -> float:
    """Eigenvalues of a Gram matrix at or below ``size·ε·λ_max`` are zero (``ε`` of the dtype the Gram
    matrix arrived in, which is as accurate as its entries are: a Gram matrix from fp32 gradients is
    accurate to ~fp32 rounding of ``λ_max`` whatever it is later converted to). It is the rule of
    NumPy's ``matrix_rank`` and the one the official Aligned-MTL code and TorchJD use. In terms of the
    gradients it drops the directions whose singular value is below ``sqrt(size·ε)·σ_max``: a Gram
    matrix cannot resolve smaller ones."""
    return size * torch.finfo(dtype).eps


def unit_gram(G: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, inverse_norms, nonzero)`` for a float64 Gram matrix ``G``: ``C`` the Gram matrix of the unit
    gradients ``u_t = g_t/‖g_t‖`` (the cosines), with a zero row and column for a zero gradient, and
    zeros in place of non-finite entries (a non-finite ``G`` has a NaN ``poison``: ``eigh`` may raise on
    NaN input); ``inverse_norms`` ``1/‖g_t‖``, 0 for a zero gradient; ``nonzero`` the 0/1 float mask of
    the non-zero gradients. ``G_tt = 0`` is exact for a zero gradient (a sum of squares), so nothing
    smaller counts as zero. No rescaling is needed: ``C`` is scale-free and the methods use the norms
    only in ratios."""
    squared = G.diagonal()
    nonzero = torch.heaviside(squared, zero)
    inverse_norms = squared.rsqrt().nan_to_num(0.0, 0.0, 0.0)  # 1/√0 = ∞ → 0
    C = (G * torch.outer(inverse_norms, inverse_norms)).nan_to_num(0.0, 0.0, 0.0)
    return C, inverse_norms, nonzero
