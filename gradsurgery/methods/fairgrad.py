"""FairGrad: α-fair resource allocation between tasks (Ban & Ji, ICML 2024).

Each task's utility for an update ``d`` is its first-order loss decrease ``g_iᵀd``, and FairGrad
maximises the α-fair total ``Σ_i (g_iᵀd)^(1−α) / (1−α)`` (``Σ_i log g_iᵀd`` for ``α = 1``) over a ball
``‖d‖ ≤ ε``. Its stationarity condition makes ``d = Σ_i w_i g_i`` with (Eq. 4 of the arXiv version, as
TorchJD cites it; the equation the official code solves) ::

    G w = w^(−1/α)   elementwise,   w > 0          (g_iᵀd = w_i^(−1/α))

``α`` trades total decrease for fairness: ``α → 0`` tends to the utilitarian sum (``w → 1``, naive
summation, where that improves every task), ``α = 1`` is proportional fairness, exactly Nash-MTL's
condition ``w_i (Gw)_i = 1`` (``nash_mtl``), and ``α → ∞`` max-min fairness. ``w`` minimises the strictly
convex ``½wᵀGw − Σ_i h(w_i)`` with ``h'(w) = w^(−1/α)`` and exists exactly when some ``d`` has ``g_iᵀd > 0``
for every task. It is solved by Newton's method on the device in ``max_iter``
iterations (default 20): the systems of the tests (``T ≤ 64``) reach rounding level within ~8, and
random ones within 16 at ``α = 2`` when the gradients' norms are within about a factor 10 of each
other; norms spread over eight decades (up to 24 iterations) and large ``α`` (``α = 10``: up to ~20,
and ~100 over eight decades) need more, and a solve not accepted within the budget gives zero
weights. ``T = 1`` is ``w = ‖g‖^(−2α/(1+α))``. A solve is accepted when
its backward error is at most 1e-8 (the residual of the equation, ``max_i |w_i^(1/α) (Gw)_i − 1|``, is
then at rounding level relative to the cancellation in ``(Gw)_i``).

``alpha = 2.0``: the value every run script of the official repository uses (CelebA, QM9, Meta-World
MT10 and MT50); the paper tunes α per benchmark, and the code's own argument default, 1.0, would
make FairGrad Nash-MTL (see ``nash_mtl``).

**Scale.** The weights' scale is intrinsic (the equation fixes it) and is kept: it is the sum scale
here, as the ``α → 0`` limit (``w → 1``) shows; ``reduction="mean"`` divides by ``T``. With
``w(sG) = s^(−α/(1+α))·w(G)``, the update transforms as ``d(kJ) = k^((1−α)/(1+α))·d(J)`` for ``k > 0``:
positively homogeneous of degree ``(1−α)/(1+α)`` (1 at ``α → 0``, scale-invariant at ``α = 1``, degree
−1/3 at the default ``α = 2``).

**No solution.** As for Nash-MTL: a task whose gradient is zero takes no part (weight 0); when ``0`` is
in the convex hull of the other gradients (antiparallel gradients, more tasks than directions), or
within about 1e-4 (in angle) of it, where ``Σ_i w_i‖g_i‖ > 1e4·‖d‖``, the weights are 0 (``d = 0``, also
MGDA's update there).

Options: ``scale="official"`` multiplies the weights by ``T``, as the official code does ("to match the
sum loss"), reading the paper's ``w`` as mean-scale weights; ``max_norm`` rescales the update to at most
that length, ``w ← w·min(1, max_norm/‖d‖)`` with ``‖d‖² = wᵀGw``, after that multiplication. The
official update is ``scale="official", max_norm=1.0`` (its experiments' default ``--max_norm``).

Differences from other implementations:

- Official code: ``scipy.optimize.least_squares`` on ``Gw − w^(−1/α)`` from ``w = 1/T`` with bounds
  ``w ≥ 0`` at SciPy's default tolerances, on the host; the update ``T·Σ_i w_i g_i`` is then clipped to
  norm ``max_norm = 1.0``. Task heads get their plain gradients (as here). Its Meta-World variant
  replaces the solve with 20 SGD steps on ``‖Gw − w^(−1/α)‖²``.
- LibMTL's ``FairGrad``: the same least-squares solve, no ``×T`` and no clipping; it backpropagates
  ``Σ_i w_i L_i``, so task heads get ``w_i``-scaled gradients.
- TorchJD's ``FairGrad`` (no default α; ``α = 0`` gives the mean): the same least-squares solve from
  ``w = 1/T``, no ``×T`` and no clipping.
"""

from __future__ import annotations

import math

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._positive_system import (
    check_max_iter,
    check_max_norm,
    clip_to_norm,
    solve_power_system,
)
from .spec import Method, Option, finite_number, one_of, optional, positive_int

SCALES = ("paper", "official")

DEFAULT_ITERATIONS = 20

BIBTEX = """@inproceedings{ban2024fair,
  title     = {Fair Resource Allocation in Multi-Task Learning},
  author    = {Ban, Hao and Ji, Kaiyi},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {235},
  pages     = {2715--2731},
  publisher = {PMLR},
  year      = {2024}
}"""


def check_fairgrad_options(alpha: float, scale: str, max_norm: float | None, max_iter: int) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    check_max_norm(max_norm)
    check_max_iter(max_iter)


def fairgrad_weights(
    G: torch.Tensor,
    *,
    alpha: float = 2.0,
    scale: str = "paper",
    max_norm: float | None = None,
    max_iter: int = DEFAULT_ITERATIONS,
    reduction: str = "sum",
) -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the FairGrad update.

    ``G w = w^(−1/α)`` (intrinsic scale; ``×T`` with ``scale="official"``); zero gradients get 0, and all
    weights are 0 when no ``d`` improves every task. ``max_norm`` rescales ``d`` to at most that length.
    ``G`` is ``(T, T)`` or a batch ``(..., T, T)`` of independent problems, solved together (``w`` is
    ``(..., T)``; each entry as the unbatched call gives it).
    """
    check_gram(G)
    check_fairgrad_options(alpha, scale, max_norm, max_iter)
    check_reduction(reduction)
    batch, T = G.shape[:-2], G.shape[-1]
    G = G.reshape(-1, T, T)  # one batch dimension: an entry runs the kernels of the unbatched call
    w = solve_power_system(G, 1.0 / alpha, max_iter=max_iter).weights
    if scale == "official":
        w = w * T
    return to_reduction(clip_to_norm(w, G, max_norm), reduction).reshape(*batch, T)


METHOD = Method(
    name="FairGrad",
    function="fairgrad",
    weights=fairgrad_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("alpha", 2.0, finite_number("alpha", low=0.0, low_open=True), "the fairness exponent (α = 1: proportional fairness, Nash-MTL's condition)"),
        Option("scale", "paper", one_of("scale", SCALES), '"official": the official code\'s ×T'),
        Option("max_norm", None, optional(finite_number("max_norm", low=0.0, low_open=True)), "clip the update to this norm (the official code's 1.0); None: no clipping"),
        Option("max_iter", DEFAULT_ITERATIONS, positive_int("max_iter"), "Newton iterations of the fixed-point solve"),
    ),
)
