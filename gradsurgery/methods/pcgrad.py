"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020, Algorithm 1).

For each task ``i``, start from ``g_i`` and visit the other tasks ``j ≠ i`` in a fresh uniformly random
order; when the current vector conflicts with the *original* ``g_j`` (negative inner product) and
``g_j ≠ 0``, remove its component along ``g_j``. The update is the sum of the ``T`` projected vectors.

Every projected vector stays in the span of the rows, so the algorithm runs on the Gram matrix: keep a
coefficient vector ``c_i`` (``c_i = e_i`` at the start); visiting ``j``, ``ip = (G c_i)_j`` and, if
``ip < 0``, ``c_i[j] −= ip / G_jj``. The weights are ``w = Σ_i c_i``. The ``T`` chains are independent, so
they advance together: ``T − 1`` rounds of ``O(T²)`` tensor work, in float64. ``T = 2`` has a single
order (nothing is drawn from the generator) and the closed form ``w_i = 1 − G_01/G_ii`` on conflict.

**Batches.** ``G`` may carry leading batch dimensions, ``(..., T, T)`` → ``w`` of shape ``(..., T)``: every
entry is an independent problem, solved in the same tensor operations (no loop over the batch), each
entry bit-identical to the unbatched call with the same orders. The orders of the whole batch are drawn
in one call, ``torch.rand((..., T, T))`` (the unbatched call is the batch ``()``), in row-major order of
the batch. On the CPU (mt19937, uniform draws taken one after the other in memory order) entry ``b`` of a
flattened batch of ``B`` draws exactly what the ``b``-th of ``B`` consecutive unbatched calls would, and
the generator ends in the same state: a batched call equals the loop of unbatched calls. On CUDA
(Philox, counter-based) one call of ``B·T²`` draws differs from ``B`` calls of ``T²``; there the rule is
only that the same generator state gives the same weights. ``T = 2`` draws nothing, batched or not.

Differences from the official TensorFlow code: it visits every task in the fixed order 0…T−1, the
task itself included (the result of its ``tf.random.shuffle`` is discarded), where the paper and this
implementation draw a random order of the others; it projects the whole gradient of its ``var_list``,
task heads included (here: only shared parameters are projected); and it divides by ``‖g_j‖²``
unconditionally, so one all-zero task gradient makes its update NaN.

Differences from the popular PyTorch port (``Pytorch-PCGrad`` and its copies): the port averages the
entries every task reaches and sums the rest (here: the sum, like ``sum(losses).backward()``, or
``reduction="mean"``), and its ``reduction="sum"`` still averages; it shuffles all tasks including
``i`` itself, so a vector can be projected against its own original gradient; it projects the whole
flattened vector, task heads included, so a task's head can receive a component of another task's head
gradient; and it divides by ``‖g_j‖²`` with no guard, so a conflicting ``g_j`` whose squared norm
underflows in fp32 gives NaN (an exactly zero one fails its conflict test and is skipped).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._common import check_gram, check_reduction, symmetric64, to_reduction
from .spec import Method

BIBTEX = """@inproceedings{yu2020gradient,
  title     = {Gradient Surgery for Multi-Task Learning},
  author    = {Yu, Tianhe and Kumar, Saurabh and Gupta, Abhishek and Levine, Sergey and Hausman, Karol and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  pages     = {5824--5836},
  year      = {2020}
}"""


def random_orders(
    T: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """``(*batch, T, T − 1)`` int64: row ``i`` is a uniformly random order of the tasks other than ``i``.

    Drawn from ``generator`` (torch's default generator when ``None``) on the generator's device and
    moved to ``device``, in one call for the whole batch: ``T²`` uniform keys per entry, in row-major
    order of the batch (on the CPU the same draws as one unbatched call per entry, in that order).
    """
    source = generator.device if generator is not None else device
    keys = torch.rand(*batch, T, T, generator=generator, device=source)
    keys.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # larger than any uniform draw: task i sorts last and is dropped
    return keys.argsort(dim=-1)[..., : T - 1].to(device)


def pcgrad_coefficients(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``(..., T, T)`` float64 matrix whose row ``i`` is ``c_i``: projected ``g_i = c_iᵀ J`` for the given orders.

    ``G`` is ``(..., T, T)``; ``orders`` ``(..., T, T − 1)``, or ``(T, T − 1)`` for the same orders in every
    entry of the batch.
    """
    G = symmetric64(G)
    T = G.shape[-1]
    orders = orders.to(G.device).expand(*G.shape[:-2], T, T - 1)
    coefficients = torch.eye(T, dtype=torch.float64, device=G.device).expand_as(G).clone()
    squared_norms = G.diagonal(dim1=-2, dim2=-1)
    for visit in orders.unbind(dim=-1):
        rows = visit[..., None]
        inner = (coefficients * G.gather(-2, rows.expand_as(G))).sum(dim=-1)
        norm_sq = squared_norms.gather(-1, visit)
        conflict = (inner < 0) & (norm_sq > 0)
        safe = torch.where(norm_sq > 0, norm_sq, torch.ones_like(norm_sq))
        removed = torch.where(conflict, inner / safe, torch.zeros_like(inner))
        coefficients.scatter_(-1, rows, coefficients.gather(-1, rows) - removed[..., None])
    return coefficients


def pcgrad_weights(
    G: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weights ``w = Σ_i c_i`` (float64, on G's device) with ``d = wᵀJ`` the PCGrad update.

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)``; ``w`` is ``(..., T)`` (see the module docstring for
    how a batch's orders are drawn). ``solve(G, orders)`` runs the chains and returns ``Σ_i c_i``
    (default: :func:`pcgrad_coefficients`, summed); the backend passes the fused kernel here. The fused
    kernel takes one ``(T, T)`` problem: for a batched ``G`` it is not used and the batch runs on the
    torch path. The generator should live on G's device: drawing on another device and copying over
    would synchronise.
    """
    check_gram(G)
    check_reduction(reduction)
    T = G.shape[-1]
    if T == 2:  # a single order: nothing to draw, and a closed form
        return to_reduction(_two_tasks(G), reduction)
    orders = random_orders(T, generator=generator, device=G.device, batch=tuple(G.shape[:-2]))
    if solve is None or G.dim() > 2:
        w = pcgrad_coefficients(G, orders).sum(dim=-2)
    else:
        w = solve(G, orders)
    return to_reduction(w, reduction)


def _two_tasks(G: torch.Tensor) -> torch.Tensor:
    # Each task is projected once, against the other: projecting g_j off g_i (G_01 < 0, G_ii > 0)
    # puts −G_01/G_ii on g_i, so w_i = 1 − G_01/G_ii.
    # (G_ii = 0 means g_i = 0, so G_01 = 0 too: the division's NaN there is never selected.)
    G = G.detach().to(torch.float64)
    squared_norms = G.diagonal(dim1=-2, dim2=-1)
    removed = (G[..., 0, 1] + G[..., 1, 0]).clamp(max=0)[..., None] / (2 * squared_norms)
    return 1.0 - torch.where(squared_norms > 0, removed, 0.0)


METHOD = Method(
    name="PCGrad",
    function="pcgrad",
    weights=pcgrad_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    random=True,
    solve="pcgrad",
    aliases={"pc_backward": "backward"},  # the name Pytorch-PCGrad's users type
)
