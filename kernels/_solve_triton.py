"""Triton kernels behind ``solve``: the T×T weight solves, one program each, in float64.

Imported by the launchers on first use, never at package import: ``@triton.jit`` reads
``TRITON_INTERPRET`` when this module is imported.

Every kernel keeps the padded ``(BT, BT)`` problem in one program's registers; rows and columns ``≥ T``
are masked out of every reduction, and loops over tasks run to the runtime ``T``, never to ``BT``.
Entries are read out of a register tile with masked sums (``Σ_j [j = k]·A_ij``), which add exact zeros
and so return the entry unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from ._jit import jit

# Whether the kernels below were built for the CPU interpreter (fixed when this module was imported).
INTERPRETED: bool = bool(knobs.runtime.interpret)

# Mirrors of gradsurgery.methods._simplex (kernels import nothing from gradsurgery; a test checks
# that the numbers agree). The step ladder is 2**-k for k < LADDER, then 0. Float constants that are
# not exact in fp32 enter the kernels through tl.full(..., tl.float64): a bare Python float becomes
# an fp32 constant in Triton.
GROWTH = tl.constexpr(2.0)
T_MAX = tl.constexpr(1e14)
LADDER = tl.constexpr(16)
SHORTEN = tl.constexpr(0.99)


@jit
def _add(a, b):
    return a + b


# Sums are written tl.reduce(x, axis, _SUM): what tl.sum compiles to for float64. tl.sum is itself a
# @triton.jit function, and the interpreter re-patches triton.language on every nested jit call
# (~0.3 ms each, most of an interpreted solve); it runs tl.reduce with tl.sum's own combine function as
# a single np.sum. Should a Triton release rename that function, _add computes the same sums (the
# interpreter then reduces element by element, slowly).
_SUM = getattr(tl.standard, "_sum_combine", _add)


@jit(do_not_specialize=["T", "stride_g0", "stride_g1", "stride_o0", "stride_o1"])
def _pcgrad_kernel(G, orders, out, T, stride_g0, stride_g1, stride_o0, stride_o1, BT: tl.constexpr):
    # Row i of the register tile C is chain i's coefficient vector c_i; the T chains advance together,
    # round r visiting task orders[i, r] in chain i (as pcgrad_coefficients does, tensor-wide).
    r = tl.arange(0, BT)
    valid = r < T
    rows = r[:, None]
    cols = r[None, :]
    C = tl.where((rows == cols) & (rows < T), 1.0, 0.0).to(tl.float64)
    for step in range(0, T - 1):
        visit = tl.load(orders + r.to(tl.int64) * stride_o0 + step * stride_o1, mask=valid, other=0)
        # Out-of-range orders (not checked: that would read them on the host) never address memory
        # outside G; they yield unspecified weights.
        in_range = valid & (visit >= 0) & (visit < T)
        visit = tl.where(in_range, visit, 0).to(tl.int64)
        tile_mask = in_range[:, None] & (cols < T)
        # Row visit[i] of (G + Gᵀ)/2 in float64, as symmetric64 computes it.
        g_vk = tl.load(G + visit[:, None] * stride_g0 + cols * stride_g1, mask=tile_mask, other=0.0)
        g_kv = tl.load(G + cols * stride_g0 + visit[:, None] * stride_g1, mask=tile_mask, other=0.0)
        g_rows = (g_vk.to(tl.float64) + g_kv.to(tl.float64)) / 2
        inner = tl.reduce(C * g_rows, 1, _SUM)
        norm_sq = tl.load(G + visit * (stride_g0 + stride_g1), mask=in_range, other=0.0).to(tl.float64)
        conflict = (inner < 0) & (norm_sq > 0)
        safe = tl.where(norm_sq > 0, norm_sq, 1.0)
        delta = tl.where(conflict, inner / safe, 0.0)
        C = C - tl.where(cols == visit[:, None], delta[:, None], 0.0)
    tl.store(out + r, tl.reduce(C, 0, _SUM), mask=valid)


@jit(do_not_specialize=["T", "stride_g0", "stride_g1", "stride_b", "iterations"])
def _simplex_kernel(
    G,
    b_ptr,
    phi_ptr,
    out,
    T,
    stride_g0,
    stride_g1,
    stride_b,
    iterations,
    BT: tl.constexpr,
    CAGRAD: tl.constexpr,
):
    # gradsurgery.methods._simplex.minimize_on_simplex, step for step, for one objective f: the
    # log-barrier Newton iteration in w-scaled coordinates, Cholesky solve of H̃ = t·W∇²fW + I, the step
    # ladder picked by the sign of the barrier's directional derivative, t doubling up to T_MAX.
    #   MGDA:   f = wᵀGw,     ∇f = 2Gw,        ∇²f = 2G
    #   CAGrad: f = wᵀb + φn, ∇f = b + φ·Gw/n, ∇²f = φ·(G/n − GwwᵀG/n³), with n = sqrt(wᵀGw + 1/t²)
    # Helpers are written out inline: the interpreter re-patches triton.language on every nested
    # @triton.jit call, which would dominate its run time.
    r = tl.arange(0, BT)
    valid = r < T
    rows = r[:, None]
    cols = r[None, :]
    rhs = tl.arange(0, 2)[None, :]
    tile_mask = (rows < T) & (cols < T)
    Gt = tl.load(G + rows.to(tl.int64) * stride_g0 + cols * stride_g1, mask=tile_mask, other=0.0).to(tl.float64)
    if CAGRAD:
        b = tl.load(b_ptr + r.to(tl.int64) * stride_b, mask=valid, other=0.0).to(tl.float64)
        phi = tl.load(phi_ptr).to(tl.float64)
    else:
        b = tl.zeros((BT,), dtype=tl.float64)
        phi = tl.zeros((), dtype=tl.float64)
    eye = tl.where(rows == cols, 1.0, 0.0).to(tl.float64)
    w = tl.where(valid, 1.0 / T.to(tl.float64), 0.0)
    t = tl.full((), 1.0, tl.float64)
    for _ in range(0, iterations):
        inv_t_sq = 1.0 / (t * t)
        # (w @ G)_j, summed over the rows of G (symmetric, so also (G @ w)_j).
        Gw = tl.reduce(w[:, None] * Gt, 0, _SUM)
        if CAGRAD:
            norm = tl.sqrt(tl.reduce(Gw * w, None, _SUM) + inv_t_sq)
            grad = b + phi * Gw / norm
            hess = phi * (Gt / norm - (Gw[:, None] * Gw[None, :]) / (norm * norm * norm))
        else:
            grad = 2 * Gw
            hess = 2 * Gt
        A = t * ((w[:, None] * hess) * w[None, :]) + eye
        centered = grad - tl.reduce(grad * w, None, _SUM)
        ya = tl.where(valid, w * (t * centered) - 1.0, 0.0)
        Y = tl.where(rhs == 0, ya[:, None], w[:, None])

        # Right-looking Cholesky A = LLᵀ with the forward solve L z = [ya, w] folded into the same
        # sweep. Column k of A is overwritten with L[:, k] / L_kk below the diagonal and 1 / L_kk on it,
        # what the back substitution multiplies by. A negative or NaN pivot (a Hessian that rounding
        # made indefinite) turns the step into NaN, which is then replaced by no step.
        for k in range(0, T):
            on = r == k
            at_k = cols == k
            column = tl.reduce(tl.where(at_k, A, 0.0), 1, _SUM)
            pivot = tl.sqrt(tl.reduce(tl.where(on, column, 0.0), None, _SUM))
            # L[i, k] for i > k, and 0 elsewhere: the rank-1 update then leaves rows and columns ≤ k alone.
            l = tl.where(r > k, column, 0.0) / pivot
            l_rows = l[:, None]
            on_rows = on[:, None]
            z_k = (tl.reduce(tl.where(on_rows, Y, 0.0), 0, _SUM) / pivot)[None, :]
            Y = tl.where(on_rows, z_k, Y - l_rows * z_k)
            scaled = tl.where(on, 1.0 / pivot, l / pivot)
            A = tl.where(at_k, scaled[:, None], A - l_rows * l[None, :])
        # Back substitution Lᵀ x = z, last unknown first: x_k = z_k / L_kk − Σ_{i>k} (L_ik / L_kk) x_i.
        # Y holds z in rows ≤ k and −x in rows > k.
        for kk in range(0, T):
            k = T - 1 - kk
            scaled = tl.reduce(tl.where(cols == k, A, 0.0), 1, _SUM)
            x_k = tl.reduce(tl.where(rows >= k, scaled[:, None] * Y, 0.0), 0, _SUM)
            Y = tl.where(rows == k, -x_k[None, :], Y)
        xa = -tl.reduce(tl.where(rhs == 0, Y, 0.0), 1, _SUM)
        xb = -tl.reduce(tl.where(rhs == 1, Y, 0.0), 1, _SUM)

        relative = xa - tl.reduce(w * xa, None, _SUM) / tl.reduce(w * xb, None, _SUM) * xb
        # x − x is 0 exactly when x is finite: nan_to_num(…, 0) without an infinity constant.
        relative = tl.where(valid & (relative - relative == 0), relative, 0.0)
        direction = -w * relative
        # min(1, min_{relative > 0} 0.99/relative): the torch path's clamp of a min over +inf defaults.
        positive = relative > 0
        ratios = tl.full((BT,), SHORTEN, tl.float64) / tl.where(positive, relative, 1.0)
        longest = tl.minimum(tl.min(tl.where(positive, ratios, 1.0)), 1.0)

        # The ladder, every rung at once as a (LADDER, BT) tile: candidates w + s_k·Δw, s_k = 2**-k·longest.
        # G(w + sΔw) = Gw + s·GΔw, so one more product with G serves all rungs. The longest step with
        # a non-positive slope wins; when none has, the final rung (step 0) keeps w.
        rung = tl.arange(0, LADDER)
        ladder = ((1023 - rung).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # exactly 2**-rung
        steps = (ladder * longest)[:, None]
        Gd = tl.reduce(direction[:, None] * Gt, 0, _SUM)
        candidates = w[None, :] + steps * direction[None, :]
        G_cand = Gw[None, :] + steps * Gd[None, :]
        if CAGRAD:
            norms = tl.sqrt(tl.reduce(G_cand * candidates, 1, _SUM) + inv_t_sq)
            grad_c = b[None, :] + phi * G_cand / norms[:, None]
        else:
            grad_c = 2 * G_cand
        centered_c = grad_c - tl.reduce(grad_c * candidates, 1, _SUM)[:, None]
        inside = valid[None, :]
        reciprocal = 1.0 / tl.where(inside, candidates, 1.0)
        slopes = tl.reduce(tl.where(inside, (t * centered_c - reciprocal) * direction[None, :], 0.0), 1, _SUM)
        first = tl.min(tl.where(slopes <= 0, rung, LADDER))
        chosen = tl.reduce(tl.where(rung[:, None] == first, candidates, 0.0), 0, _SUM)
        chosen = tl.where(first < LADDER, chosen, w)
        w = chosen / tl.reduce(chosen, None, _SUM)
        t = tl.minimum(t * GROWTH, tl.full((), T_MAX, tl.float64))
    tl.store(out + r, w, mask=valid)
