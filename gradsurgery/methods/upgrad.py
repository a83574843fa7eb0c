"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024).

Each task gradient is projected onto the dual cone of all of them, ``K = {d : g_tᵀd ≥ 0 ∀t}`` (the
updates that conflict with no task), and the projections are averaged with the preference weights
``p`` (uniform ``1/T`` by default)::

    d = Σ_i p_i π_K(g_i)

By the paper's Proposition 1, ``π_K(Jᵀu) = Jᵀv*`` with ``v* = argmin_{v ≥ u} vᵀGv``, so every projection is
a small quadratic program on the Gram matrix; here ``π_K(g_i) = Jᵀv*(e_i)`` and ``w = Σ_i p_i v*(e_i)``.
``d`` is in ``K`` (a convex combination of points of the cone), so it conflicts with no task, and a
task's projection is its own gradient when it conflicts with none: gradients with pairwise
non-negative inner products give ``w = T·p`` exactly (naive summation for the uniform ``p``).

The paper defines the uniform preference as a mean, so the weights are put on the sum scale,
``w = T·Σ_i p_i v*(e_i)`` (``reduction="mean"`` divides by ``T`` and gives TorchJD's weights for the same
``pref_vector``). ``T = 2`` has the closed form ``v*(e_1) = (1, max(0, −G_12/G_22))`` (the projection of
``g_1`` off ``g_2`` when they conflict) and its mirror image; otherwise the ``T`` projections are solved
together: exactly by enumerating the active sets up to 9 tasks, and
beyond by a fixed budget of ``max_iter`` interior-point iterations finished exactly on the face they
point to. Positively homogeneous: the weights are invariant to a positive rescaling of ``G``. Nearly
opposite gradients make the cone thin and the exact projection's weights large (they are not capped):
the update is then resolved to ``ε·Σ_t|w_t|‖g_t‖`` in the gradients' own precision.

Differences from TorchJD's ``UPGrad`` (the authors' implementation): TorchJD solves the ``T`` programs
one at a time with quadprog on the host (a device synchronisation and copy each step), on ``G`` divided
by its trace plus ``reg_eps·I`` (``reg_eps = 1e-4``), and replaces ``G`` by zero when its trace is below
``norm_eps = 1e-4`` (absolute): so its projections are those of a regularised problem (a task can be
left in slight conflict, and the result is off by ~``reg_eps`` relative), and gradients whose squared
norms sum below ``1e-4`` are not projected at all (the weights become ``p``, i.e. the mean). Here the
unregularised problem is solved on ``G`` scaled to a unit diagonal, exactly scale-invariant, so neither
option exists. A ``pref_vector`` is used as TorchJD uses it (not renormalised). LibMTL's ``UPGrad`` is
TorchJD's code (the same regularisation, ``norm_eps``/``reg_eps`` as its options) with the uniform
preference only, on the mean scale, and without representation gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _cone
from ._common import check_gram, check_reduction, symmetric64, to_reduction
from .spec import Method, Option, positive_int

BIBTEX = """@article{quinton2024jacobian,
  title   = {Jacobian Descent For Multi-Objective Optimization},
  author  = {Quinton, Pierre and Rey, Val{\\'e}rian},
  journal = {arXiv preprint arXiv:2406.16232},
  year    = {2024}
}"""

Preference = torch.Tensor | Sequence[float] | None


def check_preference(pref_vector: Preference, *, name: str = "pref_vector") -> None:
    """A preference vector is ``None`` or one-dimensional, non-empty, finite and non-negative. Reads the
    values: call it once, at construction (on a CUDA tensor it synchronises)."""
    if pref_vector is None:
        return
    try:
        values = pref_vector.detach().cpu() if isinstance(pref_vector, torch.Tensor) else torch.as_tensor(pref_vector)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a vector of weights, got {pref_vector!r}") from error
    if values.dim() != 1 or values.numel() == 0 or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{name} must be a non-empty 1-D vector of real weights, got {pref_vector!r}")
    values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative, got {values.tolist()}")


def check_upgrad_options(pref_vector: Preference = None, max_iter: int = _cone.DEFAULT_ITERATIONS) -> None:
    check_preference(pref_vector)
    check_max_iter(max_iter)


def check_max_iter(max_iter: int) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")


def preference(pref_vector: Preference, G: torch.Tensor, *, name: str = "pref_vector") -> torch.Tensor:
    """The preference as a float64 vector on G's device (uniform ``1/T`` for ``None``), checked against ``T``.

    A tensor is not read back (its shape is checked, its values are not: a negative or non-finite entry
    makes the weights NaN instead, see ``valid``); a sequence is validated on the host first. Pass a
    tensor on G's device: building one from Python data is a copy from host memory. For a batch of Gram
    matrices ``(..., T, T)`` it is still one ``(T,)`` vector, shared by every entry.
    """
    T = G.shape[-1]
    if pref_vector is None:
        return torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
    if not isinstance(pref_vector, torch.Tensor):
        check_preference(pref_vector, name=name)
    p = torch.as_tensor(pref_vector).detach().to(device=G.device, dtype=torch.float64)
    if p.shape != (T,):
        raise ValueError(f"{name} must have shape ({T},) for T={T} tasks, got shape {tuple(p.shape)}")
    return p


def valid(weights: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``weights`` (``(..., T)``), or NaN where the preference has a negative or non-finite entry (no host
    read)."""
    ok = (p.isfinite() & (p >= 0)).all()
    return torch.where(ok, weights, torch.full_like(weights, float("nan")))


def upgrad_weights(
    G: torch.Tensor,
    *,
    pref_vector: Preference = None,
    reduction: str = "sum",
    max_iter: int = _cone.DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """Weights ``w`` (float64, on G's device) with ``d = wᵀJ`` the UPGrad update, on the sum scale.

    ``G`` is ``(T, T)`` or a batch ``(..., T, T)`` of independent problems, solved together (``w`` is
    ``(..., T)``; each entry as the unbatched call gives it). ``pref_vector``: the preference ``p``
    (``None``: ``1/T`` each), a ``(T,)`` tensor on G's device or a sequence, the same for every entry of
    a batch (an option, like the others); ``max_iter``: the interior point's iterations beyond 9 tasks.
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
        w = _two_tasks(G, p)
    else:
        V = _cone.project(G, torch.eye(T, dtype=torch.float64, device=G.device), max_iter=max_iter)
        w = T * (p[:, None] * V).sum(dim=-2)  # pᵀV, entry by entry (see _cone's batched linear algebra)
    w = w if pref_vector is None else valid(w, p)
    return to_reduction(w, reduction).reshape(*batch, T)


def _two_tasks(G: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    # v*(e_i) is e_i plus r_i = −G_ij/G_jj on the other task j when they conflict (G_ij < 0, and then
    # G_jj > 0): the projection of g_i onto {d : g_jᵀd ≥ 0}, which is inside K (g_iᵀd = G_ii − G_ij²/G_jj
    # ≥ 0 by Cauchy–Schwarz). So w = 2·(p_1 + p_2·r_2, p_2 + p_1·r_1). G (..., 2, 2) → (..., 2).
    removed = G[..., 0, 1].neg().clamp_min(0)[..., None]
    r = torch.where(removed > 0, removed / G.diagonal(dim1=-2, dim2=-1).flip(-1), 0.0)
    w = (p + (p * r).flip(-1)).mul_(2)
    return torch.where(G.isfinite().all(dim=-1).all(dim=-1, keepdim=True), w, float("nan"))


METHOD = Method(
    name="UPGrad",
    function="upgrad",
    weights=upgrad_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option(
            "pref_vector",
            None,
            check_preference,
            "the preference over the tasks' projections (None: uniform)",
            annotation="torch.Tensor | Sequence[float] | None",
        ),
        Option("max_iter", _cone.DEFAULT_ITERATIONS, positive_int("max_iter"), "iterations of the projection solve beyond 9 tasks"),
    ),
)
