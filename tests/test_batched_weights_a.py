"""Batched weights for PCGrad, GradVac, RLW, IMTL-G, Aligned-MTL and ConFIG: ``G`` of shape ``(..., T, T)``
gives ``w`` of shape ``(..., T)``, each entry bit-identical to the unbatched call on that entry (on the
CPU), with no host read; the random methods draw a whole batch from the generator in one call, by the
rule their docstrings state, so the same generator state gives the same weights."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import pytest
import torch

from gradsurgery.methods._common import check_gram, normalized, to_reduction
from gradsurgery.methods.aligned_mtl import SCALE_MODES, aligned_mtl_weights, balance_transformation
from gradsurgery.methods.config import LENGTHS, config_weights
from gradsurgery.methods.gradvac import gradvac_weights
from gradsurgery.methods.imtl_g import imtl_g_weights
from gradsurgery.methods.pcgrad import pcgrad_weights, random_orders
from gradsurgery.methods.rlw import rlw_weights

from .helpers import KINDS, make_J
from .test_no_sync import ForbidHostReads

BATCHES = [(), (1,), (5,), (2, 3), (0,)]
TS = [1, 2, 3, 8, 12]
SEED = 7

# weights(G, generator) -> w; the random ones draw from the generator, the others ignore it.
Weights = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
METHODS: dict[str, Weights] = {
    "pcgrad": lambda G, gen: pcgrad_weights(G, generator=gen),
    "pcgrad-mean": lambda G, gen: pcgrad_weights(G, generator=gen, reduction="mean"),
    "gradvac": lambda G, gen: gradvac_weights(G, generator=gen)[0],
    "imtl_g": lambda G, gen: imtl_g_weights(G),
    **{f"aligned_mtl-{m}": (lambda m: lambda G, gen: aligned_mtl_weights(G, scale_mode=m))(m) for m in SCALE_MODES},
    **{f"config-{n}": (lambda n: lambda G, gen: config_weights(G, length=n))(n) for n in LENGTHS},
}


def batch_of_grams(batch: tuple[int, ...], T: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(*batch, T, T)`` Gram matrices of mixed structures (every kind of ``make_J``, degenerate ones
    included, and fewer parameters than tasks in every other entry)."""
    count = math.prod(batch)
    grams = [
        (lambda J: J @ J.T)(make_J(KINDS[(b + T) % len(KINDS)], T, (5, 17)[b % 2], dtype=dtype, seed=b))
        for b in range(count)
    ]
    stacked = torch.stack(grams) if grams else torch.zeros(0, T, T, dtype=dtype)
    return stacked.reshape(*batch, T, T)


def unbatched(weights: Weights, G: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One unbatched call per entry, in the batch's row-major order, from the same generator."""
    T = G.shape[-1]
    rows = [weights(entry, generator) for entry in G.reshape(-1, T, T)]
    stacked = torch.stack(rows) if rows else torch.zeros(0, T, dtype=torch.float64)
    return stacked.reshape(*G.shape[:-1])


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float64
    assert torch.equal(actual.nan_to_num(7.0), expected.nan_to_num(7.0)), (actual - expected).abs().max()


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_weights_equal_the_unbatched_calls_entry_by_entry(method: str, batch: tuple[int, ...], T: int) -> None:
    # On the CPU the random methods' one draw for the batch is what B consecutive unbatched calls draw:
    # the weights and the generator's final state are those of the loop.
    weights = METHODS[method]
    G = batch_of_grams(batch, T)
    generator = torch.Generator().manual_seed(SEED)
    w = weights(G, generator)
    loop = torch.Generator().manual_seed(SEED)
    assert_identical(w, unbatched(weights, G, loop))
    assert torch.equal(generator.get_state(), loop.get_state())


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "imtl_g", "aligned_mtl-median", "config-projection"])
def test_batched_weights_of_fp32_grams_equal_the_unbatched_calls(method: str) -> None:
    weights = METHODS[method]
    for T in (3, 8):
        G = batch_of_grams((2, 3), T, dtype=torch.float32)
        w = weights(G, torch.Generator().manual_seed(SEED))
        assert_identical(w, unbatched(weights, G, torch.Generator().manual_seed(SEED)))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("target_update", ["always", "on_correction"])
def test_batched_gradvac_state_equals_the_unbatched_calls(target_update: str, batch: tuple[int, ...], T: int) -> None:
    G = batch_of_grams(batch, T)
    targets = torch.rand(*batch, T, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    options = {"beta": 0.3, "target_update": target_update}
    w, new = gradvac_weights(G, targets=targets, generator=torch.Generator().manual_seed(SEED), **options)
    assert new.shape == (*batch, T, T) and new.dtype == torch.float64
    loop = torch.Generator().manual_seed(SEED)
    for index in itertools.product(*map(range, batch)):  # row-major order
        w_b, new_b = gradvac_weights(G[index], targets=targets[index], generator=loop, **options)
        assert_identical(w[index], w_b)
        assert_identical(new[index], new_b)


def test_batched_gradvac_broadcasts_one_set_of_targets() -> None:
    G = batch_of_grams((2, 3), 4)
    targets = torch.rand(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    w, new = gradvac_weights(G, targets=targets, generator=torch.Generator().manual_seed(SEED))
    w_full, new_full = gradvac_weights(G, targets=targets.expand(2, 3, 4, 4), generator=torch.Generator().manual_seed(SEED))
    assert_identical(w, w_full)
    assert_identical(new, new_full)
    assert new.shape == (2, 3, 4, 4)


def test_batched_gradvac_refuses_targets_of_another_batch() -> None:
    G = batch_of_grams((2, 3), 4)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3, 4, 4\)"):
        gradvac_weights(G, targets=torch.zeros(3, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"targets must have shape \(4, 4\)"):
        gradvac_weights(G[0, 0], targets=torch.zeros(1, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_batched_rlw_draws_the_whole_batch_in_one_call(batch: tuple[int, ...], T: int) -> None:
    # The documented rule: z = torch.randn((*batch, T)) in one call, w = T·softmax(z) per entry.
    G = batch_of_grams(batch, T)
    generator = torch.Generator().manual_seed(SEED)
    w = rlw_weights(G, generator=generator)
    source = torch.Generator().manual_seed(SEED)
    z = torch.randn(*batch, T, generator=source, dtype=torch.float64)
    rows = [torch.softmax(entry, dim=0) for entry in z.reshape(-1, T)]
    softmax = (torch.stack(rows) if rows else torch.zeros(0, T, dtype=torch.float64)).reshape(*batch, T)
    assert_identical(w, softmax * T)
    assert torch.equal(generator.get_state(), source.get_state())
    assert_identical(rlw_weights(G, generator=torch.Generator().manual_seed(SEED), reduction="mean"), softmax)
    if math.prod(batch) == 1:  # one entry draws what the unbatched call draws
        assert_identical(w.reshape(T), rlw_weights(G.reshape(T, T), generator=torch.Generator().manual_seed(SEED)))


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "rlw"])
def test_batched_random_weights_are_reproducible_from_the_generator_state(method: str) -> None:
    weights = METHODS.get(method, lambda G, gen: rlw_weights(G, generator=gen))
    G = batch_of_grams((2, 3), 8)
    generator = torch.Generator().manual_seed(SEED)
    torch.rand(5, generator=generator)  # some state other than a fresh seed
    state = generator.get_state()
    first, second = weights(G, generator), weights(G, generator)
    generator.set_state(state)
    assert_identical(weights(G, generator), first)
    assert not torch.equal(first, second)  # the next call draws afresh
    # Entries of the same batch draw independently: equal G's in one batch get different orders.
    J = make_J("conflicting", 8, 17)
    same = (J @ J.T).expand(6, 8, 8)
    w = weights(same, torch.Generator().manual_seed(SEED))
    assert len({tuple(row.tolist()) for row in w}) > 1


def test_batched_pcgrad_orders_are_permutations_of_the_other_tasks() -> None:
    T = 6
    orders = random_orders(T, generator=torch.Generator().manual_seed(0), batch=(4, 3))
    assert orders.shape == (4, 3, T, T - 1) and orders.dtype == torch.int64
    others = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, T)]) for i in range(T)])
    assert torch.equal(orders.sort(dim=-1).values, others.expand(4, 3, T, T - 1))


def test_batched_pcgrad_does_not_use_the_fused_solve() -> None:
    # The fused kernel solves one (T, T) problem: a batch runs on the torch path.
    def solve(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the fused solve was called on a batch")

    G = batch_of_grams((2,), 5)
    w = pcgrad_weights(G, generator=torch.Generator().manual_seed(SEED), solve=solve)
    assert_identical(w, pcgrad_weights(G, generator=torch.Generator().manual_seed(SEED)))


def test_batched_non_finite_entry_leaves_the_others_alone() -> None:
    G = batch_of_grams((4,), 5)
    G[2, 1, 3] = float("nan")
    for name in ("gradvac", "imtl_g", "aligned_mtl-min", "config-projection"):
        w = METHODS[name](G, torch.Generator().manual_seed(SEED))
        assert torch.isnan(w[2]).all(), name
        assert torch.isfinite(w[[0, 1, 3]]).all(), name
    targets = torch.full((4, 5, 5), 0.25, dtype=torch.float64)
    _, new = gradvac_weights(G, targets=targets, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(new[2], targets[2]) and not torch.equal(new[0], targets[0])


@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("method", list(METHODS) + ["rlw", "gradvac-state", "balance_transformation"])
def test_batched_weights_do_not_read_values_back(method: str, T: int) -> None:
    G = batch_of_grams((2, 3), T)
    targets = torch.zeros(2, 3, T, T, dtype=torch.float64)
    generator = torch.Generator().manual_seed(SEED)
    with ForbidHostReads():
        if method == "rlw":
            rlw_weights(G, generator=generator)
        elif method == "gradvac-state":
            gradvac_weights(G, targets=targets, generator=generator)
        elif method == "balance_transformation":
            balance_transformation(G)
        else:
            METHODS[method](G, generator)


def test_batched_balance_transformation_matches_the_unbatched_calls() -> None:
    # A matrix product (batched BLAS): to rounding, not bit for bit.
    G = batch_of_grams((2, 3), 8)
    B = balance_transformation(G, scale_mode="rmse")
    entries = [balance_transformation(entry, scale_mode="rmse") for entry in G.reshape(-1, 8, 8)]
    expected = torch.stack(entries).reshape(2, 3, 8, 8)
    torch.testing.assert_close(B, expected, rtol=1e-12, atol=1e-12)
    assert balance_transformation(G[:0]).shape == (0, 3, 8, 8)


def test_common_helpers_are_batch_aware() -> None:
    G = batch_of_grams((2, 3), 4) * torch.arange(1, 7, dtype=torch.float64).reshape(2, 3, 1, 1)
    G[1, 2] = 0  # not rescaled
    n = normalized(G)
    for index in ((0, 0), (0, 2), (1, 1), (1, 2)):
        assert torch.equal(n[index], normalized(G[index]))
    assert torch.equal(n[1, 2], torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(to_reduction(torch.full((2, 3), 6.0), "mean"), torch.full((2, 3), 2.0))
    check_gram(torch.zeros(0, 3, 3))
    for bad in (torch.zeros(3), torch.zeros(2, 3, 4), torch.zeros(2, 0, 0)):
        with pytest.raises(ValueError):
            check_gram(bad)
