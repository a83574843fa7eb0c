"""GradVac: gradient vaccine (Wang et al., ICLR 2021, Algorithm 1, whole-model granularity).

A generalisation of PCGrad that aims every pair of tasks at an adaptive cosine similarity instead of 0.
For each task ``i``, start from ``g_i' = g_i`` and visit the other tasks ``j ≠ i`` in a fresh uniformly
random order; with ``φ_ij = cos(g_i', g_j)`` (the *current* vector against the *original* ``g_j``) and
the target ``φ̂_ij``: if ``φ_ij < φ̂_ij``, add ``a_ij·g_j`` with ::

    a_ij = ‖g_i'‖ (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (‖g_j‖ √(1 − φ̂_ij²))

which turns the angle to ``g_j`` into exactly ``arccos φ̂_ij`` (``a_ij > 0``: the vector is rotated
towards ``g_j`` in their common plane); then, on every visit, update the target by the exponential
moving average ``φ̂_ij ← (1 − β)·φ̂_ij + β·φ_ij`` with the ``φ_ij`` measured before the correction. The
update is the sum of the ``T`` modified vectors: its scale is intrinsic (it is the sum of the tasks'
gradients when no pair falls below its target), ``reduction="mean"`` divides the weights by ``T``.
With every target at 0 — the start — one step is exactly PCGrad with the same orders.

In Gram space, as for PCGrad: ``g_i' = c_iᵀJ``, ``‖g_i'‖² = c_iᵀGc_i``, ``g_i'·g_j = (Gc_i)_j``, and the
correction is ``c_i[j] += a_ij``; the ``T`` chains advance together, ``T − 1`` rounds of ``O(T³)`` float64
tensor work on the normalised ``G`` (the weights and targets are invariant to a positive rescaling of
``G``). The orders are ``pcgrad.random_orders`` (the same draws as PCGrad for the same generator;
``T ≤ 2`` has a single order and draws nothing).

**State.** ``targets`` is the ``(T, T)`` float64 matrix ``φ̂`` (row ``i``, column ``j``; the diagonal
is never read or changed). ``None`` starts at zeros, the paper's initial value; the function returns
``(w, new_targets)`` and leaves its input untouched, so the caller keeps the state (and checkpoints
it). Default ``beta = 1e-2``: the EMA rate the paper uses (Eq. 3), also TorchJD's first GradVac's; LibMTL
and the current TorchJD default to ``0.5``, which makes the target follow the last few steps instead of
a long-run average (pass ``beta=0.5`` to compare with them).

**Batches.** ``G`` may carry leading batch dimensions, ``(..., T, T)``: the weights are ``(..., T)``,
``targets`` (given or returned) ``(..., T, T)``, one independent problem per entry, solved in the same
tensor operations (no loop over the batch), each entry bit-identical to the unbatched call with the
same orders and targets. The orders are drawn as for PCGrad: one call for the whole batch, which on the
CPU draws what one unbatched call per entry, in the batch's row-major order, would draw (on CUDA: the
same generator state gives the same weights).

**Guards.** A zero ``g_j``, or a ``g_i'`` that is zero or has cancelled to rounding noise
(``‖g_i'‖² ≤ 64·T·ε·(Σ_k |c_ik|·‖g_k‖)²`` with ``ε`` of ``G``'s dtype, fp32's for narrower ones: e.g. an
antiparallel pair corrected to ``φ̂ = 0`` cancels exactly) has cosine ``φ = 0`` (LibMTL's and TorchJD's
epsilons give the same) and gets no correction; a target with ``|φ̂| = 1``, where ``a`` is unbounded, gets no correction either.
``φ`` is clamped to ``[−1, 1]``. A non-finite ``G`` gives NaN weights and returns the targets unchanged.

Differences from other implementations (the official code was not released):

- LibMTL (``GradVac``, ``beta = 0.5``) updates the EMA only on a visit that corrects
  (``φ < φ̂``), so from 0 a target can only decrease: ``target_update="on_correction"`` reproduces
  that; the default ``"always"`` is the paper's update on every visit. LibMTL adds ``1e-8`` to the
  denominators and draws the orders with Python's ``random``; its per-layer and per-matrix groups
  (``GradVac_group_type`` 1 and 2, the paper's finer granularities) are not offered here: one target
  per pair for the whole shared parameter vector.
- TorchJD's ``GradVac`` (``beta = 0.5``, ``eps = 1e-8``) is the algorithm above in Gram space (the same
  per-visit update), run on the CPU with a host round-trip per visit and orders from the global RNG.
"""

from __future__ import annotations

import torch

from ._common import broadcasts_to, check_gram, check_reduction, normalized, to_reduction
from .pcgrad import random_orders
from .spec import Method, Option, State, finite_number, one_of

TARGET_UPDATES = ("always", "on_correction")

BIBTEX = """@inproceedings{wang2021gradient,
  title     = {Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual Models},
  author    = {Wang, Zirui and Tsvetkov, Yulia and Firat, Orhan and Cao, Yuan},
  booktitle = {International Conference on Learning Representations},
  year      = {2021},
  url       = {https://openreview.net/forum?id=F1vEjWK-lH_}
}"""


def check_gradvac_options(beta: float, target_update: str = "always") -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if target_update not in TARGET_UPDATES:
        raise ValueError(f"target_update must be one of {TARGET_UPDATES}, got {target_update!r}")


def check_gradvac_targets(targets: torch.Tensor | None, T: int, batch: tuple[int, ...] = ()) -> None:
    """Shape and dtype of the EMA state against ``T`` tasks and the batch (its values are not read: no
    host sync). Targets of a shape that broadcasts to ``(*batch, T, T)`` are accepted (``(T, T)``: the
    same start for every entry)."""
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a (T, T) tensor or None, got {type(targets).__name__}")
    shape = (*batch, T, T)
    if not (targets.shape[-2:] == (T, T) and broadcasts_to(targets.shape, shape)):
        if not batch:
            raise ValueError(f"targets must have shape ({T}, {T}) for T={T} tasks, got {tuple(targets.shape)}")
        raise ValueError(
            f"targets must have shape {shape} (or broadcast to it) for G of batch {batch}, got {tuple(targets.shape)}"
        )
    if not targets.is_floating_point():
        raise ValueError(f"targets must be floating point, got dtype {targets.dtype}")


def gradvac_orders(
    T: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """``(*batch, T, T − 1)`` visiting orders: ``random_orders`` for ``T ≥ 3``; the single order for ``T ≤ 2``."""
    if T >= 3:
        return random_orders(T, generator=generator, device=device, batch=batch)
    return (T - 1 - torch.arange(T, device=device)).reshape(T, 1)[:, : T - 1].expand(*batch, T, T - 1)


def gradvac_coefficients(
    G: torch.Tensor,
    orders: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    beta: float = 1e-2,
    target_update: str = "always",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, new_targets)``: row ``i`` of ``C`` is ``c_i`` (``g_i' = c_iᵀJ``) for the given orders.

    ``G`` is ``(..., T, T)``; ``orders`` ``(..., T, T − 1)`` or ``(T, T − 1)`` (the same in every entry);
    ``targets`` broadcasts to ``G``'s shape; ``C`` and the new targets have ``G``'s shape.
    """
    Gn = normalized(G)
    T = Gn.shape[-1]
    device = Gn.device
    phi_hat = (
        torch.zeros(Gn.shape, dtype=torch.float64, device=device)
        if targets is None
        else targets.detach().to(device=device, dtype=torch.float64).expand(Gn.shape).clone()
    )
    orders = orders.to(device).expand(*Gn.shape[:-2], T, T - 1)
    coefficients = torch.eye(T, dtype=torch.float64, device=device).expand_as(Gn).clone()
    projections = Gn.clone()  # row i: G c_i, so (G c_i)_j = g_i'·g_j
    norms = Gn.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    magnitude = norms.clone()  # Σ_k |c_ik|·‖g_k‖ ≥ ‖g_i'‖
    # A squared norm this far below its terms' magnitude is rounding noise (fp32's ε for narrower G).
    noise = 64 * T * torch.finfo(torch.float64 if G.dtype == torch.float64 else torch.float32).eps
    zero = torch.zeros(Gn.shape[:-1], dtype=torch.float64, device=device)
    one = torch.ones_like(zero)
    for visit in orders.unbind(dim=-1):
        column = visit[..., None]
        inner = projections.gather(-1, column).squeeze(-1)
        norm_sq = (projections * coefficients).sum(dim=-1)  # ‖g_i'‖²
        norm_i = norm_sq.clamp_min(0).sqrt()
        norm_j = norms.gather(-1, visit)
        live = (norm_sq > noise * magnitude.square()) & (norm_j > 0)
        phi = torch.where(live, inner / torch.where(live, norm_i * norm_j, one), zero).clamp(-1.0, 1.0)
        target = phi_hat.gather(-1, column).squeeze(-1)
        room = (1 - target.square()).clamp_min(0).sqrt()  # √(1 − φ̂²)
        below = phi < target
        correct = live & below & (room > 0)
        step = norm_i * (target * (1 - phi.square()).clamp_min(0).sqrt() - phi * room)
        a = torch.where(correct, step / torch.where(correct, norm_j * room, one), zero)
        coefficients.scatter_(-1, column, coefficients.gather(-1, column) + a[..., None])
        projections += a[..., None] * Gn.gather(-2, column.expand_as(Gn))
        magnitude += a.abs() * norm_j
        moved = (1 - beta) * target + beta * phi
        phi_hat.scatter_(-1, column, (moved if target_update == "always" else torch.where(below, moved, target))[..., None])
    return coefficients, phi_hat


def gradvac_weights(
    G: torch.Tensor,
    *,
    beta: float = 1e-2,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    target_update: str = "always",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, new_targets)``: weights ``w = Σ_i c_i`` (float64, on G's device; ``d = wᵀJ``) and the
    updated ``(T, T)`` float64 EMA targets; for a batch ``G`` of shape ``(..., T, T)``, ``w`` is
    ``(..., T)`` and the targets (given: any shape that broadcasts) ``(..., T, T)``.

    ``targets=None`` starts from zeros. Pass a generator on G's device (the orders are drawn there).
    No host sync.
    """
    check_gram(G)
    check_gradvac_options(beta, target_update)
    check_reduction(reduction)
    T = G.shape[-1]
    batch = tuple(G.shape[:-2])
    check_gradvac_targets(targets, T, batch)
    orders = gradvac_orders(T, generator=generator, device=G.device, batch=batch)
    coefficients, new_targets = gradvac_coefficients(G, orders, targets, beta=beta, target_update=target_update)
    # NaN or Inf anywhere in an entry's G: NaN weights for the caller's check, and its state does not move.
    finite = torch.isfinite(G).flatten(-2).all(dim=-1)[..., None]
    w = coefficients.sum(dim=-2)
    w = torch.where(finite, w, torch.full_like(w, torch.nan))
    old = torch.zeros_like(new_targets) if targets is None else targets.detach().to(G.device, torch.float64)
    return to_reduction(w, reduction), torch.where(finite[..., None], new_targets, old)


def _weights_with_state(
    G: torch.Tensor,
    *,
    beta: float,
    target_update: str,
    reduction: str = "sum",
    generator: torch.Generator | None = None,
    state: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    w, targets = gradvac_weights(
        G, beta=beta, targets=state["targets"], generator=generator, reduction=reduction, target_update=target_update
    )
    return w, {"targets": targets}


METHOD = Method(
    name="GradVac",
    function="gradvac",
    weights=_weights_with_state,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("beta", 1e-2, finite_number("beta", low=0.0, high=1.0), "EMA rate of the cosine targets (the paper's 1e-2; LibMTL and TorchJD use 0.5)"),
        Option("target_update", "always", one_of("target_update", TARGET_UPDATES), '"on_correction": LibMTL\'s update of a target only when it corrects'),
    ),
    random=True,
    state=State(
        init=lambda T, device: {"targets": torch.zeros(T, T, dtype=torch.float64, device=device)},
        doc="targets: (T, T) float64 EMA of the pairwise cosines, zeros at the start",
    ),
)
