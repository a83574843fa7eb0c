"""Degenerate inputs give finite, documented results."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
import gradsurgery.functional as F

from .helpers import make_J

METHODS = {
    "pcgrad": lambda J: F.pcgrad(J, generator=torch.Generator().manual_seed(0)),
    "cagrad": F.cagrad,
    "mgda": F.mgda,
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15, 1e30])
def test_extreme_magnitudes_in_fp32_keep_the_update(method: str, scale: float) -> None:
    # Squares of 1e±30 leave the fp32 range: the Gram is recomputed with the rows scaled first.
    J = make_J("conflicting", 5, 300, dtype=torch.float32, seed=2)
    d = METHODS[method](J * scale)
    assert torch.isfinite(d).all()
    reference = METHODS[method](J.double()) * scale
    assert ((d.double() - reference).abs().max() / reference.abs().max()).item() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_gradients_give_a_zero_update(method: str) -> None:
    assert torch.equal(METHODS[method](torch.zeros(4, 17)), torch.zeros(17))


@pytest.mark.parametrize("method", METHODS)
def test_identical_gradients_give_a_multiple_of_the_gradient(method: str) -> None:
    g = torch.randn(23, dtype=torch.float64)
    d = METHODS[method](g.repeat(4, 1))
    expected = {"pcgrad": 4.0, "mgda": 4.0, "cagrad": 4 * (1 + 0.4) / (1 + 0.4**2)}[method]
    torch.testing.assert_close(d, expected * g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("T", [1, 2, 3, 64])
@pytest.mark.parametrize("kind", ["zero_row", "rank_deficient", "antiparallel", "parallel"])
def test_degenerate_structures_are_finite(method: str, T: int, kind: str) -> None:
    J = make_J(kind, T, 50, dtype=torch.float32, seed=T)
    assert torch.isfinite(METHODS[method](J)).all()


def test_exactly_opposite_gradients() -> None:
    g = torch.randn(19, dtype=torch.float64)
    J = torch.stack((g, -g))
    # PCGrad projects each onto the other's normal: both vanish. MGDA: the min-norm point is 0.
    assert F.pcgrad(J).abs().max() < 1e-12
    assert F.mgda(J).abs().max() < 1e-12
    # CAGrad: g0 = 0, so φ = 0 and the update is g0 = 0.
    assert F.cagrad(J).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_wrapper_with_huge_and_tiny_fp32_gradients(name: str) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40))
    targets = torch.randn(3, 40)
    make = {"PCGrad": lambda o: gs.PCGrad(o, seed=0), "CAGrad": gs.CAGrad, "MGDA": gs.MGDA}[name]
    for scale in (1e-30, 1e30):
        opt = make(torch.optim.SGD([w], lr=0.0))
        opt.backward([((w - t) * scale).sum() * (1 + k) for k, t in enumerate(targets)])
        assert torch.isfinite(w.grad).all() and torch.isfinite(opt.last_weights).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scales", [(1e-20, 1e20), (1e-30, 1e30), (1.0, 1e25), (1e-25, 1e5), (1e-30, 1.0)])
@pytest.mark.parametrize("seed", range(3))
def test_rows_whose_scales_differ_by_1e20_or_more(method: str, scales: tuple[float, float], seed: int) -> None:
    """fp32 rows from 1e-30 to 1e30: the update is finite and equals the fp64 one to 1e-3 (per entry,
    relative to the update's largest entry: entries that cancel to rounding have no relative digits)."""
    J = make_J("conflicting", 3, 50, seed=seed)
    J[0] *= scales[0]
    J[1] *= scales[1]
    reference = METHODS[method](J)
    d = METHODS[method](J.float()).double()
    assert torch.isfinite(d).all()
    assert ((d - reference).abs().max() / reference.abs().max()).item() < 1e-3


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_wrapper_rows_whose_scales_differ_by_1e40(name: str) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40))
    targets = torch.randn(3, 40)
    make = {"PCGrad": lambda o: gs.PCGrad(o, seed=0), "CAGrad": gs.CAGrad, "MGDA": gs.MGDA}[name]
    opt = make(torch.optim.SGD([w], lr=0.0))
    losses = [((w - t) ** 2).sum() * s for t, s in zip(targets, (1e-20, 1e20, 1.0))]
    J = torch.stack([torch.autograd.grad(loss, w, retain_graph=True)[0].double() for loss in losses])
    opt.backward(losses)
    weights = {
        "PCGrad": lambda G: F.pcgrad_weights(G, generator=torch.Generator().manual_seed(0)),
        "CAGrad": F.cagrad_weights,
        "MGDA": F.mgda_weights,
    }[name]
    reference = weights(J @ J.T) @ J
    assert torch.isfinite(w.grad).all()
    assert ((w.grad.double() - reference).abs().max() / reference.abs().max()).item() < 1e-3


@pytest.mark.parametrize("row", [0, 1, 2])
def test_the_functional_error_names_exactly_the_nonfinite_task(row: int) -> None:
    J = make_J("conflicting", 3, 20)
    J[row, 5] = float("nan")
    with pytest.raises(gs.NonFiniteGradientError) as error:
        F.mgda(J)
    assert error.value.tasks == [row]
    G = make_J("conflicting", 3, 20)
    G = G @ G.T
    G[0, 2] = G[2, 0] = float("inf")  # a Gram given directly, non-finite off the diagonal only
    with pytest.raises(gs.NonFiniteGradientError) as error:
        F.mgda_weights(G)
    assert error.value.tasks == [0, 2]
