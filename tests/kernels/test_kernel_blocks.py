"""Per-block Gram matrices and combines (``granularity=`` in the wrappers): Triton (under the interpreter
here) against the references, exactly on integer data, and the blocks adding up to the whole."""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import triton_runs_on
from gradsurgery.kernels.blocks import (
    block_plan,
    combine_blocks,
    combine_blocks_reference,
    gram_blocks,
    gram_blocks_reference,
    tile_plan,
)
from gradsurgery.kernels.gram import gram_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")

P = 70_001  # more columns than one split, not a multiple of any tile
BLOCKS = [
    [(0, 100), (40_000, 70_001)],  # a block of two spans, one longer than a split
    [(100, 101)],  # one column
    [(101, 40_000)],
    [],  # an empty block (a parameter no task reached would still be one)
]


def _integers(T: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(T)
    return torch.randint(-3, 4, (T, P), generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_grams_match_the_reference_and_add_up_to_the_gram(T: int, dtype: torch.dtype) -> None:
    J = _integers(T, dtype)
    G = gram_blocks(J, block_plan(BLOCKS, DEVICE))
    reference = gram_blocks_reference(J, BLOCKS)
    assert G.shape == (len(BLOCKS), T, T)
    assert torch.equal(G, reference)  # integers below 2**24: every order gives the same sum
    assert torch.equal(G.sum(0), gram_reference(J))
    assert torch.equal(G, G.mT)
    assert torch.equal(G, gram_blocks(J, block_plan(BLOCKS, DEVICE)))


@pytest.mark.parametrize("lo, hi", [(0, P), (90, 45_000)], ids=["all", "a-range"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_block_combine_matches_the_reference(lo: int, hi: int, accumulate: bool) -> None:
    T = 5
    J = _integers(T, torch.float32)[:, lo:hi]
    W = torch.randint(-2, 3, (len(BLOCKS), T), generator=torch.Generator().manual_seed(1)).to(torch.float64).to(DEVICE)
    start = torch.randint(-2, 3, (hi - lo,), generator=torch.Generator().manual_seed(2)).float().to(DEVICE)
    plan = tile_plan(BLOCKS, lo, hi, DEVICE, interpreted=DEVICE.type == "cpu")
    out = combine_blocks(W, J, start.clone(), plan, accumulate=accumulate)
    expected = combine_blocks_reference(W, J, start.clone(), BLOCKS, lo=lo, accumulate=accumulate)
    assert torch.equal(out, expected)
