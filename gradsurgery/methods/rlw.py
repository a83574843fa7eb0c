"""RLW: random loss weighting (Lin et al., TMLR 2022).

At every step RLW draws ``z ~ N(0, I_T)`` and weights the tasks with ``λ = softmax(z)``, positive weights
summing to 1: the paper's default distribution and normalisation, and what LibMTL (the authors'
library) and TorchJD's ``Random`` do. The weights are put on the sum scale, ``w = T·softmax(z)``
(``E[w_t] = 1``, naive summation's weight, for every task; ``reduction="mean"`` gives ``λ``). They do not depend on the
gradients: ``G`` only supplies ``T`` and the device, and its values are never read (a NaN ``G`` still
gives finite weights, as for naive summation; ``d = wᵀJ`` carries the NaN). Weighting the losses by
``w`` and back-propagating once gives the shared parameters the same update: that is ``gs.RLWLoss``
(``methods/rlw_loss.py``), one backward instead of ``T``, the same draws for the same ``seed``; it also
scales each task-specific parameter's gradient by its task's ``w_t``, which RLW, like every gradient
method, leaves plain. Here RLW goes through the same Gram → weights → combine pipeline as the other
methods (its diagnostics of ``G``, representation mode, cheap modes, functional pair).

``z`` is drawn in float64 from ``generator`` (torch's default generator for the device when ``None``) on
the generator's device and moved to G's; a generator on G's device avoids a copy. The same generator
state gives the same weights.

**Batches.** ``G`` of shape ``(..., T, T)`` gives ``w`` of shape ``(..., T)``, one independent draw per entry,
all drawn in one call, ``torch.randn((..., T))`` (the unbatched call is the batch ``()``): the same generator
state gives the same weights, and the batch ``(1,)`` draws what the unbatched call draws. Entry ``b`` is
*not* in general what the ``b``-th of ``B`` consecutive unbatched calls would draw: torch's CPU normal
sampler fills a tensor of 16 values or more with a vectorised Box–Muller transform that pairs draws
differently (and CUDA's counter-based Philox offsets each call), so matching consecutive calls would need
one call per entry. Earlier versions of LibMTL also drew from uniform, Dirichlet and
Bernoulli distributions; they are not offered here.
"""

from __future__ import annotations

import torch

from ._common import check_gram, check_reduction
from .spec import Method

BIBTEX = """@article{lin2022reasonable,
  title   = {Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning},
  author  = {Lin, Baijiong and Ye, Feiyang and Zhang, Yu and Tsang, Ivor W.},
  journal = {Transactions on Machine Learning Research},
  year    = {2022},
  url     = {https://openreview.net/forum?id=jjtFD8A1Wx}
}"""


def rlw_weights(G: torch.Tensor, *, generator: torch.Generator | None = None, reduction: str = "sum") -> torch.Tensor:
    """Weights ``w = T·softmax(z)``, ``z ~ N(0, I)`` from ``generator`` (float64, on G's device); for a batch
    ``G`` of shape ``(..., T, T)``, ``w`` is ``(..., T)`` from one draw of ``z`` of that shape."""
    check_gram(G)
    check_reduction(reduction)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    T = G.shape[-1]
    source = generator.device if generator is not None else G.device
    z = torch.randn(*G.shape[:-2], T, generator=generator, dtype=torch.float64, device=source)
    if source != G.device:
        z = z.to(G.device)
    weights = torch.softmax(z, dim=-1)
    return weights.mul_(float(T)) if reduction == "sum" else weights


METHOD = Method(name="RLW", function="random", weights=rlw_weights, doc=__doc__ or "", bibtex=BIBTEX, random=True)
