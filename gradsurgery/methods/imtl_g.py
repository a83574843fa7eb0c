"""IMTL-G: the gradient half of impartial multi-task learning (Liu et al., ICLR 2021).

IMTL-G combines the task gradients, ``d = Σ_t α_t g_t`` with ``Σ_t α_t = 1``, so that ``d`` has the same
projection onto every unit task gradient ``u_t = g_t/‖g_t‖``: ``dᵀu_1 = dᵀu_t`` for all ``t``. With
``α_1 = 1 − Σ_{t≥2} α_t`` the paper solves this linear system in closed form::

    α_{2:T} = g_1ᵀ Uᵀ (D Uᵀ)⁻¹,    D = [g_1 − g_t]_{t=2..T},    U = [u_1 − u_t]_{t=2..T}  (rows)

In Gram space, with ``n_t = sqrt(G_tt)``, ``N = diag(n)`` and the cosine matrix ``C = N⁻¹GN⁻¹``, the
projections are ``N⁻¹Gα``, so the condition is ``Gα = c·n`` for some scalar ``c``. Substituting
``α = N⁻¹β`` gives ``Cβ = c·1``: for linearly independent gradients ``β ∝ C⁻¹1`` and ::

    α = N⁻¹C⁻¹1 / (1ᵀN⁻¹C⁻¹1)

which is the paper's closed form, computed without singling out task 1. For ``T = 2`` it is
``α = (n_2, n_1)/(n_1 + n_2)`` whatever the angle, used directly. The weights are put on the sum scale
(``w = T·α``; ``reduction="mean"`` gives ``α``). They are invariant to a positive rescaling of ``G``, so
the update is positively homogeneous. (The paper applies IMTL-G to the gradients with respect to the
shared representation, which is this library's representation mode.)

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
``α`` exists (``|Σ_t α_t| ≤ T·ε·Σ_t |α_t|`` before normalising) the weights are 0: ``d = 0``.

**Zero gradients.** A task whose gradient is zero has no unit gradient and takes no part in the
condition: the other tasks are solved as if it were absent (their ``α`` sums to 1) and their weights
are put on the sum scale of those ``T'`` tasks, ``w = T'·α``; the zero task gets the weight 1, which
does not change ``d`` and keeps ``Σ_t w_t = T``. With one non-zero gradient left this is naive
summation; with none, ``w = 1`` and ``d = 0``. A ``G`` holding a NaN or an infinity gives NaN weights.

Differences from other implementations (we found no official code release). LibMTL's ``IMTL`` is
IMTL-G combined with IMTL-L (learned loss scales), uses the ``D, U`` formula with ``torch.inverse``
(an error for singular ``DUᵀ``) and returns NaN for a zero gradient (``g/‖g‖``). TorchJD's ``IMTLG``
uses ``α ∝ G⁺n`` (weights summing to 1, the mean scale here): the same for linearly independent
gradients, but for dependent ones it is the least-squares solution of ``Gα = n``, whose projections
need not be equal (an antiparallel pair of norms 1 and 2 gets ``α = (−1, 2)``, ``d = −5u_1``, which
conflicts with task 1; here ``d = 0``), parallel gradients get ``α_t ∝ n_t`` (here ``1/n_t``), and a
zero gradient gets weight 0 while the others still sum to 1. The ConFIG repository's ``IMTLGOperator``
uses the ``D, U`` formula with a pseudo-inverse and zero unit vectors for zero gradients.

For ``T ≥ 3`` the decomposition is one ``torch.linalg.eigh`` of ``C`` (``T × T``, float64): on CUDA
``eigh`` checks its error code on the host, a synchronisation; nothing else reads a value back.

**Batches.** ``G`` of shape ``(..., T, T)`` gives ``w`` of shape ``(..., T)``: one independent problem per
entry, one batched ``eigh`` and elementwise products for all of them. On the CPU each entry is bit-identical
to the unbatched call (on CUDA, to rounding: a batched ``eigh`` may use another algorithm).
"""

from __future__ import annotations

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._spectral import dot, matvec, prepare, rank_tolerance, rmatvec, unit_gram
from .spec import Method

BIBTEX = """@inproceedings{liu2021towards,
  title     = {Towards Impartial Multi-task Learning},
  author    = {Liu, Liyang and Li, Yi and Kuang, Zhanghui and Xue, Jing-Hao and Chen, Yimin and Yang, Wenming and Liao, Qingmin and Zhang, Wayne},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://openreview.net/forum?id=IMPnRXEWpvr}
}"""


def imtl_g_weights(G: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the IMTL-G update: ``T·α`` on the sum scale.

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)``; ``w`` is ``(..., T)``."""
    check_gram(G)
    check_reduction(reduction)
    T = G.shape[-1]
    eps = torch.finfo(G.dtype).eps
    G64, poison, zero = prepare(G)
    poison = poison[..., None]
    if T == 2:
        return to_reduction(_two_tasks(G64, zero) + poison, reduction)
    C, inverse_norms, mask = unit_gram(G64, zero)
    lam, Q = torch.linalg.eigh(C)  # ascending
    null = lam <= lam[..., -1:] * rank_tolerance(G.dtype, T)
    b = rmatvec(Q, mask)  # 1 (over the non-zero gradients) in the eigenbasis
    null_b = b * null
    count = mask.sum(dim=-1, keepdim=True)
    # P₀1 when its norm exceeds √ε·‖1‖, else C⁺1 (Q is orthogonal: ‖P₀1‖ = ‖null_b‖).
    use_null = dot(null_b, null_b)[..., None] > count * eps
    beta = matvec(Q, torch.where(use_null, null_b, torch.where(null, zero, b / lam)))
    alpha = beta * inverse_norms
    alpha = alpha / alpha.sum(dim=-1, keepdim=True)
    # Σα = 0 up to the rounding of its terms (or NaN from 0/0): no finite α satisfies the condition.
    solvable = alpha.abs().sum(dim=-1, keepdim=True) < 1 / (T * eps)
    return to_reduction(torch.where(solvable, alpha * count, zero) + (1 - mask) + poison, reduction)


def _two_tasks(G: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # Two non-zero gradients: α = (n₂, n₁)/(n₁ + n₂) whatever their angle (C⁻¹1 ∝ 1 for a 2 × 2 cosine
    # matrix, and P₀1 ∝ 1 or 0 when it is singular), so w = 2α. One or none: w = 1.
    norms = G.diagonal(dim1=-2, dim2=-1).sqrt()
    w = 2 * norms.flip(-1) / norms.sum(dim=-1, keepdim=True)
    return torch.where(norms.prod(dim=-1, keepdim=True) > zero, w, 1.0)


METHOD = Method(name="IMTLG", function="imtl_g", weights=imtl_g_weights, doc=__doc__ or "", bibtex=BIBTEX)
