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

    ``solve(G_hat, max_iter)`` finds the min-norm weights for ``T ≥ 3`` (default: exact up to
    ``_supports.MAX_TASKS`` tasks, the interior-point solver here beyond); the backend passes the
    fused kernel. Either interior point is then finished exactly on its support.
    """
    check_gram(G)
    check_normalization(normalization)
    check_reduction(reduction)
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    T = G.shape[0]
    if normalization == "none":
        # T = 2 has a closed form invariant to G's scale: no normalising (each op is µs on small problems).
        G_hat = G.detach().to(torch.float64) if T == 2 else normalized(G)
    else:
        G64 = symmetric64(G)
        norms = _normalizers(G64, normalization, losses)
        G_hat = normalized(G64 / (norms[:, None] * norms[None, :]))
    if T == 2:
        alpha = _min_norm_two(G_hat)
    elif solve is None and T <= _supports.MAX_TASKS:
        alpha = _supports.min_norm(G_hat)
    else:
        # The interior point (the fused kernel's or the one here), finished exactly on its support.
        alpha = _supports.polish_min_norm(G_hat, (solve or _min_norm)(G_hat, max_iter))
    return to_reduction(alpha * T, reduction)


def _normalizers(G: torch.Tensor, normalization: str, losses: torch.Tensor | Sequence[float] | None) -> torch.Tensor:
    ones = torch.ones(G.shape[0], dtype=torch.float64, device=G.device)
    grad_norms = G.diagonal().clamp_min(0).sqrt()
    if normalization == "l2":
        norms = grad_norms
    else:
        loss_values = as_losses(losses, G, needed_by=f'normalization="{normalization}"')
        norms = loss_values if normalization == "loss" else loss_values * grad_norms
    return torch.where(norms == 0, ones, norms)


def _min_norm_two(G: torch.Tensor) -> torch.Tensor:
    # α₁ = (G₂₂ − G₁₂) / (G₁₁ + G₂₂ − 2G₁₂) clipped to [0, 1], ½ when the denominator is not positive.
    # With u = G(e₁ − e₂) = (G₁₁ − G₁₂, G₂₁ − G₂₂): α₁ = u₂ / (u₂ − u₁), whose denominator reads G₁₂
    # and G₂₁ alike (a BLAS Gram can be asymmetric by ulps).
    u = G[:, 0] - G[:, 1]
    rise = torch.diff(u)  # u₂ − u₁, the denominator's negative
    alpha = torch.where(rise < 0, (u[1:] / rise).clamp(0.0, 1.0), 0.5)
    return torch.cat((alpha, 1 - alpha))


def _min_norm(G: torch.Tensor, max_iter: int) -> torch.Tensor:
    G2 = 2 * G  # f = wᵀGw: ∇f = 2Gw, ∇²f = 2G

    def objective(w: torch.Tensor, t: float) -> LocalModel:
        grad = G2 @ w

        def slope(d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            # ∇f(w + s·d)·d = ∇f(w)·d + s·dᵀ(2G)d
            return torch.addcmul(grad @ d, steps, d @ (G2 @ d))

        return LocalModel(grad, G2, slope)

    return minimize_on_simplex(objective, G.shape[0], like=G, iterations=max_iter)


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
