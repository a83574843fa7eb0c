"""What the closed-form methods (IMTL-G, Aligned-MTL, ConFIG) share: ``G`` in float64 with a flag for
non-finite input, the cosine matrix of the task gradients, and the tolerance below which an eigenvalue
is zero.

Everything here is tensor work on G's device, with no value read back to the host and no tensor built
from host data. The eigenvalue decompositions themselves are ``torch.linalg.eigh`` calls in the
methods: on the CPU nothing is read back, on CUDA ``eigh`` checks its LAPACK-style error code on the
host, which waits for the device.

Everything here takes a leading batch of independent problems, ``G`` of shape ``(..., T, T)``
(``torch.linalg.eigh`` decomposes a batch in one call). The products on ``(..., T)`` vectors are
:func:`matvec`, :func:`rmatvec` and :func:`dot`, elementwise products and sums rather than BLAS calls, so
that one problem and each entry of a batch are reduced in the same order: on the CPU, where a batched
``eigh`` runs LAPACK on each entry, a batch's weights are bit-identical to the unbatched calls. On CUDA a
batched ``eigh`` of small matrices may use another algorithm (Jacobi) than a single one: there the
entries agree with the unbatched calls to rounding.
"""

from __future__ import annotations

import torch


def prepare(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G64, poison, zero)``: ``G`` in float64; ``poison``, of shape ``G.shape[:-2]`` (0-d unbatched), 0
    for an entry whose ``G`` is finite and NaN for one that holds a NaN or an infinity (added to the
    weights, ``poison[..., None]``, it makes them NaN as the contract asks, without a branch); a 0-d zero
    for ``torch.where`` (a Python scalar there costs a conversion).

    ``G`` is not symmetrised: ``torch.linalg.eigh`` reads one triangle only, which is the same as
    symmetrising with it, so a BLAS Gram that differs from its transpose by ulps is fine. Entries that
    sum past the float64 range count as non-finite."""
    G64 = G.detach().to(torch.float64)
    return G64, G64.sum(dim=(-2, -1)) * 0.0, G64.new_zeros(())


def rank_tolerance(dtype: torch.dtype, size: int) -> float:
    """Eigenvalues of a Gram matrix at or below ``size·ε·λ_max`` are zero (``ε`` of the dtype the Gram
    matrix arrived in, which is as accurate as its entries are: a Gram matrix from fp32 gradients is
    accurate to ~fp32 rounding of ``λ_max`` whatever it is later converted to). It is the rule of
    NumPy's ``matrix_rank`` and the one the official Aligned-MTL code and TorchJD use. In terms of the
    gradients it drops the directions whose singular value is below ``sqrt(size·ε)·σ_max``: a Gram
    matrix cannot resolve smaller ones."""
    return size * torch.finfo(dtype).eps


def matvec(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` for ``A`` of shape ``(..., T, T)`` and ``x`` of shape ``(..., T)``, as a product and a sum over
    the last dimension: the same reduction for one problem as for each entry of a batch (a BLAS ``mv``
    and a batched ``bmm`` sum in different orders)."""
    return (A * x[..., None, :]).sum(dim=-1)


def rmatvec(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Aᵀ x``, as :func:`matvec` (a sum over the rows of ``A``)."""
    return (A * x[..., :, None]).sum(dim=-2)


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``xᵀy`` for ``x``, ``y`` of shape ``(..., T)``: shape ``(...)``, as :func:`matvec`."""
    return (x * y).sum(dim=-1)


def unit_gram(G: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, inverse_norms, nonzero)`` for a float64 Gram matrix ``G`` (or a batch of them): ``C`` the Gram
    matrix of the unit gradients ``u_t = g_t/‖g_t‖`` (the cosines), with a zero row and column for a zero
    gradient, and zeros in place of non-finite entries (a non-finite ``G`` has a NaN ``poison``: ``eigh``
    may raise on NaN input); ``inverse_norms`` ``1/‖g_t‖``, 0 for a zero gradient; ``nonzero`` the 0/1
    float mask of the non-zero gradients. ``G_tt = 0`` is exact for a zero gradient (a sum of squares), so
    nothing smaller counts as zero. No rescaling is needed: ``C`` is scale-free and the methods use the
    norms only in ratios."""
    squared = G.diagonal(dim1=-2, dim2=-1)
    nonzero = torch.heaviside(squared, zero)
    inverse_norms = squared.rsqrt().nan_to_num(0.0, 0.0, 0.0)  # 1/√0 = ∞ → 0
    C = (G * (inverse_norms[..., :, None] * inverse_norms[..., None, :])).nan_to_num(0.0, 0.0, 0.0)
    return C, inverse_norms, nonzero
