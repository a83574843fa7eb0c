"""IMTLL: the loss-balancing part of IMTL, IMTL-L (Liu et al., ICLR 2021).

Each task gets a learnable log-scale ``s_t`` and the objective, backpropagated once, is ::

    Σ_t  exp(s_t)·L_t − s_t

The model receives ``Σ_t exp(s_t)·∇L_t``; each ``s_t`` moves until ``exp(s_t)·L_t = 1``, so the scaled
losses are balanced at 1 (the ``−s_t`` term keeps ``s_t`` from going to ``−∞``). ``s`` starts at 0, so
the first step is naive summation (weights 1: the sum scale). The log-scales are parameters of the
wrapper (``opt.learned["log_scale"]``), added to the inner optimizer as their own parameter group (no
weight decay) and saved with it, as TorchJD's ``IMTLL`` asks its users to do.

This is LibMTL's loss transform (``self.loss_scale.exp()*losses - self.loss_scale``) and TorchJD's
``IMTLL`` scalarizer, term for term. LibMTL's ``IMTL`` then combines the gradients of these scaled losses
with IMTL-G's closed form; here the two parts are separate methods (IMTL-G is ``gs.IMTLG``).

IMTL-L is :class:`UW` with the sign of the parameter flipped (``s = −log σ²``): ``Σ exp(s)·L − s`` is
UW's objective at ``−s``. Under SGD or Adam, which treat a sign flip of the gradient symmetrically, the
two give the same model updates from the same start. No option.
"""

from __future__ import annotations

import torch

from .imtl_g import BIBTEX
from .spec import Method, Objective


def imtl_l_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t exp(s_t)·L_t − s_t`` for the ``(T,)`` losses and the log-scales ``s``."""
    s = params["log_scale"]
    return (torch.exp(s) * losses.to(s.dtype) - s).sum(), state


METHOD = Method(
    name="IMTLL",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    loss=Objective(
        objective=imtl_l_objective,
        learnable=lambda T, device: {"log_scale": torch.zeros(T, device=device)},
    ),
)
