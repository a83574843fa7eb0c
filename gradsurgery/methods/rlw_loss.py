"""RLWLoss: random loss weighting, in loss form (Lin et al., TMLR 2022).

At every step RLW draws ``z ~ N(0, I_T)`` and backpropagates once ::

    Σ_t w_t L_t,      w = T · softmax(z)

positive weights summing to ``T`` (the sum scale; ``E[w_t] = 1``, naive summation's weight;
``reduction="mean"`` gives the paper's ``λ = softmax(z)``). This is the paper's loss weighting and what
LibMTL's ``RLW`` (the authors' library) and TorchJD's ``Random`` scalarizer do.

**RLWLoss and RLW.** ``gs.RLW`` is the same method in gradient space: it draws the same weights in the
same way (float64, from the wrapper's generator, on the generator's device) and applies them to the
per-task gradients of the shared parameters, ``d = wᵀJ``, at the cost of ``T`` backward passes. With
the same ``seed`` the two draw the same weights step after step and give the shared parameters the same
update, ``Σ_t w_t ∇L_t``. They differ on task-specific parameters (a head that one task alone reaches):
RLWLoss scales head ``t``'s gradient by ``w_t``, as LibMTL's ``RLW`` and TorchJD's ``Random`` do (one
backward of the weighted sum), while ``gs.RLW``, like every gradient method here, gives it its task's
plain gradient. RLWLoss costs one backward; RLW offers what only the gradient pipeline has (diagnostics
of ``G``, representation mode, ``every``/``tasks_per_step``, the functional pair
``gs.functional.random``). RLWLoss has no functional pair.

No option; random (``seed=``); no state beyond the wrapper's generator.
"""

from __future__ import annotations

import torch

from .rlw import BIBTEX
from .spec import Method, Objective


def rlw_loss_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], generator: torch.Generator | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t w_t L_t`` with ``w = T·softmax(z)``, ``z ~ N(0, I)`` drawn in float64 from ``generator``
    on its device, as :func:`~gradsurgery.methods.rlw.rlw_weights` draws it."""
    T = losses.shape[0]
    source = generator.device if generator is not None else losses.device
    z = torch.randn(T, generator=generator, dtype=torch.float64, device=source)
    if source != losses.device:
        z = z.to(losses.device)
    weights = torch.softmax(z, dim=0) * T
    return (weights * losses.to(torch.float64)).sum(), state


METHOD = Method(
    name="RLWLoss",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    random=True,
    loss=Objective(objective=rlw_loss_objective),
)
