"""DualProj: the preference-weighted mean gradient projected onto the dual cone of the task gradients.

The projection of GEM (Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11-13), applied to the mean gradient as
the aggregator named DualProj by Quinton & Rey ("Jacobian Descent for Multi-Objective Optimization",
2024, and TorchJD's ``DualProj``)::

    d = π_K(Σ_t p_t g_t),        K = {d : g_tᵀd ≥ 0 ∀t}

with ``p`` the preference (uniform ``1/T`` by default). In Gram space ``π_K(Jᵀp) = Jᵀv*``,
``v* = argmin_{v ≥ p} vᵀGv`` (GEM's dual; the paper's Proposition 1), solved exactly by enumerating
the active sets up to 9 tasks, beyond by a fixed budget of
``max_iter`` interior-point iterations finished exactly on the face they point to. ``d`` conflicts with
no task, and gradients whose weighted mean conflicts with none (``Gp ≥ 0``) give ``w = T·p`` exactly.

The uniform preference makes the projected vector a mean, so the weights are put on the sum scale,
``w = T·v*`` (naive summation when nothing conflicts; ``reduction="mean"`` gives TorchJD's weights for
the same ``pref_vector``). Positively homogeneous: the weights are invariant to a positive rescaling
of ``G``.

Differences from TorchJD's ``DualProj``: the program is solved with quadprog on the host (a device
synchronisation and copy) on ``G`` divided by its trace plus ``reg_eps·I`` (``reg_eps = 1e-4``), and ``G``
is replaced by zero when its trace is below ``norm_eps = 1e-4`` (absolute): a regularised projection
(possibly in slight conflict, off by ~``reg_eps`` relative) that is skipped entirely for small gradients.
Here the unregularised problem is solved on ``G`` scaled to a unit diagonal, exactly scale-invariant.
GEM itself projects the current task's gradient against the memories' gradients only, a different
cone; this is the multi-task aggregator.
"""

from __future__ import annotations

import torch

from . import _cone
from ._common import check_gram, check_reduction, symmetric64, to_reduction
from .upgrad import Preference, check_max_iter, check_preference, preference, valid
from .spec import Method, Option, positive_int

BIBTEX = """@inproceedings{lopezpaz2017gradient,
  title     = {Gradient Episodic Memory for Continual Learning},
  author    = {Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {30},
  pages     = {6467--6476},
  year      = {2017}
}
@article{quinton2024jacobian,
  title   = {Jacobian Descent For Multi-Objective Optimization},
  author  = {Quinton, Pierre and Rey, Val{\\'e}rian},
  journal = {arXiv preprint arXiv:2406.16232},
  year    = {2024}
}"""


def check_dualproj_options(pref_vector: Preference = None, max_iter: int = _cone.DEFAULT_ITERATIONS) -> None:
    check_preference(pref_vector)
    check_max_iter(max_iter)


def dualproj_weights(
    G: torch.Tensor,
    *,
    pref_vector: Preference = None,
    reduction: str = "sum",
    max_iter: int = _cone.DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the DualProj update, on the sum scale.

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)`` of independent problems, solved together (``w`` is
    ``(..., T)``; each entry as the unbatched call gives it). ``pref_vector``: the preference ``p``
    (``None``: ``1/T`` each), a ``(T,)`` tensor on G's device or a sequence, the same for every entry of
    a batch; ``max_iter``: the interior point's iterations beyond 9 tasks.
    """
    check_gram(G)
    check_reduction(reduction)
    check_max_iter(max_iter)
    batch, T = G.shape[:-2], G.shape[-1]
    p = preference(pref_vector, G)
    # One batch dimension (1 for a single problem): an entry of a batch then runs the same kernels as
    # the unbatched call, which keeps the two bit-identical.
    G = symmetric64(G.reshape(-1, T, T))  # the solver scales G itself (to a unit diagonal)
    if T == 2:
        w = T * _cone.project_two(G, p)
    else:
        w = T * _cone.project(G, p[None], max_iter=max_iter)[:, 0]
    w = w if pref_vector is None else valid(w, p)
    return to_reduction(w, reduction).reshape(*batch, T)


METHOD = Method(
    name="DualProj",
    function="dualproj",
    weights=dualproj_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option(
            "pref_vector",
            None,
            check_preference,
            "the preference that weights the mean (None: uniform)",
            annotation="torch.Tensor | Sequence[float] | None",
        ),
        Option("max_iter", _cone.DEFAULT_ITERATIONS, positive_int("max_iter"), "iterations of the projection solve beyond 9 tasks"),
    ),
)
