"""UW: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task gets a learnable log-variance ``s_t = log σ_t²`` and the objective is ::

    Σ_t  exp(−s_t)·L_t + s_t

backpropagated once: the model's parameters receive ``Σ_t exp(−s_t)·∇L_t`` and each ``s_t`` moves
towards ``log L_t``, so a task with a large loss (high homoscedastic uncertainty) is down-weighted.
``s`` starts at 0, so the first step is naive summation (weights 1: the sum scale).

The paper writes the regression case as ``L_t/(2σ_t²) + log σ_t`` (``½·exp(−s_t)·L_t + ½·s_t``) and
the classification case without the ½ on the loss; LibMTL uses the regression form for every task.
Both have the same minimiser in ``s``; the form here is the paper's objective times 2 (on the sum
scale), which is what ``sum(losses).backward()`` is at the start. The log-variances are parameters of
the wrapper (``opt.learned["log_variance"]``), added to the inner optimizer as their own parameter
group (no weight decay) and saved with it.
"""

from __future__ import annotations

import torch

from .spec import Method, Objective

BIBTEX = """@inproceedings{kendall2018multi,
  title     = {Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics},
  author    = {Kendall, Alex and Gal, Yarin and Cipolla, Roberto},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition},
  pages     = {7482--7491},
  year      = {2018}
}"""


def uw_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t exp(−s_t)·L_t + s_t`` for the ``(T,)`` losses and the log-variances ``s``."""
    s = params["log_variance"]
    return (torch.exp(-s) * losses.to(s.dtype) + s).sum(), state


METHOD = Method(
    name="UW",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    loss=Objective(
        objective=uw_objective,
        learnable=lambda T, device: {"log_variance": torch.zeros(T, device=device)},
    ),
)
