"""Exact solves on the simplex for small ``T``: every face at once, in one batched linear solve.

Both simplex problems here depend on ``w`` only through ``g_w = Σ_t w_t g_t``, so (Carathéodory) one
of their minimisers has *affinely independent* gradients on its support ``S``; it lies in the relative
interior of the face ``S`` and so minimises the objective over that face's affine hull
``{w : w_i = 0 for i ∉ S, 1ᵀw = 1}``. On that hull the optimality conditions are the bordered system ::

    K_S [w; μ] = r,    K_S = [[G_SS, 1], [1ᵀ, 0]]

which is nonsingular exactly when the gradients in ``S`` are affinely independent. So: solve it for
every support with ``|S| ≥ 2``, add the ``T`` vertices, keep the candidates inside the simplex and
return the one with the smallest objective. Any candidate inside the simplex is a feasible point, so a
spurious one (a nearly singular face) can only lose to the true minimiser. The ``2^T − T − 1`` supports
take ``binom(T, ⌊T/2⌋)`` Cholesky factorisations, not one each: the supports are the prefixes of that
many orders of the tasks, and one factorisation per order solves all of its prefixes
(``_chain_solutions``; 70 for 247 supports at ``T = 8``).

- **MGDA** (``min wᵀGw``): the min-norm point of each affine hull, ``r = (0, 1)``.
- **CAGrad** (``min wᵀb + φ·sqrt(wᵀGw)`` with ``b = G1/T``): on the hull, for a fixed ``ρ = ‖g_w‖ > 0``
  the stationarity condition ``b + (φ/ρ)·Gw = μ1`` is that of a quadratic, whose solution is the
  line ``w(s) = w₀ + s·w₁``, ``s = ρ/φ``: ``w₀`` the min-norm point (``r = (0, 1)``) and ``w₁`` the
  solution for ``r = (−b, 0)``. Along it ``g_{w₀} ⊥ g_{w₁}`` and ``bᵀw₁ = −w₁ᵀGw₁``, so with
  ``q₀ = w₀ᵀGw₀`` and ``q₁ = w₁ᵀGw₁`` the objective is ``const − q₁s + φ·sqrt(q₀ + q₁s²)``, minimised at
  ``s* = sqrt(q₀ / (φ² − q₁))`` when ``φ² > q₁`` (otherwise it decreases without bound on the hull,
  and the minimiser lies on a smaller face). ``s* = 0`` is the kink ``g_w = 0``.

The work is fixed (no iterations, no data-dependent branches, nothing read back to the host) and grows
like ``2^T``: it beats the interior-point solver up to ``MAX_TASKS`` tasks. Beyond, the same face
solve finishes the interior point: ``polish_*`` solve only the few faces that its weights point to and
keep whichever of them and the interior point is best.

A batch of problems (``G`` ``(..., T, T)``) is one solve over (batch, orders), and each entry picks its
own best candidate (the polish, its own faces): an entry gets what it would get alone, bit for bit.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import _cone

MAX_TASKS = 10
# A candidate may undershoot 0 by rounding (a minimiser on the face's boundary); the problems are
# normalised to O(1), so this is ~1e6 ulps, far below any meaningful weight.
_FEASIBILITY_SLACK = 1e-10
# Relative weight thresholds that guess an interior point's support (``_supports_of``): 1e-2, 1e-4,
# …, 1e-10.
_POLISH_RATIO = 1e-2
_POLISH_GUESSES = 5


@functools.lru_cache(maxsize=32)
def _chains(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The orders of the tasks that ``_chain_solutions`` factorises, ``_cone.chain_orders``, and for them:

    - ``support`` ``(F,)``, ``F = 2^T − T − 1``: each support ``|S| ≥ 2`` once, as ``c·(T−1) + k − 1`` for
      ``S`` the first ``k + 1`` tasks of chain ``c``'s order, and ``inverse`` ``(F, T)``: that order's inverse;
    - ``gather_D`` ``(C·W·W,)`` and ``gather_r`` ``(C·W,)``, ``W = _cone.padded(T − 1)``: where each order's
      padded ``D`` and right-hand side are in the per-base tables of ``_chain_solutions``.
    """
    chains = _cone.symmetric_chains(size)
    order = torch.tensor(_cone.chain_orders(size), dtype=torch.int64)
    support = torch.tensor(
        [c * (size - 1) + len(subset) - 2 for c, chain in enumerate(chains) for subset in chain if len(subset) >= 2],
        dtype=torch.int64,
    )
    # Row/column T of a table pads: positions past T − 1 in an order point there.
    width = _cone.padded(size - 1)
    others = torch.nn.functional.pad(order[:, 1:], (0, width - (size - 1)), value=size)  # (C, W)
    base = order[:, :1]
    gather_D = (base[:, :, None] * (size + 1) + others[:, :, None]) * (size + 1) + others[:, None, :]
    gather_r = base * (size + 1) + others
    cached = (support, order.argsort(dim=1)[support // (size - 1)], gather_D.flatten(), gather_r.flatten())
    return tuple(t.to(device) for t in cached)


def _chain_solutions(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Every face's bordered-system solution for ``G`` ``(N, T, T)`` and the right-hand sides
    ``rhs`` ``(N, T+1, R)``: ``(N, 2^T − T − 1, T, R)``, NaN where the face is (numerically) affinely
    dependent; a factorisation for each of ``binom(T, ⌊T/2⌋)`` orders of the tasks, not one per face.

    On the face of the first ``k + 1`` tasks of an order ``π``, with ``b = π₀`` and ``w = s·e_b + Eα``
    (``E``'s columns ``e_{π_i} − e_b``, ``s`` the border's value), the bordered system ``Gw + μ1 = r``,
    ``1ᵀw = s`` is ``D_k α = (Eᵀ(r − s·G e_b))_k`` with ``D = EᵀGE`` the Gram matrix of the gradients'
    differences from ``g_b`` (positive definite on a face of affinely independent gradients). One Cholesky
    factor ``D = LLᵀ`` serves every prefix: ``D_k``'s factor is ``L_k``, so with ``M = L⁻¹`` and
    ``z = M·Eᵀ(…)`` (both prefix-consistent: ``M`` is lower triangular) ``α_k = M_kᵀ z_k = Σ_{j<k} z_j M_j``,
    a cumulative sum over the rows. A prefix that does not factorise makes every longer one, a
    superset, dependent too.
    """
    N, size, R = G.shape[0], G.shape[-1], rhs.shape[-1]
    if size == 1:  # no face beyond the vertex
        return G.new_empty(N, 0, 1, R)
    support, inverse, gather_D, gather_r = _chains(size, G.device)
    n, width = size - 1, _cone.padded(size - 1)
    # Per base b (N, T, ...): D_b = [G_ij − G_ib − G_bj + G_bb] and Eᵀ(r − s·G e_b) = [r_i − r_b − s(G_ib − G_bb)],
    # with a last row (and column) of padding: 1 on D_b's diagonal, 0 elsewhere.
    to_base = G.mT[:, :, :, None] - G.diagonal(dim1=-2, dim2=-1)[:, :, None, None]  # G_ib − G_bb, (N, b, i, 1)
    tables_D = torch.nn.functional.pad(G[:, None] - to_base - G[:, :, None, :], (0, 1, 0, 1)) + _cone.corner(size, G)
    r, s = rhs[:, :size], rhs[:, size]
    tables_r = torch.nn.functional.pad(
        torch.addcmul(r[:, None] - r[:, :, None], s[:, None, None], to_base, value=-1.0), (0, 0, 0, 1)
    )
    # Each order's padded D and right-hand side: one gather each (indexing with a tensor would read it
    # back on some devices).
    C = gather_r.shape[0] // width
    D = torch.unflatten(tables_D.flatten(1).index_select(1, gather_D), 1, (C, width, width))
    projected = torch.unflatten(tables_r.flatten(1, 2).index_select(1, gather_r), 1, (C, width))  # (N, C, W, R)
    factor, info = torch.linalg.cholesky_ex(D)
    # M and z from one triangular solve (the padding is decoupled: see _cone.factorize).
    identity = torch.eye(width, n, dtype=G.dtype, device=G.device).expand(*projected.shape[:2], width, n)
    solved = torch.linalg.solve_triangular(factor, torch.cat((identity, projected), dim=-1), upper=False)[..., :n, :]
    M, z = solved[..., :n], solved[..., n:]
    # Row j of the factor is valid only before a failed minor (info, 1-based): NaN in z_j reaches every
    # prefix that uses the row, and only those.
    failed = (info[..., None, None] > 0) & (torch.arange(2, n + 2, device=G.device)[:, None] > info[..., None, None])
    z = torch.where(failed, float("nan"), z)
    alpha = torch.cumsum(z[..., :, None, :] * M[..., :, :, None], dim=-3)  # (N, C, k − 1, i, R)
    alpha = alpha.flatten(1, 2).index_select(1, support)  # (N, F, n, R): the supports, each once
    weights = torch.cat((s[:, None, None, :] - alpha.sum(dim=-2, keepdim=True), alpha), dim=-2)  # in π's coordinates
    return weights.gather(-2, inverse[None, :, :, None].expand(N, -1, size, R))


def _bordered(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the supports ``masks`` ``(..., K, T)`` (0/1): the masks, where each face's bordered matrix takes
    ``G`` ``(..., K', T+1, T+1)``, and that matrix's constant part: identity rows outside ``S`` and the border.

    ``K'`` is ``K`` rounded up to a multiple of 8, the last support repeated (a repeated candidate never
    wins over its first copy in ``_best``): each entry's systems then fill a multiple of 64 bytes, so that
    in a batch every system starts at the offset, modulo 64 bytes, that it has in an unbatched call, and
    is solved bit-identically (see ``_cone``'s batched linear algebra)."""
    size, count = masks.shape[-1], masks.shape[-2]
    extra = -count % 8
    if extra:
        masks = torch.cat((masks, masks[..., -1:, :].expand(*masks.shape[:-2], extra, size)), dim=-2)
    inside = torch.nn.functional.pad(masks[..., :, None] * masks[..., None, :], (0, 1, 0, 1))
    template = torch.nn.functional.pad(torch.diag_embed(1.0 - masks), (0, 1, 0, 1))
    template[..., :size, size] = masks
    template[..., size, :size] = masks
    return masks, inside, template


def _face_solutions(G: torch.Tensor, rhs: torch.Tensor, faces: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Each face's bordered-system solution ``(..., K, T, R)`` for the right-hand sides ``rhs``
    ``(..., T+1, R)`` restricted to the face; NaN for a face whose system is singular. ``G`` is ``(..., T, T)``;
    the faces are shared (``(K, T)`` masks) or per entry (``(..., K, T)``): one batched solve over both."""
    masks, inside, template = faces
    systems = torch.addcmul(template, inside, torch.nn.functional.pad(G, (0, 1, 0, 1))[..., None, :, :])
    face_rhs = rhs[..., None, :, :] * torch.nn.functional.pad(masks, (0, 1), value=1.0)[..., :, :, None]
    solution, info = torch.linalg.solve_ex(systems, face_rhs.expand(*systems.shape[:-1], rhs.shape[-1]))
    solution = solution[..., :-1, :]
    return torch.where((info == 0)[..., None, None], solution, torch.full_like(solution, float("nan")))


def _best(
    points: torch.Tensor, feasible: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The candidate with the smallest ``objective`` among the face points ``(..., K, T)`` inside the
    simplex (up to rounding, then clipped onto it) and the points ``feasible`` ``(..., F, T)``, which are;
    ``(..., T)``, each entry of a batch choosing among its own candidates."""
    size = points.shape[-1]
    inside = (points >= -_FEASIBILITY_SLACK).all(dim=-1)  # False for NaN rows
    points = torch.where(inside[..., None], points, torch.full_like(points, 1.0 / size)).clamp_min(0)
    feasible = feasible.expand(*points.shape[:-2], *feasible.shape[-2:])
    points = torch.cat((points / points.sum(dim=-1, keepdim=True), feasible), dim=-2)
    inside = torch.nn.functional.pad(inside, (0, feasible.shape[-2]), value=True)
    values = objective(points)
    chosen = torch.where(inside, values, torch.full_like(values, float("inf"))).argmin(dim=-1, keepdim=True)
    # A gather: indexing with a tensor would read it back.
    w = points.gather(-2, chosen[..., None].expand(*chosen.shape, size)).squeeze(-2)
    # A non-finite problem has no answer: say so with NaN weights.
    finite = values[..., -feasible.shape[-2] :].isfinite().all(dim=-1, keepdim=True)
    return torch.where(finite, w, torch.full_like(w, float("nan")))


def _quadratic(points: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``pᵀGp`` for each row ``p`` of ``points`` ``(..., K, T)``: ``(..., K)``."""
    return (_cone.times(points, _cone.pad_square(G)) * points).sum(dim=-1)


def _vertices(G: torch.Tensor) -> torch.Tensor:
    return torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)


def min_norm(G: torch.Tensor) -> torch.Tensor:
    """``argmin_{w ∈ Δ} wᵀGw`` for a float64 PSD ``G`` ``(..., T, T)`` normalised to O(1), ``T ≤ MAX_TASKS``:
    ``(..., T)``, every face of every entry in one batched solve."""
    with torch.inference_mode():
        w = _min_norm_among(G, _every_face(G), _vertices(G))
    return w.clone()  # an ordinary tensor again, usable outside inference mode


def cagrad_dual(G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``argmin_{w ∈ Δ} wᵀb + φ·sqrt(wᵀGw)`` for ``b = G1/T`` (float64, O(1)), ``T ≤ MAX_TASKS``; ``G``
    ``(..., T, T)``, ``b`` ``(..., T)``, ``φ`` ``(...)``."""
    with torch.inference_mode():
        w = _cagrad_among(G, b, phi, _every_face(G), _vertices(G))
    return w.clone()


def polish_min_norm(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` (an approximate ``argmin_{w ∈ Δ} wᵀGw``, e.g. the interior point's) or, when better, the
    exact minimiser on a face that ``w`` points at: see ``_supports_of``. Per entry of a batch: each
    solves the faces its own ``w`` points at."""
    with torch.inference_mode():
        polished = _min_norm_among(G, _these_faces(G, _bordered(_supports_of(w))), w[..., None, :])
    return polished.clone()


def polish_cagrad_dual(G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``polish_min_norm`` for CAGrad's dual problem."""
    with torch.inference_mode():
        polished = _cagrad_among(G, b, phi, _these_faces(G, _bordered(_supports_of(w))), w[..., None, :])
    return polished.clone()


def _supports_of(w: torch.Tensor) -> torch.Tensor:
    """Candidate supports ``(..., _POLISH_GUESSES, T)`` of the minimiser that an interior point ``w``
    ``(..., T)`` approaches: the weights above ``τ·max(w)`` for a few ``τ``. On the barrier path a weight
    outside the support shrinks like ``1/t`` while those inside settle at their final values, so one of
    these thresholds almost always separates the two; a wrong guess is a feasible point or none, and
    loses to ``w`` itself in ``_best``."""
    thresholds = torch.full((_POLISH_GUESSES,), _POLISH_RATIO, dtype=w.dtype, device=w.device).cumprod(0)
    return (w[..., None, :] > thresholds[:, None] * w.amax(dim=-1, keepdim=True)[..., None]).to(w.dtype)


# Each face's solution (..., K, T, R) for right-hand sides (..., T+1, R).
FaceSolver = Callable[[torch.Tensor], torch.Tensor]


def _every_face(G: torch.Tensor) -> FaceSolver:
    """Every face of the simplex, ``G`` ``(N, T, T)`` or ``(T, T)``: by chains (``_chain_solutions``)."""
    if G.dim() == 2:
        return lambda rhs: _chain_solutions(G[None], rhs.expand(1, *rhs.shape[-2:]))[0]
    return lambda rhs: _chain_solutions(G, rhs.expand(G.shape[0], *rhs.shape[-2:]))


def _these_faces(G: torch.Tensor, faces: tuple[torch.Tensor, ...]) -> FaceSolver:
    """The faces ``faces`` (``_bordered``), one bordered system each."""
    return lambda rhs: _face_solutions(G, rhs, faces)


def _min_norm_among(G: torch.Tensor, solutions: FaceSolver, feasible: torch.Tensor) -> torch.Tensor:
    rhs = torch.zeros(G.shape[-1] + 1, 1, dtype=G.dtype, device=G.device)
    rhs[-1].fill_(1.0)  # not rhs[-1] = 1.0: on CUDA that copies a host scalar, which waits for the device
    return _best(solutions(rhs)[..., 0], feasible, lambda points: _quadratic(points, G))


def _cagrad_among(
    G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor, solutions: FaceSolver, feasible: torch.Tensor
) -> torch.Tensor:
    # Right-hand sides (0, 1) and (−b, 0), side by side: (..., T+1, 2).
    border = torch.zeros(G.shape[-1] + 1, dtype=G.dtype, device=G.device)
    border[-1].fill_(1.0)
    rhs = torch.stack((border.expand(*b.shape[:-1], -1), torch.nn.functional.pad(-b, (0, 1))), dim=-1)
    w0, w1 = solutions(rhs).unbind(dim=-1)
    phi = phi[..., None]  # one per entry, against its K faces
    margin = phi * phi - _quadratic(w1, G)
    safe_margin = torch.where(margin > 0, margin, torch.ones_like(margin))
    s = torch.where(margin > 0, (_quadratic(w0, G).clamp_min(0) / safe_margin).sqrt(), torch.full_like(margin, float("nan")))
    points = torch.addcmul(w0, s[..., None], w1)
    b = b[..., None, :]

    def objective(points: torch.Tensor) -> torch.Tensor:
        return (points * b).sum(dim=-1) + phi * _quadratic(points, G).clamp_min(0).sqrt()

    return _best(points, feasible, objective)
