"""IMTL-G: the gradient half of impartial multi-task learning (Liu et al., ICLR 2021).

IMTL-G combines the task gradients, ``d = Σ_t α_t g_t`` with ``Σ_t α_t = 1``, so that ``d`` has the same
projection onto every unit task gradient ``u_t = g_t/‖g_t‖``: ``dᵀu_1 = dᵀu_t`` for all ``t``. With
``α_1 = 1 − Σ_{t≥2} α_t`` the paper solves this linear system in closed form::

    α_{2:T} = g_1ᵀ Uᵀ (D Uᵀ)⁻¹,    D = [g_1 − g_t]_{t=2..T},    U = [u_1 − u_t]_{t=2..T}  (rows)

In Gram space, with ``n_t = sqrt(G_tt)``, ``N = diag(n)`` and the cosine matrix ``C = N⁻¹GN⁻¹``, the
projections are ``N⁻¹Gα``, so the condition is ``Gα = c·n`` for some scalar ``c``. Substituting
``α = N⁻¹β`` gives ``Cβ = c·1``: for linearly independent gradients ``β ∝ C⁻¹1`` and ::

    α = N⁻¹C⁻¹1 / (1ᵀN⁻¹C⁻¹1)

which is the paper's closed form, computed without favouring task 1. The weights are put on the sum
scale (``w = T·α``; ``reduction="mean"`` gives ``α``). They are invariant to a positive rescaling of
``G``, so the update is positively homogeneous.

**Linearly dependent gradients** (``C`` singular: parallel or antiparallel gradients, more tasks than
independent directions), where ``DUᵀ`` may be singular and the paper's formula undefined, take the
limit of the regularised problem ``C + εI`` as ``ε → 0`` (as if each unit gradient had a private
orthogonal component of length ``√ε``). Its solution is ``β ∝ P₀1``, the component of ``1`` in ``C``'s
null space, when that component is not negligible: then ``d = 0``, the only direction with equal
projections, and the solution the paper's formula gives whenever ``DUᵀ`` is invertible; otherwise
``β ∝ C⁺1``. So gradients that span fewer directions than there are tasks typically give ``d = 0``; an
antiparallel pair gives ``d = 0``; parallel gradients, which every ``α`` satisfies, give
``α_t ∝ 1/n_t`` (the limit of two nearly parallel gradients). An eigenvalue of ``C`` is zero at or
below ``T·ε·λ_max`` (``ε`` of G's dtype), and ``P₀1`` is negligible below ``√ε·‖1‖``. When no finite
``α`` exists (``1ᵀN⁻¹β = 0`` up to rounding) the weights are 0.

**Zero gradients.** A task whose gradient is zero has no unit gradient and takes no part in the
condition: the other tasks are solved as if it were absent (their ``α`` sums to 1) and their weights
are put on the sum scale of those ``T'`` tasks, ``w = T'·α``; the zero task gets the weight 1, which
does not change ``d`` and keeps ``Σ_t w_t = T``. With one non-zero gradient left this is naive
summation; with none, ``w = 1`` and ``d = 0``.

Differences from other implementations: the official code was not released. LibMTL's ``IMTL`` is
IMTL-G combined with IMTL-L (learned loss scales), uses the ``D, U`` formula with ``torch.inverse``
(an error for singular ``DUᵀ``) and returns NaN for a zero gradient (``g/‖g‖``). TorchJD's ``IMTLG``
uses ``α ∝ G⁺n`` (weights summing to 1, the mean scale here): the same for linearly independent
gradients, but for dependent ones it returns a non-zero ``d`` whose projections are not equal (it
minimises ``‖Gα − n‖`` instead; e.g. an antiparallel pair of unequal norms gives a non-zero ``d``),
and a zero gradient gets weight 0 while the others still sum to 1. The ConFIG repository's
``IMTLGOperator`` uses the ``D, U`` formula with a pseudo-inverse and zero unit vectors for zero
gradients.

The decomposition is one ``torch.linalg.eigh`` of ``C`` (``T × T``, float64): on CUDA ``eigh``
checks its error code on the host, a synchronisation; nothing else reads a value back.
"""

from __future__ import annotations

import math

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._spectral import finite_symmetric64, nan_unless, rank_tolerance, unit_gram

BIBTEX = """@inproceedings{liu2021towards,
  title     = {Towards Impartial Multi-task Learning},
  author    = {Liu, Liyang and Li, Yi and Kuang, Zhanghui and Xue, Jing-Hao and Chen, Yimin and Yang, Wenming and Liao, Qingmin and Zhang, Wayne},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://openreview.net/forum?id=IMPnRXEWpvr}
}"""


def imtl_g_weights(G: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the IMTL-G update: ``T·α`` on the sum scale."""
    check_gram(G)
    check_reduction(reduction)
    T = G.shape[0]
    eps = torch.finfo(G.dtype).eps
    G64, finite = finite_symmetric64(G)
    C, norms, mask = unit_gram(G64)
    lam, Q = torch.linalg.eigh(C)
    null = lam <= rank_tolerance(G.dtype, T) * lam.amax()
    b = Q.mT @ mask  # 1 (over the non-zero gradients) in the eigenbasis
    null_part = Q @ torch.where(null, b, torch.zeros_like(b))
    range_part = Q @ torch.where(null, torch.zeros_like(b), b / torch.where(null, torch.ones_like(lam), lam))
    count = mask.sum()
    use_null = null_part.norm() > math.sqrt(eps) * count.sqrt()
    beta = torch.where(use_null, null_part, range_part) * mask
    alpha = beta / torch.where(mask > 0, norms, torch.ones_like(norms))
    total = alpha.sum()
    # Σα = 0 up to the rounding of its terms: no finite α satisfies the condition.
    solvable = total.abs() > T * eps * alpha.abs().sum()
    alpha = torch.where(solvable, alpha / torch.where(solvable, total, torch.ones_like(total)), torch.zeros_like(alpha))
    w = count * alpha + (1 - mask)
    return to_reduction(nan_unless(finite, w), reduction)
