"""ConFIG: conflict-free inverse gradients (Liu, Chu & Thuerey, ICLR 2025).

With the unit gradients ``u_t = g_t/‖g_t‖`` as the rows of ``Û``, ConFIG takes the direction that has the
same projection onto every ``u_t``, from the pseudo-inverse, and gives it the length of the sum of the
gradients' projections onto it::

    x = Û⁺1,    x̂ = x/‖x‖,    d = (Σ_t g_tᵀx̂)·x̂

In Gram space ``Û⁺ = Ûᵀ(ÛÛᵀ)⁺`` with ``ÛÛᵀ = C``, the cosine matrix ``C = N⁻¹GN⁻¹`` (``N = diag(‖g_t‖)``),
so ``x = Σ_j a_j u_j`` with ``a = C⁺1``; then ``‖x‖² = aᵀCa`` and ``Σ_t g_tᵀx = nᵀCa``, and ::

    w_j = (nᵀCa / aᵀCa) · a_j / n_j        (d = Σ_j w_j g_j)

For linearly independent gradients ``Ûx = 1``: every ``g_tᵀd`` is positive and ``d`` makes the same
angle with every gradient (the paper's conflict-free guarantee). For linearly dependent ones ``Ûx`` is
the projection of ``1`` onto ``C``'s range, and a gradient can conflict with ``d``. The scale is
intrinsic (identical gradients give ``d = Σ_t g_t``, naive summation): it is kept as the sum scale;
``reduction="mean"`` divides by ``T``. The weights are invariant to a positive rescaling of ``G``.

``length`` chooses the official code's length model: ``"projection"`` (default, the paper's
``ProjectionLength``) or one of its ``Track*`` models, which rescale every gradient to a common norm
``τ`` before projecting, ``d = τ·(Σ_t u_tᵀx̂)·x̂``, with ``τ`` the ``"min"``, ``"max"``, ``"arithmetic_mean"``,
``"harmonic_mean"`` or ``"geometric_mean"`` of the gradient norms (``TrackMinimum``, ``TrackMaximum``,
``TrackArithmeticAverage``, ``TrackHarmonicAverage``, ``TrackGeometricAverage``). ``TrackSpecific``
(one chosen task's norm) and the direction-weight models (a right-hand side other than ``1``; only
equal weights ship) are not offered.

**Degenerate cases.** The pseudo-inverse drops the eigenvalues of ``C`` at or below ``T·ε·λ_max`` (``ε``
of G's dtype; the directions whose singular value in ``Û`` is below ``sqrt(T·ε)``, which a Gram matrix
cannot resolve). A zero gradient has a zero unit vector, as in the official code (``nan_to_num``): it
does not steer ``x``, adds nothing to the length and is left out of the ``Track*`` norms; its weight is
0. When ``1`` has no component in ``C``'s range beyond ``√ε·‖1‖`` (an antiparallel pair, an even number
of alternating collinear gradients) there is no direction with positive projections: ``d = 0``, as in
exact arithmetic (the official code would normalise a rounding-level vector there).

Differences from the official code (``conflictfree.ConFIG_update``, ``ConFIGOperator``): it solves
``Ûx = 1`` with ``torch.linalg.lstsq`` (or ``pinv``) on the ``T × P`` matrix, the same ``x``; for
``T = 2`` ``ConFIGOperator`` uses an equivalent form without the pseudo-inverse
(``allow_simplified_model=True``) that gives ``d = 0`` for parallel gradients (here: ``g_1 + g_2``, the
limit of nearly parallel ones) and NaN for a zero gradient; its ``Track*`` models give NaN for a zero
gradient. TorchJD's ``ConFIG`` (an aggregator on ``J``, not on ``G``) is the general formula with
``pinv``; its ``pref_vector`` is the direction-weight vector.

The decomposition is one ``torch.linalg.eigh`` of ``C`` (``T × T``, float64): on CUDA ``eigh`` checks
its error code on the host, a synchronisation; nothing else reads a value back.
"""

from __future__ import annotations

import math

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._spectral import finite_symmetric64, nan_unless, rank_tolerance, unit_gram

LENGTHS = ("projection", "min", "max", "arithmetic_mean", "harmonic_mean", "geometric_mean")

BIBTEX = """@inproceedings{liu2025config,
  title     = {{ConFIG}: Towards Conflict-free Training of Physics Informed Neural Networks},
  author    = {Liu, Qiang and Chu, Mengyu and Thuerey, Nils},
  booktitle = {International Conference on Learning Representations},
  year      = {2025},
  url       = {https://openreview.net/forum?id=APojAzJQiq}
}"""


def check_config_options(length: str) -> None:
    if length not in LENGTHS:
        raise ValueError(f"length must be one of {LENGTHS}, got {length!r}")


def config_weights(G: torch.Tensor, *, length: str = "projection", reduction: str = "sum") -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the ConFIG update (its own, sum-like scale)."""
    check_gram(G)
    check_config_options(length)
    check_reduction(reduction)
    T = G.shape[0]
    eps = torch.finfo(G.dtype).eps
    G64, finite = finite_symmetric64(G)
    C, norms, mask = unit_gram(G64)
    lam, Q = torch.linalg.eigh(C)
    kept = lam > rank_tolerance(G.dtype, T) * lam.amax()
    b = Q.mT @ mask  # 1 (over the non-zero gradients) in the eigenbasis
    in_range = torch.where(kept, b, torch.zeros_like(b))
    a = Q @ (in_range / torch.where(kept, lam, torch.ones_like(lam)))  # C⁺1
    squared = (in_range * in_range / torch.where(kept, lam, torch.ones_like(lam))).sum()  # aᵀCa = ‖x‖²
    projected = Q @ in_range  # C a: each unit gradient's projection onto x
    if length == "projection":
        total = norms @ projected
    else:
        total = _tracked_norm(norms, mask, length) * projected.sum()
    has_direction = in_range.norm() > math.sqrt(eps) * mask.sum().sqrt()
    scale = total / torch.where(has_direction, squared, torch.ones_like(squared))
    w = torch.where(has_direction, scale, torch.zeros_like(scale)) * a / torch.where(mask > 0, norms, torch.ones_like(norms))
    return to_reduction(nan_unless(finite, w * mask), reduction)


def _tracked_norm(norms: torch.Tensor, mask: torch.Tensor, length: str) -> torch.Tensor:
    """The common norm ``τ`` of the ``Track*`` length models, over the non-zero gradients (0 if none)."""
    present = mask > 0
    safe = torch.where(present, norms, torch.ones_like(norms))  # the norms are ≤ 1: divided by the largest
    count = mask.sum().clamp_min(1)
    if length == "min":
        value = safe.amin()
    elif length == "max":
        value = norms.amax()
    elif length == "arithmetic_mean":
        value = norms.sum() / count
    elif length == "harmonic_mean":
        value = count / (mask / safe).sum().clamp_min(1)  # the largest norm, 1, contributes 1 when present
    else:
        value = ((mask * safe.log()).sum() / count).exp()
    return torch.where(present.any(), value, torch.zeros_like(value))
