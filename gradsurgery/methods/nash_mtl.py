"""Nash-MTL: the update as the Nash bargaining solution between tasks (Navon et al., ICML 2022).

Each task's utility for an update ``d`` is its first-order loss decrease ``g_iᵀd``; the Nash bargaining
solution maximises ``Σ_i log(g_iᵀd)`` over a ball ``‖d‖ ≤ ε``. Its stationarity condition makes ``d`` a
combination ``d = Σ_i α_i g_i`` whose weights solve (the paper's characterisation) ::

    α_i (Gα)_i = 1  for every i,   α > 0          (Gα = 1/α elementwise)

i.e. ``α_i · g_iᵀd = 1``: every task's gain is the inverse of its weight. ``α`` is the minimiser of the
strictly convex ``½αᵀGα − Σ_i log α_i``; it exists exactly when some ``d`` has ``g_iᵀd > 0`` for every
task (``0`` outside the convex hull of the gradients), singular ``G`` included. It is solved by
Newton's method on the device in ``max_iter`` iterations (default 16; random systems up to
``T = 64`` reach rounding level within 12, typically 2 to 5, whatever the gradients' norms; a solve not
accepted within the budget gives zero weights), ``T = 1`` and ``T = 2`` in closed form:
``α = 1/‖g‖`` (``d`` is the unit gradient) and ``α_i = 1 / (‖g_i‖·sqrt(1 + cos θ))`` (``d`` is the bisector
``(ĝ_1 + ĝ_2)/sqrt(1 + cos θ)``). A solve is accepted when its backward error is at most 1e-8: the
certificate ``max_i |α_i (Gα)_i − 1|`` is then at rounding level relative to the cancellation in
``(Gα)_i``.

**Scale.** The weights' scale is intrinsic (``Σ_i α_i(Gα)_i = T`` fixes it), so it is kept: this is the
sum scale (``reduction="mean"`` divides by ``T``, as for every method). ``α(sG) = α(G)/√s``, so the update
is *invariant* to the gradients' scale, ``d(sJ) = d(J)`` for ``s > 0``, and even to each task's own
scale (``g_i → c_i g_i`` gives ``α_i → α_i/c_i``, the same ``d``): it always has length
``‖d‖ = sqrt(αᵀGα) = √T``. Nash-MTL is thus not positively homogeneous: the learning rate sets the
step length alone.

**No solution.** A task whose gradient is zero can gain nothing from any ``d``: it takes no part in
the bargaining (weight 0; the others are solved among themselves, ``‖d‖ = sqrt(T − #zero)``). When
``0`` is in the convex hull of the other gradients (antiparallel gradients, more tasks than
directions, a Pareto-stationary point), no ``d`` improves every task and no ``α`` exists: the weights
are 0, the bargaining's disagreement point ``d = 0`` (also MGDA's update there). So are systems within
about 1e-4 (in angle) of that boundary, whose weights would be ~1e4 times the others', with
``Σ_i α_i‖g_i‖ > 1e4·‖d‖``: ``d = αᵀJ`` would lose more than four digits to cancellation.

``max_norm`` (default ``None``): rescale the update to at most this length, ``w ← w·min(1,
max_norm/‖d‖)`` with ``‖d‖² = wᵀGw`` (computed on the device). The official code clips the shared
gradient to ``max_norm = 1.0``, which always fires for ``T ≥ 2`` (``‖d‖ = √T``): ``max_norm=1.0`` gives
that behaviour. Refreshing the weights only every ``k`` steps (the official ``update_weights_every``)
is the wrappers' ``every=`` option (future), not an option here.

Differences from other implementations:

- Official code (and LibMTL's ``Nash_MTL``, a copy): solves a sequence of convex problems with cvxpy
  and ECOS (the concave part linearised, at most ``optim_niter = 20`` of them, stopping when
  ``‖Gα − 1/α‖ < 1e-3`` on ``G`` divided by its Frobenius norm), warm-started from the previous step's
  weights (stateful; ``α = 1`` at the first step); a failed or infeasible solve keeps the previous
  weights (``α = 1``, naive summation, at the first step). It backpropagates ``Σ_i α_i L_i``, so task
  heads get ``α_i``-scaled gradients (here: their plain gradient), then clips the shared gradient to
  ``max_norm = 1.0``.
- TorchJD's ``NashMTL``: the official algorithm (stateful, cvxpy + ECOS), clipping ``αᵀJ`` to
  ``max_norm = 1.0``.
"""

from __future__ import annotations

import torch

from ._common import check_gram, check_reduction, to_reduction
from ._positive_system import (
    check_max_iter,
    check_max_norm,
    clip_to_norm,
    solve_power_system,
)
from .spec import Method, Option, finite_number, optional, positive_int

DEFAULT_ITERATIONS = 16

BIBTEX = """@inproceedings{navon2022multi,
  title     = {Multi-Task Learning as a Bargaining Game},
  author    = {Navon, Aviv and Shamsian, Aviv and Achituve, Idan and Maron, Haggai and Kawaguchi, Kenji and Chechik, Gal and Fetaya, Ethan},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {162},
  pages     = {16428--16446},
  publisher = {PMLR},
  year      = {2022}
}"""


def check_nash_mtl_options(max_norm: float | None, max_iter: int) -> None:
    check_max_norm(max_norm)
    check_max_iter(max_iter)


def nash_mtl_weights(
    G: torch.Tensor,
    *,
    max_norm: float | None = None,
    max_iter: int = DEFAULT_ITERATIONS,
    reduction: str = "sum",
) -> torch.Tensor:
    """Weights ``α`` (float64, on G's device) with ``d = αᵀJ`` the Nash-MTL update.

    ``α_i (Gα)_i = 1`` (intrinsic scale, ``‖d‖ = √T``); zero gradients get 0, and all weights are 0 when
    no ``d`` improves every task. ``max_norm`` rescales ``d`` to at most that length. ``G`` is ``(T, T)``
    or a batch ``(..., T, T)`` of independent problems, solved together (``α`` is ``(..., T)``; each entry
    as the unbatched call gives it).
    """
    check_gram(G)
    check_nash_mtl_options(max_norm, max_iter)
    check_reduction(reduction)
    batch, T = G.shape[:-2], G.shape[-1]
    G = G.reshape(-1, T, T)  # one batch dimension: an entry runs the kernels of the unbatched call
    w = solve_power_system(G, 1.0, max_iter=max_iter).weights
    return to_reduction(clip_to_norm(w, G, max_norm), reduction).reshape(*batch, T)


METHOD = Method(
    name="NashMTL",
    function="nash_mtl",
    weights=nash_mtl_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("max_norm", None, optional(finite_number("max_norm", low=0.0, low_open=True)), "clip the update to this norm (the official code's 1.0); None: the exact update"),
        Option("max_iter", DEFAULT_ITERATIONS, positive_int("max_iter"), "Newton iterations of the bargaining solve"),
    ),
)
