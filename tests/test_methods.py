"""Each method against a plain implementation of its paper's algorithm, and its defining properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery.functional as F
from gradsurgery.methods import _supports
from gradsurgery.methods import cagrad as cagrad_module
from gradsurgery.methods._simplex import frank_wolfe_gap
from gradsurgery.methods.pcgrad import pcgrad_coefficients, random_orders

from .helpers import KINDS, make_J
from .reference import cagrad_min_scipy, cagrad_vector, min_norm_scipy, pcgrad_vector

# fp64 Gram-space vs vector-space algebra: the same operations in another order, so a few ulps of
# the largest intermediate (|g|² ~ P) — 1e-9 relative is two orders above what we observe.
FP64_RTOL = 1e-9


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual.double() - expected.double()).abs().max() <= rtol * scale


# ---------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_matches_paper_algorithm_for_two_tasks(kind: str) -> None:
    J = make_J(kind, 2, 37)
    expected = pcgrad_vector(J, [[1], [0]])
    w = pcgrad_coefficients(J @ J.T, torch.tensor([[1], [0]])).sum(0)
    _close(w @ J, expected, FP64_RTOL)
    # The public path's closed form, which draws nothing: there is a single order.
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    _close(F.pcgrad(J, generator=generator), expected, FP64_RTOL)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("kind", KINDS)
def test_pcgrad_matches_paper_algorithm_for_every_order_of_three_tasks(kind: str) -> None:
    J = make_J(kind, 3, 29, seed=3)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    for choice in itertools.product(*[list(itertools.permutations(o)) for o in others]):
        orders = [list(order) for order in choice]
        w = pcgrad_coefficients(J @ J.T, torch.tensor(orders)).sum(0)
        _close(w @ J, pcgrad_vector(J, orders), FP64_RTOL)


@pytest.mark.parametrize("T", [4, 7, 12])
def test_pcgrad_functional_matches_paper_algorithm_with_its_drawn_orders(T: int) -> None:
    J = make_J("conflicting", T, 101, seed=T)
    orders = random_orders(T, generator=torch.Generator().manual_seed(5))
    expected = pcgrad_vector(J, orders.tolist())
    _close(F.pcgrad(J, generator=torch.Generator().manual_seed(5)), expected, FP64_RTOL)


def test_pcgrad_orders_are_permutations_of_the_other_tasks() -> None:
    T = 9
    orders = random_orders(T, generator=torch.Generator().manual_seed(0))
    assert orders.shape == (T, T - 1)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(T) if j != i]


def test_pcgrad_orders_are_uniform() -> None:
    # T = 3: each task has two possible orders, each should appear half the time (binomial, n = 4000:
    # the 6σ band is ±0.047).
    gen = torch.Generator().manual_seed(1)
    firsts = torch.stack([random_orders(3, generator=gen)[:, 0] for _ in range(4000)])
    frequency = (firsts == torch.tensor([1, 0, 0])).double().mean(0)
    assert ((frequency - 0.5).abs() < 0.047).all()


def test_pcgrad_generator_makes_it_reproducible() -> None:
    J = make_J("conflicting", 6, 50)
    a = F.pcgrad(J, generator=torch.Generator().manual_seed(3))
    b = F.pcgrad(J, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    draws = {tuple(F.pcgrad(J, generator=torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1  # the order matters for T = 6 conflicting tasks


@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_pcgrad_leaves_no_conflict_for_two_tasks(seed: int, dtype: torch.dtype) -> None:
    J = make_J("conflicting", 2, 17, dtype=dtype, seed=seed).double()
    C = pcgrad_coefficients(J @ J.T, torch.tensor([[1], [0]]))
    projected = C @ J
    # g_i' ⟂ g_j when they conflicted, so g_i'·g_j ≥ −(rounding of |g|² ~ 1e-15·|g_i||g_j|).
    for i, j in ((0, 1), (1, 0)):
        assert torch.dot(projected[i], J[j]) >= -1e-12 * J[i].norm() * J[j].norm()


def test_pcgrad_zero_gradient_never_divides() -> None:
    J = make_J("conflicting", 4, 20)
    J[1] = 0
    d = F.pcgrad(J, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(d).all()
    J = torch.zeros(3, 5)
    assert torch.equal(F.pcgrad(J), torch.zeros(5))


# ---------------------------------------------------------------- MGDA


def _mgda_alpha(J: torch.Tensor, **kwargs) -> torch.Tensor:
    G = (J @ J.T).double()
    return F.mgda_weights(G, reduction="mean", **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_mgda_two_tasks_is_the_closed_form(kind: str) -> None:
    J = make_J(kind, 2, 31, seed=2)
    alpha = _mgda_alpha(J)
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    norms = ((grid[:, None] * J[0] + (1 - grid[:, None]) * J[1]) ** 2).sum(1)
    best = norms.min()
    ours = ((alpha @ J) ** 2).sum()
    assert ours <= best + 1e-12 * norms.max()
    assert alpha.min() >= 0 and abs(alpha.sum().item() - 1) < 1e-15


@given(
    T=st.integers(3, 24),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_mgda_satisfies_kkt(T: int, kind: str, seed: int, dtype: torch.dtype) -> None:
    J = make_J(kind, T, 41, dtype=dtype, seed=seed)
    G = (J @ J.T).double()
    G = (G + G.T) / 2  # the solver symmetrises a BLAS Gram; check KKT on the matrix it solved
    alpha = F.mgda_weights(G, reduction="mean")
    assert alpha.min() >= 0 and abs(alpha.sum().item() - 1) < 1e-12
    # KKT for min αᵀGα on the simplex ⇔ Frank–Wolfe gap 0; tolerance relative to the largest |g|².
    # An fp32 Gram is itself only accurate to ~√P·6e-8 ≈ 4e-7 relative (it can even be slightly
    # indefinite), so the fp32 bound is 1e-6; the fp64 one is the documented bound of the interior
    # point (T > 10), 1e-7: it reaches ~1e-12 on well-separated gradients but 1.2e-8 on nearly
    # parallel ones (T = 19, "agreeing", seed 20), which make the problem ill-conditioned.
    rtol = 1e-6 if dtype == torch.float32 else 1e-7
    assert frank_wolfe_gap(alpha, 2 * G @ alpha) <= rtol * G.diagonal().max()


@pytest.mark.parametrize("T", [3, 5, 10, 32, 64])
def test_mgda_reaches_the_min_norm_of_scipy(T: int) -> None:
    J = make_J("agreeing" if T > 10 else "conflicting", T, 200, seed=T)
    G = J @ J.T
    alpha = F.mgda_weights(G, reduction="mean")
    ref = min_norm_scipy(G.numpy())
    assert alpha @ G @ alpha <= ref @ G.numpy() @ ref + 1e-9 * G.diagonal().max()


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalized_gradients_choose_alpha_and_raw_gradients_are_combined(normalization: str) -> None:
    J = make_J("conflicting", 4, 60, seed=1) * torch.tensor([1.0, 3.0, 0.2, 5.0], dtype=torch.float64)[:, None]
    losses = torch.tensor([0.5, 2.0, 1.5, 0.7], dtype=torch.float64)
    norms = {"l2": J.norm(dim=1), "loss": losses, "loss+": losses * J.norm(dim=1)}[normalization]
    J_hat = J / norms[:, None]
    alpha = min_norm_scipy((J_hat @ J_hat.T).numpy())
    expected = 4 * torch.as_tensor(alpha) @ J
    d = F.mgda(J, normalization=normalization, losses=losses)
    _close(d, expected, 1e-6)


def test_mgda_zero_normalizer_is_guarded() -> None:
    J = make_J("conflicting", 3, 10)
    J[0] = 0
    for normalization in ("l2", "loss+"):
        assert torch.isfinite(F.mgda(J, normalization=normalization, losses=[1.0, 1.0, 1.0])).all()
    assert torch.isfinite(F.mgda(J, normalization="loss", losses=[0.0, 1.0, 2.0])).all()


# ---------------------------------------------------------------- CAGrad


def _cagrad_dual(G: torch.Tensor, c: float, *, interior: bool = False) -> torch.Tensor:
    """The dual solution w* the library uses (or its interior-point solver's), on the normalised problem."""
    T = G.shape[0]
    Gn = G.double() / G.double().diagonal().max()
    b, phi = Gn.sum(1) / T, c * Gn.sum().sqrt() / T
    if T == 2:
        return cagrad_module._solve_two(Gn, b, phi)
    if interior or T > _supports.MAX_TASKS:
        return cagrad_module._solve(Gn, b, phi, 48)
    return _supports.cagrad_dual(Gn, b, phi)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 2.0])
def test_cagrad_two_tasks_is_exact(kind: str, c: float) -> None:
    J = make_J(kind, 2, 23, seed=4)
    G = J @ J.T
    w = _cagrad_dual(G, c)
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    W = torch.stack((grid, 1 - grid), dim=1)
    values = cagrad_module.cagrad_objective(W, G, c)
    ours = cagrad_module.cagrad_objective(w, G, c)
    assert ours <= values.min() + 1e-12 * G.diagonal().max()


@pytest.mark.parametrize(
    ("T", "interior"),
    [(T, True) for T in (3, 5, 10, 32, 64)] + [(T, False) for T in (3, 5, 10)],  # False: the exact solve
)
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "rank_deficient"])
def test_cagrad_reaches_the_true_minimum(T: int, kind: str, interior: bool) -> None:
    J = make_J(kind, T, 150, seed=T)
    G = J @ J.T
    w = _cagrad_dual(G, 0.4, interior=interior)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-12
    ours = cagrad_module.cagrad_objective(w, G, 0.4).item()
    ref = cagrad_min_scipy(G.numpy(), 0.4)
    assert ours <= ref + 1e-6 * abs(ref)
    # Independent certificate: the Frank–Wolfe gap bounds ours − f* from above.
    Gw = G @ w
    grad = G.sum(1) / T + 0.4 * G.sum().sqrt() / T * Gw / (w @ Gw).sqrt()
    assert frank_wolfe_gap(w, grad) <= 1e-6 * abs(ours)


def test_cagrad_update_is_the_official_formula() -> None:
    J = make_J("conflicting", 5, 80, seed=9)
    G = J @ J.T
    ref_w = None
    from .reference import _best_on_simplex, cagrad_objective_np

    ref_w = _best_on_simplex(lambda x: cagrad_objective_np(x, G.numpy(), 0.4), 5, 4)
    for rescale, divisor in (("1+c^2", 1.16), ("1+c", 1.4), (None, 1.0)):
        expected = cagrad_vector(J, 0.4, ref_w, divisor)
        _close(F.cagrad(J, c=0.4, rescale=rescale), expected, 1e-6)


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_cagrad_with_c_zero_is_naive_summation(T: int) -> None:
    J = make_J("conflicting", T, 30, seed=T)
    assert torch.equal(F.cagrad_weights(J @ J.T, c=0.0), torch.ones(T, dtype=torch.float64))


# ---------------------------------------------------------------- all methods

METHODS = {
    "pcgrad": lambda J, **kw: F.pcgrad(J, generator=torch.Generator().manual_seed(0), **kw),
    "cagrad": F.cagrad,
    "mgda": F.mgda,
}


@pytest.mark.parametrize("method", METHODS)
def test_one_task_is_its_gradient(method: str) -> None:
    J = make_J("conflicting", 1, 13)
    scale = (1 + 0.4) / (1 + 0.4**2) if method == "cagrad" else 1.0  # CAGrad: (g + c·g)/(1 + c²)
    _close(METHODS[method](J), scale * J[0], FP64_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_mean_reduction_divides_by_T(method: str) -> None:
    J = make_J("conflicting", 5, 13)
    _close(METHODS[method](J, reduction="mean"), METHODS[method](J) / 5, FP64_RTOL)


@pytest.mark.parametrize("method", METHODS)
@given(
    T=st.integers(2, 8),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 1000),
    scale=st.sampled_from([1e-8, 1e-3, 7.5, 1e3, 1e8]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_positively_homogeneous(method: str, T: int, kind: str, seed: int, scale: float, dtype: torch.dtype) -> None:
    J = make_J(kind, T, 33, dtype=dtype, seed=seed)
    d = METHODS[method](J)
    d_scaled = METHODS[method](J * scale)
    assert torch.isfinite(d_scaled).all()
    # fp32: the Gram and combine round at ~1e-7 relative, and the solve amplifies it at most by the
    # conditioning of the (nearly) degenerate structures: 1e-3 relative to the update's scale.
    rtol = 1e-3 if dtype == torch.float32 else 1e-7
    tolerance = rtol * J.abs().max().item() * T * scale
    assert (d_scaled.double() - scale * d.double()).abs().max() <= tolerance


@pytest.mark.parametrize("method", ["cagrad", "mgda"])
@given(T=st.integers(2, 9), seed=st.integers(0, 1000), kind=st.sampled_from(["conflicting", "agreeing"]))
def test_weights_permute_with_tasks(method: str, T: int, seed: int, kind: str) -> None:
    J = make_J(kind, T, 27, seed=seed)
    G = J @ J.T
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    weights = F.cagrad_weights if method == "cagrad" else F.mgda_weights
    _close(weights(G[perm][:, perm]), weights(G)[perm], 1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_parallel_gradients_are_not_changed_by_pcgrad_and_kept_in_the_cone(method: str) -> None:
    J = make_J("parallel", 4, 19)
    d = METHODS[method](J)
    direction = J[0] / J[0].norm()
    assert torch.allclose(d - (d @ direction) * direction, torch.zeros_like(d), atol=1e-10)
    assert d @ direction > 0
    if method == "pcgrad":
        _close(d, J.sum(0), FP64_RTOL)


@pytest.mark.parametrize("method", ["pcgrad", "mgda"])
def test_two_exactly_opposite_gradients_cancel(method: str) -> None:
    g = make_J("conflicting", 1, 21)[0]
    J = torch.stack((g, -2 * g))
    assert METHODS[method](J).abs().max() <= 1e-12 * g.abs().max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_and_fp64_agree(method: str, dtype: torch.dtype) -> None:
    J = make_J("agreeing", 6, 257, seed=1)
    # fp32 storage of J and fp32 Gram: ~1e-6 relative, amplified modestly by the solve.
    _close(METHODS[method](J.to(dtype)), METHODS[method](J), 1e-4 if dtype == torch.float32 else 0.0)
