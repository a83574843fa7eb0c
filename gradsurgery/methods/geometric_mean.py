"""GeometricMean: the geometric mean of the losses (GLS; Chennupati et al., CVPR Workshops 2019).

The objective, backpropagated once, is ``T`` times the geometric mean of the losses, ::

    T · (Π_t L_t)^(1/T) = T · exp(mean_t log L_t)

so the model receives ``Σ_t w_t ∇L_t`` with ``w_t = GM / L_t`` (``GM`` the geometric mean): a task is
weighted inversely to its loss, relative to the others'. When the losses are equal every weight is 1:
the sum scale, naive summation's update (``reduction="mean"`` gives the geometric mean itself).

MultiNet++ (the paper's "geometric loss strategy"), LibMTL's ``GLS`` (``losses.prod() ** (1/T)``) and
TorchJD's ``GeometricMean`` scalarizer (``exp(log(values).mean())``) all backpropagate the geometric
mean: their update is ours divided by ``T``. Computed through the mean of the logarithms here, as
TorchJD does, so that the product of many small or large losses does not under- or overflow.

Not to be confused with the scale-invariant loss ``Σ_t log L_t`` (Navon et al.'s "SI" baseline), whose
gradient ``Σ_t ∇L_t / L_t`` has the same direction as this one but a length that ignores the losses'
scale: ``∇ Σ_t log L_t = ∇(T·GM) / GM``.

The losses must be positive (the wrapper refuses a loss ≤ 0). No option, no state.
"""

from __future__ import annotations

import torch

from .spec import Method, Objective

BIBTEX = """@inproceedings{chennupati2019multinet,
  title     = {{MultiNet++}: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning},
  author    = {Chennupati, Sumanth and Sistu, Ganesh and Yogamani, Senthil and Rawashdeh, Samir A.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition Workshops},
  year      = {2019},
  doi       = {10.1109/CVPRW.2019.00159}
}"""


def geometric_mean_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``T · exp(mean_t log L_t)`` (float64)."""
    return torch.log(losses.to(torch.float64)).mean().exp() * losses.shape[0], state


METHOD = Method(
    name="GeometricMean",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    loss=Objective(objective=geometric_mean_objective, positive=True),
)
