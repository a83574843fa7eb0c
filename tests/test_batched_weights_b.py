"""Batched weights, ``G (..., T, T) → w (..., T)``, for CAGrad, MGDA, UPGrad, DualProj, Nash-MTL and FairGrad:
one computation for the whole batch, each entry what the unbatched call gives it.

Bit for bit (``torch.equal``) for every method but FairGrad, whose powers ``x^p`` torch rounds differently
in its vectorised and scalar kernels (which one an element meets depends on where it falls in the
batch): there, to 1e-12. The entries mix the structures of ``make_J`` (degenerate ones included, whose
minimisers are not unique, so that only the same arithmetic gives the same weights), the gradients'
scales (each entry is normalised by its own) and ``T`` from 1 to 12 (the exact small-``T`` solves and,
at 12, the interior points with their exact finish).
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from gradsurgery.methods.cagrad import cagrad_weights
from gradsurgery.methods.dualproj import dualproj_weights
from gradsurgery.methods.fairgrad import fairgrad_weights
from gradsurgery.methods.mgda import mgda_weights
from gradsurgery.methods.nash_mtl import nash_mtl_weights
from gradsurgery.methods.upgrad import upgrad_weights

from .helpers import KINDS, make_J
from .test_no_sync import ForbidHostReads

Weights = Callable[[torch.Tensor], torch.Tensor]

METHODS: dict[str, Weights] = {
    "cagrad": cagrad_weights,
    "cagrad-c2": lambda G: cagrad_weights(G, c=2.0, rescale=None),  # often the degenerate projection
    "cagrad-fp32": lambda G: cagrad_weights(G.float()),  # the switch reads G's dtype
    "mgda": mgda_weights,
    "mgda-l2": lambda G: mgda_weights(G, normalization="l2", reduction="mean"),
    "upgrad": upgrad_weights,
    "upgrad-pref": lambda G: upgrad_weights(G, pref_vector=_preference(G.shape[-1])),
    "dualproj": dualproj_weights,
    "nash_mtl": nash_mtl_weights,
    "nash_mtl-clipped": lambda G: nash_mtl_weights(G, max_norm=1.0),
    "fairgrad": fairgrad_weights,
    "fairgrad-official": lambda G: fairgrad_weights(G, alpha=0.5, scale="official", max_norm=1.0),
}
ROUNDED = {"fairgrad", "fairgrad-official"}  # to 1e-12; every other method bit for bit
SHAPES = [(), (1,), (5,), (2, 3), (0,)]
SIZES = [1, 2, 3, 8, 12]


def _preference(T: int) -> torch.Tensor:
    return torch.arange(1, T + 1, dtype=torch.float64) / T


def _grams(shape: tuple[int, ...], T: int, *, seed: int = 0) -> torch.Tensor:
    """``(*shape, T, T)`` Gram matrices, the entries of mixed structures, ranks and scales."""
    count = math.prod(shape)
    grams = []
    for k in range(count):
        kind = KINDS[(k + seed) % len(KINDS)]
        P = T + 3 if k % 3 else max(1, T // 2)  # every third entry has fewer directions than tasks
        J = make_J(kind, T, P, seed=100 * seed + k) * 10.0 ** (k % 5 - 2)
        grams.append(J @ J.T)
    if not grams:
        return torch.empty(*shape, T, T, dtype=torch.float64)
    return torch.stack(grams).reshape(*shape, T, T)


def _assert_entries(name: str, w: torch.Tensor, G: torch.Tensor, weights: Weights) -> None:
    """Each entry of ``w`` is ``weights`` of the same entry of ``G`` alone."""
    T = G.shape[-1]
    assert w.shape == (*G.shape[:-2], T) and w.dtype == torch.float64
    for g, row in zip(G.reshape(-1, T, T), w.reshape(-1, T)):
        expected = weights(g)
        if name in ROUNDED:
            torch.testing.assert_close(row, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        else:
            assert torch.equal(row.isnan(), expected.isnan())
            assert torch.equal(row.nan_to_num(0.0), expected.nan_to_num(0.0)), (row - expected).abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)) or "plain")
@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("name", METHODS)
def test_each_entry_equals_the_unbatched_call(name: str, T: int, shape: tuple[int, ...]) -> None:
    G = _grams(shape, T, seed=T)
    weights = METHODS[name]
    _assert_entries(name, weights(G), G, weights)


@pytest.mark.parametrize("name", METHODS)
def test_a_batch_of_one_is_the_plain_call(name: str) -> None:
    G = _grams((), 12, seed=1)
    weights = METHODS[name]
    assert torch.equal(weights(G[None])[0], weights(G))


@pytest.mark.parametrize("T", [3, 12])
@pytest.mark.parametrize("name", METHODS)
def test_a_non_finite_entry_leaves_the_others_alone(name: str, T: int) -> None:
    G = _grams((4,), T, seed=2)
    G[1, 0, T - 1] = G[1, T - 1, 0] = float("nan")
    G[2, 0, 0] = float("inf")
    weights = METHODS[name]
    w = weights(G)
    _assert_entries(name, w, G, weights)
    assert w[[0, 3]].isfinite().all()


@pytest.mark.parametrize("T", [3, 12])
@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_mgda_losses_follow_the_batch(normalization: str, T: int) -> None:
    G = _grams((2, 3), T, seed=3)
    losses = torch.rand(2, 3, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64) + 0.1
    losses[0, 1, 0] = 0.0  # a zero loss is guarded (normaliser 1), in its own entry only
    w = mgda_weights(G, normalization=normalization, losses=losses)
    for index in [(i, j) for i in range(2) for j in range(3)]:
        assert torch.equal(w[index], mgda_weights(G[index], normalization=normalization, losses=losses[index]))
    # One (T,) vector of losses is every entry's.
    shared = mgda_weights(G, normalization=normalization, losses=losses[1, 2])
    assert torch.equal(shared[0, 0], mgda_weights(G[0, 0], normalization=normalization, losses=losses[1, 2]))


def test_mgda_losses_of_another_shape_are_refused() -> None:
    G = _grams((5,), 4)
    with pytest.raises(ValueError, match=r"losses has shape \(3, 4\); for G of shape \(5, 4, 4\)"):
        mgda_weights(G, normalization="loss", losses=torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs the loss values"):
        mgda_weights(G, normalization="loss+")


def _refuse(*args: object) -> torch.Tensor:
    raise AssertionError("the fused solve was called")


@pytest.mark.parametrize("T", [3, 12])
def test_a_fused_solve_is_left_out_for_a_batch(T: int) -> None:
    # The fused kernels take one (T, T) problem: a batch runs the torch solvers instead.
    G = _grams((2,), T, seed=4)
    for weights in (mgda_weights, cagrad_weights):
        w = weights(G, solve=_refuse)
        for g, row in zip(G, w):
            assert torch.equal(row, weights(g))
        with pytest.raises(AssertionError, match="fused solve was called"):
            weights(G[0], solve=_refuse)  # the plain call does use it


@pytest.mark.parametrize("weights", [upgrad_weights, dualproj_weights], ids=["upgrad", "dualproj"])
def test_a_preference_is_one_vector_for_the_batch(weights: Callable[..., torch.Tensor]) -> None:
    T = 5
    G = _grams((3,), T, seed=5)
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(5,\) for T=5 tasks, got shape \(3, 5\)"):
        weights(G, pref_vector=torch.ones(3, T))
    # A negative entry makes every entry's weights NaN, without a host read (as unbatched).
    bad = _preference(T)
    bad[2] = -1.0
    assert weights(G, pref_vector=bad).isnan().all()


@pytest.mark.parametrize("T", [3, 12])
@pytest.mark.parametrize("name", METHODS)
def test_batched_weights_do_not_read_values_back(name: str, T: int) -> None:
    G = _grams((2, 3), T, seed=6)
    preference = _preference(T)  # built outside the spy: a tensor from Python data is a host copy
    weights = METHODS[name] if name != "upgrad-pref" else lambda G: upgrad_weights(G, pref_vector=preference)
    losses = torch.ones(2, 3, T, dtype=torch.float64)
    with ForbidHostReads():
        weights(G)
        if name == "mgda":
            mgda_weights(G, normalization="loss+", losses=losses, max_iter=5)
