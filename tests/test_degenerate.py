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
