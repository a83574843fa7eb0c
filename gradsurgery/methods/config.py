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
``reduction="mean"`` divides by ``T``. The weights are invariant to a positive rescaling of ``G``, so
the update is positively homogeneous. For ``T = 2``, ``1`` is an eigenvector of ``C`` and
``w_j = τ/n_j`` (``τ`` the mean norm for ``"projection"``), used directly.

``length`` chooses the official code's length model: ``"projection"`` (default, the paper's
``ProjectionLength``) or one of its ``Track*`` models, which rescale every gradient to a common norm ``τ``
before projecting, ``d = τ·(Σ_t u_tᵀx̂)·x̂``, with ``τ`` the ``"min"``, ``"max"``, ``"arithmetic_mean"``,
``"harmonic_mean"`` or ``"geometric_mean"`` of the gradient norms (``TrackMinimum``, ``TrackMaximum``,
``TrackArithmeticAverage``, ``TrackHarmonicAverage``, ``TrackGeometricAverage``). ``TrackSpecific`` (one
chosen task's norm) and the direction-weight models (a right-hand side other than ``1``; only equal weights
ship) are not offered.

**Degenerate cases.** The pseudo-inverse drops the eigenvalues of ``C`` at or below ``T·ε·λ_max`` (``ε``
of G's dtype; the directions whose singular value in ``Û`` is below ``sqrt(T·ε)``, which a Gram matrix
cannot resolve). A zero gradient has a zero unit vector, as in the official code (``nan_to_num``): it
does not steer ``x``, adds nothing to the length and is left out of the ``Track*`` norms; its weight is
0 (the paper's ``U(g) = g/(‖g‖ + ε)`` serves the same purpose). When ``1`` has no component in ``C``'s
range beyond ``√ε·‖1‖`` (an antiparallel pair, an even number of alternating collinear gradients) there
is no direction with positive projections: ``d = 0``, as in exact arithmetic (the official code would
normalise a rounding-level vector there). A ``G`` holding a NaN or an infinity gives NaN weights.

Differences from the official code (``conflictfree.ConFIG_update``, ``ConFIGOperator``): it solves ``Ûx = 1``
with ``torch.linalg.lstsq`` (or ``pinv``) on the ``T × P`` matrix, the same ``x``; for ``T = 2``
``ConFIGOperator`` uses an equivalent form without the pseudo-inverse (``allow_simplified_model=True``),
undefined for parallel gradients (0/0: NaN, or a direction made of rounding errors; here ``g_1 + g_2``, the
limit of nearly parallel ones) and NaN for a zero gradient; its ``Track*`` models give NaN for a zero
gradient. TorchJD's ``ConFIG`` (an aggregator on ``J``, not on ``G``) is the general formula with ``pinv``;
its ``pref_vector`` is the direction-weight vector.

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
from .spec import Method, Option, one_of

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
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the ConFIG update (its own, sum-like scale).

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)``; ``w`` is ``(..., T)``."""
    check_gram(G)
    check_config_options(length)
    check_reduction(reduction)
    T = G.shape[-1]
    eps = torch.finfo(G.dtype).eps
    G64, poison, zero = prepare(G)
    poison = poison[..., None]
    C, inverse_norms, mask = unit_gram(G64, zero)
    norms = G64.diagonal(dim1=-2, dim2=-1).sqrt()
    if T == 2:
        return to_reduction(_two_tasks(C, norms, inverse_norms, mask, length, eps, zero) + poison, reduction)
    lam, Q = torch.linalg.eigh(C)  # ascending
    kept = lam > lam[..., -1:] * rank_tolerance(G.dtype, T)
    in_range = rmatvec(Q, mask) * kept  # the part of 1 (over the non-zero gradients) in C's range, eigenbasis
    coefficients = torch.where(kept, in_range / lam, zero)
    a = matvec(Q, coefficients)  # C⁺1
    squared = dot(in_range, coefficients)  # aᵀCa = ‖x‖²
    projections = matvec(Q, in_range)  # Ca: each unit gradient's projection onto x
    if length == "projection":
        total = dot(norms, projections)
    else:
        total = _tracked_norm(norms, inverse_norms, mask, length, zero) * projections.sum(dim=-1)
    has_direction = dot(in_range, in_range) > mask.sum(dim=-1) * eps
    scale = torch.where(has_direction, total / squared, zero)
    return to_reduction(scale[..., None] * a * inverse_norms + poison, reduction)


def _two_tasks(
    C: torch.Tensor,
    norms: torch.Tensor,
    inverse_norms: torch.Tensor,
    mask: torch.Tensor,
    length: str,
    eps: float,
    zero: torch.Tensor,
) -> torch.Tensor:
    # C = [[1, ρ], [ρ, 1]] has the eigenvectors (1, ±1)/√2 and 1 is the one of eigenvalue 1 + ρ: a = 1/(1 + ρ),
    # Ca = 1 and aᵀCa = 2/(1 + ρ), so w_j = τ·(1ᵀCa/aᵀCa)·a_j/n_j = τ/n_j, with τ the mean norm for
    # "projection" (nᵀCa = n₁ + n₂). d = 0 when 1 + ρ is zero to the rank tolerance (antiparallel
    # gradients). One non-zero gradient: w = 1 on it (its C is [[1, 0], [0, 0]]).
    rho = C[..., 0, 1]
    aligned = (1 + rho > 2 * eps * (1 + rho.abs()))[..., None]
    tau = norms.mean(dim=-1) if length == "projection" else _tracked_norm(norms, inverse_norms, mask, length, zero)
    both = mask.prod(dim=-1, keepdim=True) > zero
    return torch.where(both, torch.where(aligned, tau[..., None] * inverse_norms, zero), mask)


def _tracked_norm(
    norms: torch.Tensor, inverse_norms: torch.Tensor, mask: torch.Tensor, length: str, zero: torch.Tensor
) -> torch.Tensor:
    """The common norm ``τ`` (shape ``(...)``) of the ``Track*`` length models, over the non-zero gradients
    (0 if none)."""
    count = mask.sum(dim=-1)
    if length == "min":
        lifted = norms + (1 - mask) * norms.amax(dim=-1, keepdim=True)  # a zero gradient's norm lifted to the largest
        value = lifted.amin(dim=-1)
    elif length == "max":
        value = norms.amax(dim=-1)
    elif length == "arithmetic_mean":
        value = norms.sum(dim=-1) / count
    elif length == "harmonic_mean":
        value = count / inverse_norms.sum(dim=-1)
    else:
        value = ((norms + 1 - mask).log().sum(dim=-1) / count).exp()  # log 1 = 0 for a zero gradient
    return torch.where(count > zero, value, zero)


METHOD = Method(
    name="ConFIG",
    function="config",
    weights=config_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(Option("length", "projection", one_of("length", LENGTHS), "how the update's length is chosen"),),
)
