"""Projections onto the dual cone of the task gradients, in Gram space: batched, on device, no host sync.

The dual cone ``K = {d : J d ≥ 0}`` holds the updates that conflict with no task. Projecting
``x = Jᵀu`` onto it is, in Gram space, the problem (Quinton & Rey 2024, Prop. 1) ::

    v* = argmin_{v ≥ u} vᵀGv,        π_K(Jᵀu) = Jᵀv*

``J v*`` is unique (it is the projection); ``v*`` need not be when ``G`` is singular, and any minimiser
will do. With ``v = u + μ`` it is a non-negative least-squares problem in ``μ``, whose optimality
conditions are those of a linear complementarity problem: with ``g = G(u + μ)``, ::

    μ ≥ 0,   g ≥ 0,   μ_i g_i = 0        ⇔        min(μ, g) = 0.

``‖min(μ, g)‖_∞`` (the *natural residual*) measures optimality, and here it also chooses between
candidate solutions. Every candidate is first clamped to ``μ ≥ 0`` (so it is feasible); the residual
then vanishes exactly at the minimisers. Each of the ``K`` right-hand sides ``u`` gets its own
solution, all at once.

The problem is solved on ``D G D`` with ``D = diag(G)^(-1/2)`` (zero rows keep 1), in the variables
``D⁻¹μ``: a positive diagonal scaling leaves ``μ ≥ 0`` unchanged, makes gradients of very different
sizes comparable and puts every diagonal entry at 1. Each right-hand side is also divided by its
largest entry (the solution is positively homogeneous in ``u``), so both ``G`` and ``u`` are ``O(1)``.

- **Up to** ``MAX_TASKS`` **tasks: exact.** By Carathéodory's theorem for cones (as in Lawson and
  Hanson's NNLS) one minimiser has linearly independent gradients on its *free set*
  ``F = {i : μ_i > 0}``; on it ``G_FF μ_F = −(Gu)_F``, ``μ_A = 0`` elsewhere. Every free set is solved,
  the ``2^T`` of them from ``binom(T, ⌊T/2⌋)`` batched Cholesky factorisations (the free sets are the
  prefixes of that many orders of the tasks, see ``_exact``; a singular face fails to factorise or
  gives a candidate far from optimal), and the candidate with the smallest natural residual wins (the
  first of equals: ``F = ∅``, ``v = u``, comes first, so gradients that conflict with nothing come back
  exactly unchanged). The work grows like ``2^T``: the interior point below was cheaper from 10 tasks
  on for ``T`` right-hand sides (UPGrad), from 11 for one, with one factorisation per free set
  (measured on a CPU); the chains only move that crossover up.
- **Beyond: an interior point finished on its face.** A primal–dual interior-point method
  (Mehrotra's predictor–corrector on the complementarity problem above, one Cholesky factorisation
  of ``G + diag(λ/μ)`` per iteration for all right-hand sides at once) runs a fixed ``max_iter``
  iterations. Its iterate separates the free variables (``μ_i ≫ λ_i``) from the active ones; a few
  guesses of that split are solved exactly by Newton steps on the face from the iterate (which also
  copes with a singular ``G_FF``: the steps only move along its range), followed by one
  primal–dual active-set step from the best of them, and the candidate with the smallest natural
  residual wins — at worst the interior point itself (``v = u`` is a candidate too, first). On
  linearly independent faces this is exact to rounding (natural residual ≤ 1e-13 measured up to
  ``T = 64``); on degenerate problems (more tasks than directions, an unbounded set of minimisers)
  the finish may not apply and the interior point's own accuracy stands (≤ 1e-10 measured).

Nothing is read back to the host and no step depends on a tensor's value through Python: a fixed
number of kernels, whatever the data. A batch of problems (``G`` ``(..., T, T)``) is solved in the same
kernels, each entry (and each right-hand side) with its own steps and its own choice of candidate: an
entry gets what it would get alone, bit for bit (see the batched linear algebra at the end).
"""

from __future__ import annotations

import functools

import torch

MAX_TASKS = 9
DEFAULT_ITERATIONS = 16
# Guesses of the free set from the interior point: F = {μ_i > τ·λ_i}. Near the solution μ_i λ_i ≈ m
# for every i, so free variables have μ_i/λ_i ≈ μ_i²/m ≫ 1 and active ones ≪ 1; the extra guesses
# classify degenerate variables (both small) one way or the other.
_SPLITS = (1e-4, 1.0, 1e4)
# Ridge of the factorisations (the interior point's Newton matrix, the face steps), not of the problem:
# on the unit diagonal of the scaled G, ~100x the rounding of its eigenvalues at T = 64 in float64, so
# that singular faces (rank-deficient gradients) and the free variables' vanishing λ/μ still factorise.
# The face steps are refined once, which leaves a bias of (ridge/σ_min)².
_RIDGE = 1e-12
# Fraction of the way to the boundary an interior-point step may go.
_TO_BOUNDARY = 0.99
# Complementarity below which the interior point stops aiming lower (the finish takes over): far
# above float64's smallest normal numbers, whose subnormal neighbours are slow on CPUs.
_FLOOR = 1e-30


def project(
    G: torch.Tensor, U: torch.Tensor, *, ridge: float = 0.0, max_iter: int = DEFAULT_ITERATIONS
) -> torch.Tensor:
    """``V`` ``(..., K, T)`` with ``V[..., k, :] = argmin_{v ≥ U[..., k, :]} vᵀGv``.

    ``G``: float64 ``(..., T, T)`` (a batch of independent problems, or one), symmetric positive
    semi-definite (rounding aside), of any scale (it is scaled to a unit diagonal); ``U``: float64
    ``(..., K, T)``, its batch dimensions broadcast against ``G``'s (a ``(K, T)`` ``U`` is shared by every
    entry). Exact up to ``MAX_TASKS`` tasks; beyond, the interior point (``max_iter`` iterations) and its
    exact finish. A non-finite ``G`` or ``U`` gives NaN rows (for its own entry only).

    ``ridge = η > 0`` solves ``vᵀ(G + η·diag(G))v`` instead: the projection onto the slightly larger cone
    ``{d : g_tᵀd ≥ −η‖g_t‖²v_t}`` (each gradient given a private orthogonal component of relative length
    ``√η``), whose weights stay below ``~‖u‖/√η`` however nearly dependent the gradients are.
    """
    with torch.inference_mode():
        V = _project(G, U, ridge, max_iter)
    return V.clone()  # an ordinary tensor again, usable outside inference mode


def project_two(G: torch.Tensor, u: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    """``project`` for two tasks and one right-hand side ``u ≥ 0`` ``(..., 2)``, in closed form: ``(..., 2)``
    for ``G`` ``(..., 2, 2)`` (``u`` broadcast against ``G``'s batch).

    With ``g = Gu`` (the inner products of ``x = Jᵀu`` with the gradients), at most one ``g_i`` is
    negative (for independent gradients both would make ``‖x‖² = uᵀg < 0``; for dependent ones ``x`` is
    along one of them), and the projection is that of ``x`` onto ``{d : g_iᵀd ≥ 0}``:
    ``v = u + e_i·(−g_i/G_ii)``, which leaves the other constraint satisfied (both active would need
    ``d = 0 = Jᵀv``, impossible for independent gradients). ``ridge`` as in ``project``.
    """
    diagonal = G.diagonal(dim1=-2, dim2=-1)
    if ridge:
        G = G + torch.diag_embed(diagonal * ridge)
        diagonal = G.diagonal(dim1=-2, dim2=-1)
    g = matvec(G, u)
    v = u - torch.where(g < 0, g / diagonal, 0.0)
    return torch.where(G.isfinite().all(dim=-1).all(dim=-1, keepdim=True), v, float("nan"))


def natural_residual(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    """``‖min(μ, g)‖_∞`` per row ``(..., K)`` in the scaled problem that ``project`` solves
    (``μ = D⁻¹(V − U)``, ``g = DGV``, each row divided by ``U``'s largest scaled entry); 0 exactly at the
    minimisers, and it counts ``μ < 0`` (``V`` below ``U``) as a violation too."""
    Gs, scale = _scaled(G, ridge)
    scale = scale[..., None, :]
    Us = U / scale
    size = Us.abs().amax(dim=-1, keepdim=True)
    size = torch.where(size > 0, size, 1.0)
    mu = (V - U) / (scale * size)
    Us = (Us / size).expand_as(mu)
    residual = _residual(pad_square(Gs), Us, mu.clamp_min(0)[..., None, :, :])[..., 0, :]
    return torch.maximum(residual, (-mu).clamp_min(0).amax(dim=-1))


def _project(G: torch.Tensor, U: torch.Tensor, ridge: float, max_iter: int) -> torch.Tensor:
    Gs, scale = _scaled(G, ridge)
    scale = scale[..., None, :]  # (..., 1, T), against the rows of U
    Us = U / scale
    size = Us.abs().amax(dim=-1, keepdim=True)
    size = torch.where(size > 0, size, 1.0)
    Us = Us / size
    Gp = pad_square(Gs)
    if G.shape[-1] <= MAX_TASKS:
        mu = _exact(Gp, Us)
    else:
        mu = _interior_finished(Gp, Us, max_iter)
    V = torch.addcmul(U, mu, scale * size)
    # A non-finite G or U has no answer: say so with NaN. (Scaled, every entry is at most 1 in magnitude
    # unless it is not finite, so the sums cannot overflow.)
    finite = (Gs.sum(dim=(-2, -1)) + Us.sum(dim=(-2, -1))).isfinite()
    return torch.where(finite[..., None, None], V, float("nan"))


def _scaled(G: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``DGD + ηI`` with ``D = diag(G)^(-1/2)`` (1 for zero rows), and ``D``'s diagonal ``(..., T)``."""
    diagonal = G.diagonal(dim1=-2, dim2=-1)
    scale = torch.where(diagonal > 0, diagonal.rsqrt(), 1.0)
    Gs = G * scale[..., :, None] * scale[..., None, :]  # not the outer product first: it can overflow
    if ridge:
        Gs.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return Gs, scale


def _gradients(Gp: torch.Tensor, Us: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``(u + μ)ᵀG`` for every candidate ``mu`` ``(..., C, K, T)`` of every right-hand side ``Us`` ``(..., K, T)``:
    one product per entry, the candidates stacked as rows (``Gp`` is the padded ``G``: see ``times``)."""
    rows = (Us[..., None, :, :] + mu).flatten(-3, -2)
    return torch.unflatten(times(rows, Gp), -2, mu.shape[-3:-1])


def _residual(Gp: torch.Tensor, Us: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Natural residual ``(..., C, K)`` of each candidate ``mu`` ``(..., C, K, T)`` (already ``≥ 0``); NaN ranks
    last (inf)."""
    residual = torch.minimum(mu, _gradients(Gp, Us, mu)).abs_().amax(dim=-1)
    return residual.nan_to_num_(nan=float("inf"))


def _pick(candidates: torch.Tensor, Gp: torch.Tensor, Us: torch.Tensor) -> torch.Tensor:
    """The candidate ``(..., C, K, T)``, clamped onto ``μ ≥ 0``, with the smallest natural residual, for each
    right-hand side of each entry: ``(..., K, T)``."""
    candidates = candidates.clamp_min(0)
    chosen = _residual(Gp, Us, candidates).argmin(dim=-2, keepdim=True)  # (..., 1, K)
    index = chosen[..., None].expand(*chosen.shape, candidates.shape[-1])
    return candidates.gather(-3, index).squeeze(-3)  # a gather: indexing with a tensor would read it back


# ---------------------------------------------------------------- exact: every free set at once


def symmetric_chains(size: int) -> list[list[tuple[int, ...]]]:
    """A symmetric chain decomposition of the subsets of ``{0..T−1}`` (de Bruijn et al.): nested chains,
    each growing by one task at a time, that hold every subset once. There are ``binom(T, ⌊T/2⌋)``, the
    fewest any such cover can have (each chain holds one ``⌊T/2⌋``-subset)."""
    chains: list[list[tuple[int, ...]]] = [[()]]
    for task in range(size):
        grown = []
        for chain in chains:
            grown.append(chain + [chain[-1] + (task,)])
            if len(chain) > 1:
                grown.append([subset + (task,) for subset in chain[:-1]])
        chains = grown
    return chains


def chain_orders(size: int) -> list[list[int]]:
    """Per chain of ``symmetric_chains``, an order of the tasks whose prefixes are the chain's subsets."""
    orders = []
    for chain in symmetric_chains(size):
        order = list(chain[0])
        for subset in chain[1:]:
            order += [task for task in subset if task not in order]
        orders.append(order + [task for task in range(size) if task not in order])
    return orders


@functools.lru_cache(maxsize=32)
def _free_set_chains(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For ``_exact``: each free set ``F ≠ ∅`` once, as ``c·T + |F| − 1`` (``F`` a prefix of chain ``c``'s
    order) ``(2^T − 1,)``; that order's inverse ``(2^T − 1, T)``; each order padded to ``W = padded(T)``
    with ``T`` (the padding row of a table), ``(C·W,)``; and where each order's padded matrix is in the
    table ``[G_ij]`` with that one more row and column, ``(C·W·W,)``."""
    orders = chain_orders(size)
    supports = [c * size + len(subset) - 1 for c, chain in enumerate(symmetric_chains(size)) for subset in chain if subset]
    order = torch.tensor(orders, dtype=torch.int64)
    support = torch.tensor(supports, dtype=torch.int64)
    positions = torch.nn.functional.pad(order, (0, padded(size) - size), value=size)  # past T − 1: the padding
    gather = positions[:, :, None] * (size + 1) + positions[:, None, :]
    cached = (support, order.argsort(dim=1)[support // size], positions.flatten(), gather.flatten())
    return tuple(t.to(device) for t in cached)


def _exact(Gp: torch.Tensor, Us: torch.Tensor) -> torch.Tensor:
    # Every free set of every entry, from one Cholesky factorisation per chain of free sets
    # (symmetric_chains): in a chain's order π, G_FF for F = π[:k] is the leading block of G permuted,
    # whose factor is the leading block of the factor L. With M = L⁻¹ and z = M·(Gu)_π (both
    # prefix-consistent, M lower triangular), G_FF μ_F = −(Gu)_F is μ_F = −M_kᵀ z_k = −Σ_{j<k} z_j M_j: a
    # cumulative sum over the rows. A prefix that fails to factorise (singular, or indefinite by rounding)
    # makes every longer one, a superset, singular too: NaN, which ranks last.
    size, K = Us.shape[-1], Us.shape[-2]
    support, inverse, positions, gather = _free_set_chains(size, Gp.device)
    width = padded(size)
    batch = Gp.shape[:-2]
    table = torch.nn.functional.pad(Gp[..., :size, :size], (0, 1, 0, 1)) + corner(size, Gp)
    C = positions.shape[0] // width
    systems = torch.unflatten(table.flatten(-2).index_select(-1, gather), -1, (C, width, width))  # (..., C, W, W)
    factor, info = torch.linalg.cholesky_ex(systems)
    # (Gu)_π per order, padded with zeros: (..., C, W, K).
    c = torch.nn.functional.pad(times(Us, Gp), (0, 1)).mT  # (..., T+1, K)
    projected = torch.unflatten(c.index_select(-2, positions), -2, (C, width))
    identity = torch.eye(width, size, dtype=Gp.dtype, device=Gp.device).expand(*projected.shape[:-1], size)
    solved = torch.linalg.solve_triangular(factor, torch.cat((identity, projected), dim=-1), upper=False)[..., :size, :]
    M, z = solved[..., :size], solved[..., size:]
    failed = (info[..., None, None] > 0) & (torch.arange(1, size + 1, device=Gp.device)[:, None] >= info[..., None, None])
    z = torch.where(failed, float("nan"), z)
    mu = torch.cumsum(z[..., :, None, :] * M[..., :, :, None], dim=-3).neg_()  # (..., C, k − 1, i, K)
    mu = mu.flatten(-4, -3).index_select(-3, support)  # (..., F, i, K): the free sets, each once, in π's coordinates
    mu = mu.gather(-2, inverse[:, :, None].expand(*batch, -1, size, K))
    # F = ∅ (v = u) first: it wins the ties, so gradients that conflict with nothing come back unchanged.
    candidates = torch.cat((torch.zeros_like(mu[..., :1, :, :]), mu), dim=-3)
    return _pick(candidates.mT, Gp, Us)


@functools.lru_cache(maxsize=32)
def _corner_of(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    corner = torch.zeros(size + 1, size + 1, dtype=dtype)
    corner[size, size] = 1.0
    return corner.to(device)


def corner(size: int, like: torch.Tensor) -> torch.Tensor:
    """``(T+1, T+1)``, 1 at ``[T, T]``: the diagonal of the padding row and column of a gathered table."""
    return _corner_of(size, like.dtype, like.device)


# ---------------------------------------------------------------- beyond: interior point + exact finish


def _interior_finished(Gp: torch.Tensor, Us: torch.Tensor, iterations: int) -> torch.Tensor:
    mu, lam = _interior_point(Gp, Us, iterations)
    free = torch.stack([mu > split * lam for split in _SPLITS], dim=-3)  # (..., S, K, T)
    polished = _face_newton(Gp, Us, mu[..., None, :, :], free)
    # v = u first: when it is optimal (nothing to project, or G = 0 and every v is) it wins the ties.
    candidates = torch.cat((torch.zeros_like(mu)[..., None, :, :], mu[..., None, :, :], polished), dim=-3)
    best = _pick(candidates, Gp, Us)[..., None, :, :]
    # One primal–dual active-set step from the best: free where μ_i > g_i.
    step = _face_newton(Gp, Us, best, best > _gradients(Gp, Us, best))
    return _pick(torch.cat((best, step), dim=-3), Gp, Us)


def _face_newton(Gp: torch.Tensor, Us: torch.Tensor, mu: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """From each candidate ``mu`` ``(..., C, K, T)``, two Newton steps on ``½(u+μ)ᵀG(u+μ)`` restricted to
    ``μ_A = 0`` (``A`` outside ``free``, ``(..., C, K, T)``), with ``G_FF + ηI`` for the Hessian: on a
    non-singular face its minimiser up to ``(η/σ_min)²``; on a singular one, the nearest minimiser along
    the face's range. Steps from the iterate rather than a solve from scratch, so that an ill-conditioned
    face moves it little."""
    size = mu.shape[-1]
    inside = free.to(Gp.dtype)
    diagonal = torch.addcmul(1.0 - inside, inside, torch.full_like(inside, _RIDGE))
    face = inside[..., :, None] * inside[..., None, :]
    factor, info = factorize(torch.addcmul(torch.diag_embed(diagonal), face, Gp[..., None, None, :size, :size]))
    mu = mu * inside
    for _ in range(2):
        gradient = _gradients(Gp, Us, mu).mul_(inside)
        mu = mu - solve(factor, gradient[..., None])[..., 0]
    return torch.where(info[..., None] == 0, mu, float("nan"))


def _interior_point(Gp: torch.Tensor, Us: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mehrotra's predictor–corrector on ``min ½μᵀGμ + cᵀμ, μ ≥ 0`` (``c = Gu``): with ``λ`` the multipliers,
    Newton steps on ``Gμ + c − λ = 0``, ``μ ⊙ λ = σm`` (``m = μᵀλ/T``, ``σ`` from the predictor's
    progress). Eliminating ``Δλ`` leaves ``(G + diag(λ/μ)) Δμ = r`` for both steps (``G + ηI`` in the
    matrix: the free variables' ``λ/μ`` tends to 0 and ``G_FF`` may be singular). ``μ`` and ``λ`` live
    side by side in one ``(..., K, 2T)`` tensor so that the step-length rule is one reduction; every row
    of every entry takes its own steps."""
    size, extra = Us.shape[-1], Gp.shape[-1] - Us.shape[-1]
    c = times(Us, Gp)
    # The Newton matrix padded like Gp (an identity block: see factorize), built so directly.
    ridge = torch.full((Gp.shape[-1],), _RIDGE, dtype=Gp.dtype, device=Gp.device)
    ridge[size:].fill_(1.0)
    newton = (Gp + torch.diag_embed(ridge))[..., None, :, :]
    z = torch.ones(*c.shape[:-1], 2 * size, dtype=Gp.dtype, device=Gp.device)
    for _ in range(iterations):
        mu, lam = torch.split(z, size, dim=-1)
        ratio = lam / mu
        factor, info = torch.linalg.cholesky_ex(torch.diag_embed(torch.nn.functional.pad(ratio, (0, extra))).add_(newton))
        gap = (mu * lam).mean(dim=-1, keepdim=True)
        # Predictor (σ = 0): (G + Λ/M)Δμ = −(Gμ + c − λ) − λ = −(Gμ + c), Δλ = −λ − (λ/μ)Δμ.
        rhs = times(mu, Gp).add_(c).neg_()
        d_mu = solve(factor, rhs.unsqueeze(-1)).squeeze(-1)
        direction = torch.cat((d_mu, torch.addcmul(lam, ratio, d_mu).neg_()), dim=-1)
        predicted = torch.addcmul(z, _max_step(z, direction, 1.0), direction)
        sigma = (predicted[..., :size] * predicted[..., size:]).mean(dim=-1, keepdim=True).div_(gap).clamp_(0.0, 1.0).pow_(3)
        # Corrector: aim at μ ⊙ λ = σm (m floored) less the predictor's second-order term t.
        target = torch.addcmul(sigma.mul_(gap.clamp_min_(_FLOOR)), d_mu, direction[..., size:], value=-1.0)
        d_mu = solve(factor, torch.addcdiv(rhs, target, mu).unsqueeze(-1)).squeeze(-1)
        direction = torch.cat((d_mu, torch.addcmul(target, lam, d_mu, value=-1.0).div_(mu).sub_(lam)), dim=-1)
        # A failed factorisation (G indefinite beyond the ridge) gives no step.
        step = torch.where(info.unsqueeze(-1) == 0, _max_step(z, direction, _TO_BOUNDARY), 0.0)
        z = torch.addcmul(z, step, direction.nan_to_num_(0.0, 0.0, 0.0))
    return z[..., :size], z[..., size:]


def _max_step(z: torch.Tensor, direction: torch.Tensor, fraction: float) -> torch.Tensor:
    """``min(1, fraction × the step to the boundary z = 0)`` along ``direction``, per row ``(..., 1)``."""
    return (direction / z).amin(dim=-1, keepdim=True).clamp_max_(-fraction).reciprocal_().mul_(-fraction)


# ---------------------------------------------------------------- batched linear algebra, entry by entry
#
# A batch must give each entry exactly what the unbatched call gives. Elementwise kernels and reductions
# (torch's own) do; BLAS and LAPACK (MKL) need not: they may round differently for data at another
# memory alignment (in a batch each matrix starts where the one before it ends) and choose other
# kernels for another batch size. So matrix-vector products here are elementwise products and sums,
# and the solvers' matrix products, factorisations and solves work on rows padded to a multiple of
# 8 float64 (64 bytes), where every matrix, row and column of every entry starts on a 64-byte boundary,
# as an unbatched problem's do (measured bit-identical on MKL at every batch size; the methods also
# give a single problem a batch dimension of 1, so that it runs the very same kernels).

# float64 entries in 64 bytes.
_ALIGN = 8


def padded(size: int) -> int:
    """``size`` rounded up to a multiple of 8: the rows of a padded matrix."""
    return -(-size // _ALIGN) * _ALIGN


def pad_square(M: torch.Tensor) -> torch.Tensor:
    """``M`` ``(..., n, n)`` padded with zeros to ``(..., padded(n), padded(n))``, for ``times``."""
    extra = padded(M.shape[-1]) - M.shape[-1]
    return torch.nn.functional.pad(M, (0, extra, 0, extra)) if extra else M


def times(X: torch.Tensor, Mp: torch.Tensor) -> torch.Tensor:
    """``X @ M`` for ``X`` ``(..., m, n)`` and ``Mp = pad_square(M)``: ``(..., m, n)``, each entry of a batch
    as it would be alone."""
    size = X.shape[-1]
    extra = Mp.shape[-1] - size
    if extra:
        X = torch.nn.functional.pad(X, (0, extra))
    product = X @ Mp
    return product[..., :size] if extra else product


def matvec(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M v`` for ``M`` ``(..., n, n)`` and ``v`` ``(..., n)``: ``(..., n)``, products and a sum per row."""
    product: torch.Tensor = torch.linalg.vecdot(M, v.unsqueeze(-2))
    return product


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀb`` over the last dimension (products and a sum)."""
    product: torch.Tensor = torch.linalg.vecdot(a, b)
    return product


def factorize(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cholesky factor of each symmetric ``M`` ``(..., n, n)``, padded with an identity block to
    ``padded(n)`` rows, and LAPACK's ``info`` ``(...)`` (0: factorised); for ``solve``. The identity block
    is decoupled: its factor is the identity, and a right-hand side's padded rows (zeros) stay zero."""
    size = M.shape[-1]
    extra = padded(size) - size
    if extra:
        M = torch.nn.functional.pad(M, (0, extra, 0, extra))
        M.diagonal(dim1=-2, dim2=-1)[..., size:].fill_(1.0)
    factor: tuple[torch.Tensor, torch.Tensor] = torch.linalg.cholesky_ex(M)
    return factor


def solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(LLᵀ)⁻¹ rhs`` for a ``factorize`` factor and ``rhs`` ``(..., n, k)``: ``(..., n, k)``. Two triangular
    solves (``cholesky_solve`` checks errors on every call, which costs more than the solve at these
    sizes)."""
    size = rhs.shape[-2]
    extra = factor.shape[-1] - size
    if extra:
        rhs = torch.nn.functional.pad(rhs, (0, 0, 0, extra))
    lower = torch.linalg.solve_triangular(factor, rhs, upper=False)
    x: torch.Tensor = torch.linalg.solve_triangular(factor.mT, lower, upper=True)
    return x[..., :size, :] if extra else x
