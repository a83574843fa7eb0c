"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023, Algorithm 1).

Aligned-MTL replaces the gradient matrix by an aligned one of condition number 1: with the singular value
decomposition ``J = U Σ Vᵀ`` (rows of ``J`` the task gradients) of rank ``r``, the aligned gradients are the
rows of ``Ĵ = s·U_r V_rᵀ`` (the orthogonal Procrustes solution, rescaled), orthogonal and of equal norm ``s``,
and the update is their sum. In Gram space, ``G = J Jᵀ = U Λ Uᵀ`` with ``Λ = Σ²``, so ``Ĵ = B J`` for the
balance transformation ::

    B = s · U_r Λ_r^{-1/2} U_rᵀ,    w = B·1,    d = wᵀJ = Σ_t ĝ_t

``scale_mode`` chooses ``s²``: ``"min"`` (default; paper, official code and TorchJD) the smallest kept
eigenvalue ``λ_r``, i.e. ``s = σ_min``; ``"median"`` the median kept eigenvalue (the lower one of the two
middle values for an even rank, as ``torch.median`` in the official code and TorchJD); ``"rmse"`` their
mean (``s`` the root mean square of the singular values). ``B`` depends on ``U`` only through spectral
projectors (equal eigenvalues get equal factors), so neither the signs nor the order of the
eigenvectors, nor the basis chosen within a repeated eigenvalue, changes the result.

Scale: the official code and LibMTL sum the aligned gradients (``w = B·1``, the sum scale used here);
the paper writes the update with task weights and TorchJD's default weights are ``1/T`` (its weights
are ``B·1/T``, ``reduction="mean"`` here). ``w`` is invariant to a positive rescaling of ``G``, so the
update is positively homogeneous.

**Rank.** Eigenvalues at or below ``T·ε·λ_max`` count as zero (``ε`` of G's dtype), the rule of the
official code (which takes ``ε`` of the default dtype, float32) and TorchJD; their directions are left
out of ``B``. A zero gradient is such a direction on its own: it gets weight 0 and the other tasks are
aligned as if it were absent. When every gradient is zero (rank 0), ``B = I`` (as in TorchJD; the
official code fails there): ``w = 1``, ``d = 0``. LibMTL's ``Aligned_MTL`` has only the ``"min"`` scale
and fails at rank 0, like the official code. A ``G`` holding a NaN or an infinity gives NaN weights.

The decomposition is one ``torch.linalg.eigh`` of ``G`` (``T × T``, float64): on CUDA ``eigh`` checks
its error code on the host, a synchronisation; nothing else reads a value back (the official code and
TorchJD count the rank and index with it on the host).

**Batches.** ``G`` of shape ``(..., T, T)`` gives ``w`` of shape ``(..., T)`` (and ``B`` of shape
``(..., T, T)``): one independent problem per entry, one batched ``eigh`` and elementwise products for
all of them. On the CPU each entry's ``w`` is bit-identical to the unbatched call (on CUDA, to rounding: a
batched ``eigh`` may use another algorithm); ``B``, a matrix product, agrees to rounding.
"""

from __future__ import annotations

import math

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._spectral import matvec, prepare, rank_tolerance
from .spec import Method, Option, one_of

SCALE_MODES = ("min", "median", "rmse")

BIBTEX = """@inproceedings{senushkin2023independent,
  title     = {Independent Component Alignment for Multi-Task Learning},
  author    = {Senushkin, Dmitry and Patakin, Nikolay and Kuznetsov, Arseny and Konushin, Anton},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {20083--20093},
  year      = {2023}
}"""


def check_aligned_mtl_options(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")


def aligned_mtl_weights(G: torch.Tensor, *, scale_mode: str = "min", reduction: str = "sum") -> torch.Tensor:
    """Weights ``w = B·1`` (float64, on G's device) with ``d = wᵀJ`` the Aligned-MTL update (sum scale).

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)``; ``w`` is ``(..., T)``."""
    check_gram(G)
    check_aligned_mtl_options(scale_mode)
    check_reduction(reduction)
    U, factors, present, poison = _spectrum(G, scale_mode)
    w = matvec(U, factors * U.sum(dim=-2)) * present  # B·1 = U diag(f) Uᵀ1
    rank_0 = present.any(dim=-1, keepdim=True)  # rank 0: B = I
    return to_reduction(torch.where(rank_0, w, 1.0) + poison[..., None], reduction)


def balance_transformation(G: torch.Tensor, *, scale_mode: str = "min") -> torch.Tensor:
    """``B`` (float64, ``T × T``, on G's device): the aligned gradients are the rows of ``B J``; for a
    batch ``G`` of shape ``(..., T, T)``, one ``B`` per entry."""
    check_gram(G)
    check_aligned_mtl_options(scale_mode)
    U, factors, present, poison = _spectrum(G, scale_mode)
    B = (U * factors[..., None, :]) @ U.mT * (present[..., :, None] * present[..., None, :])
    identity = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
    return torch.where(present.any(dim=-1)[..., None, None], B, identity) + poison[..., None, None]


def _spectrum(G: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, ...]:
    """``(U, f, present, poison)`` with ``B = U diag(f) Uᵀ``: ``f = s/sqrt(λ)`` on the kept eigenvalues,
    0 elsewhere (NaN when none is kept); ``present`` masks the non-zero gradients (a zero gradient's row
    and column of ``B`` are set to 0 exactly, rather than to the rounding of the other eigenvectors)."""
    T = G.shape[-1]
    G64, poison, zero = prepare(G)  # B is invariant to G's scale: no need to normalise it
    present = torch.heaviside(G64.diagonal(dim1=-2, dim2=-1), zero)
    lam, U = torch.linalg.eigh(G64.nan_to_num(0.0, 0.0, 0.0))  # ascending: the kept eigenvalues last
    kept_lam = torch.where(lam > lam[..., -1:] * rank_tolerance(G.dtype, T), lam, math.inf)  # s²/∞ = 0 for the others
    factors = (_squared_scale(lam, kept_lam, scale_mode) / kept_lam).sqrt()
    return U, factors, present, poison


def _squared_scale(lam: torch.Tensor, kept_lam: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """``s²`` (shape ``(..., 1)``) from the kept eigenvalues, the last ``rank`` entries of the ascending ``lam``."""
    if scale_mode == "min":
        return kept_lam.amin(dim=-1, keepdim=True)
    kept = kept_lam < math.inf
    rank = kept.sum(dim=-1, keepdim=True)
    if scale_mode == "median":
        # torch.median of the kept values: the ((rank − 1) // 2)-th smallest, at T − rank + that.
        T = lam.shape[-1]
        index = (T - rank + (rank - 1).clamp_min(0) // 2).clamp(max=T - 1)
        return lam.gather(-1, index)
    return (lam * kept).sum(dim=-1, keepdim=True) / rank.clamp_min(1)


METHOD = Method(
    name="AlignedMTL",
    function="aligned_mtl",
    weights=aligned_mtl_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(Option("scale_mode", "min", one_of("scale_mode", SCALE_MODES), "which eigenvalue sets the scale of the aligned gradients"),),
)
