"""MGDA: the min-norm point of the convex hull of the task gradients.

Sener & Koltun (NeurIPS 2018), after Désidéri (2012)::

    α* = argmin_{α ∈ Δ} ‖Σ_t α_t ĝ_t‖² = argmin_{α ∈ Δ} αᵀ Ĝ α,    Ĝ_ij = G_ij / (n_i n_j)

where ``ĝ_t = g_t / n_t`` and the normaliser ``n_t`` is ``1`` (``"none"``), ``‖g_t‖`` (``"l2"``), the loss
``L_t`` (``"loss"``) or ``L_t·‖g_t‖`` (``"loss+"``); a zero normaliser is replaced by 1 (its gradient is
zero, so it cannot change the result). As in the official code, the normalised gradients only choose
``α``: the update combines the unnormalised gradients, ``d = Σ_t α*_t g_t``, returned on the sum scale
(``w = T·α*``; ``reduction="mean"`` gives ``α*``, the official code's scale). The official code applies
``α`` as loss weights, so it also scales each task head's gradient by ``α_t``; the wrappers give heads
their plain gradient.

``T = 2`` uses the closed form ``α_1 = (Ĝ_22 − Ĝ_12) / (Ĝ_11 + Ĝ_22 − 2Ĝ_12)`` clipped to ``[0, 1]``
(½ when both gradients coincide); the official code returns the same closed form inside ``(0, 1)`` but
0.999 or 0.001 in place of a vertex solution (and for equal or zero gradients). The official iterative
solver for ``T > 2`` has no iteration bound (its ``MAX_ITER`` counter is never incremented) and stops
when ``α`` moves less than 1e-5, which can be short of the minimum. Up to 10 tasks the min-norm point is found exactly, from the optimality systems of
all faces of the simplex at once (KKT residual at rounding level). Larger ``T`` runs a fixed-budget
interior-point solver for ``max_iter = 48`` iterations, then solves exactly on the faces its weights
point to and keeps the better point. The KKT residual
``αᵀ∇ − min_i ∇_i`` (the Frank–Wolfe gap), relative to ``max_t ‖ĝ_t‖²``, is then at rounding level
(≤ 5e-13 measured up to T = 64) whenever the gradients on the support are affinely independent. When
they are not (rank-deficient gradients), the interior point's own answer stands: ~1e-12 for
well-separated gradients, up to 1.2e-8 for nearly parallel ones at T = 19 and 2.3e-7 where the barrier
path lags (agreeing gradients, T = 64).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._common import as_losses, check_gram, check_reduction, normalized, symmetric64, to_reduction
from . import _supports
from ._cone import dot, matvec, pad_square
from ._simplex import DEFAULT_ITERATIONS, LocalModel, minimize_on_simplex
from .spec import Method, Option, one_of, positive_int

NORMALIZATIONS = ("none", "l2", "loss", "loss+")

BIBTEX = """@inproceedings{sener2018multi,
  title     = {Multi-Task Learning as Multi-Objective Optimization},
  author    = {Sener, Ozan and Koltun, Vladlen},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {31},
  year      = {2018}
}

@article{desideri2012multiple,
  title   = {Multiple-gradient descent algorithm ({MGDA}) for multiobjective optimization},
  author  = {D{\\'e}sid{\\'e}ri, Jean-Antoine},
  journal = {Comptes Rendus Mathematique},
  volume  = {350},
  number  = {5-6},
  pages   = {313--318},
  year    = {2012}
}"""


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def mgda_weights(
    G: torch.Tensor,
    *,
    normalization: str = "none",
    losses: torch.Tensor | Sequence[float] | None = None,
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    solve: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the MGDA update.

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)`` of independent problems, solved together (``w`` is
    ``(..., T)``; each entry as the unbatched call gives it). ``losses`` (for the ``"loss"``
    normalisations): ``(T,)``, or for a batch ``(..., T)`` (anything that broadcasts to ``G.shape[:-1]``:
    a ``(T,)`` vector is shared). ``solve(G_hat, max_iter)`` finds the min-norm weights of one ``(T, T)``
    problem for ``T ≥ 3`` (default: exact up to ``_supports.MAX_TASKS`` tasks, the interior-point solver
    here beyond); the backend passes the fused kernel, which takes one problem: for a batch it is
    ignored and the torch solvers run. Either interior point is then finished exactly on its support.
    """
    check_gram(G)
    check_normalization(normalization)
    check_reduction(reduction)
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    batch, T = G.shape[:-2], G.shape[-1]
    if G.dim() > 2:
        solve = None
    if normalization == "none":
        # T = 2 has a closed form invariant to G's scale: no normalising (each op is µs on small problems).
        G_hat = G.detach().to(torch.float64) if T == 2 else normalized(G)
    else:
        G64 = symmetric64(G)
        norms = _normalizers(G64, normalization, losses)
        G_hat = normalized(G64 / (norms[..., :, None] * norms[..., None, :]))
    # One batch dimension (1 for a single problem): an entry of a batch then runs the same kernels as
    # the unbatched call, which keeps the two bit-identical.
    G_hat = G_hat.reshape(-1, T, T)
    if T == 2:
        alpha = _min_norm_two(G_hat)
    elif solve is None and T <= _supports.MAX_TASKS:
        alpha = _supports.min_norm(G_hat)
    elif solve is None:
        alpha = _supports.polish_min_norm(G_hat, _min_norm(G_hat, max_iter))
    else:
        # The fused kernel's interior point (one problem), finished exactly on its support.
        alpha = _supports.polish_min_norm(G_hat, solve(G_hat[0], max_iter)[None])
    return to_reduction(alpha * T, reduction).reshape(*batch, T)


def _normalizers(G: torch.Tensor, normalization: str, losses: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
    """Each task's normaliser ``(..., T)`` for ``G`` ``(..., T, T)`` (1 where it is 0)."""
    grad_norms = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    if normalization == "l2":
        norms = grad_norms
    else:
        loss_values = as_losses(losses, G, needed_by=f'normalization="{normalization}"')
        norms = loss_values if normalization == "loss" else loss_values * grad_norms
    return torch.where(norms == 0, 1.0, norms)


def _min_norm_two(G: torch.Tensor) -> torch.Tensor:
    # α₁ = (G₂₂ − G₁₂) / (G₁₁ + G₂₂ − 2G₁₂) clipped to [0, 1], ½ when the denominator is not positive.
    # With u = G(e₁ − e₂) = (G₁₁ − G₁₂, G₂₁ − G₂₂): α₁ = u₂ / (u₂ − u₁), whose denominator reads G₁₂
    # and G₂₁ alike (a BLAS Gram can be asymmetric by ulps). G (..., 2, 2) → (..., 2).
    u = G[..., :, 0] - G[..., :, 1]
    rise = torch.diff(u, dim=-1)  # u₂ − u₁, the denominator's negative
    alpha = torch.where(rise < 0, (u[..., 1:] / rise).clamp(0.0, 1.0), 0.5)
    return torch.cat((alpha, 1 - alpha), dim=-1)


def _min_norm(G: torch.Tensor, max_iter: int) -> torch.Tensor:
    """The interior point for ``G`` ``(..., T, T)``: ``(..., T)``."""
    G2 = 2 * pad_square(G)  # f = wᵀGw: ∇f = 2Gw, ∇²f = 2G (padded: see minimize_on_simplex)

    def objective(w: torch.Tensor, t: float) -> LocalModel:
        grad = matvec(G2, w)

        def slope(d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            # ∇f(w + s·d)·d = ∇f(w)·d + s·dᵀ(2G)d
            return torch.addcmul(dot(grad, d).unsqueeze(-1), steps, dot(d, matvec(G2, d)).unsqueeze(-1))

        return LocalModel(grad, G2, slope)

    return minimize_on_simplex(objective, G.shape[-1], like=G2, iterations=max_iter)


METHOD = Method(
    name="MGDA",
    function="mgda",
    weights=mgda_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("normalization", "none", one_of("normalization", NORMALIZATIONS), "what divides each gradient before α is chosen"),
        Option("max_iter", DEFAULT_ITERATIONS, positive_int("max_iter"), "iterations of the interior-point solve (T > 10, and the Triton solve)"),
    ),
    reads_losses=lambda options: options["normalization"] in ("loss", "loss+"),
    solve="mgda",
)
