"""A batch of independent matrices ``(..., T, P)`` through ``gram`` and ``combine``, Triton (under the
interpreter here) and the references: one launch or call, each entry's bits those of the unbatched
call on it."""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import combine, combine_reference, gram, gram_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = [(), (1,), (3,), (2, 2), (0,)]


def _batch(shape: tuple[int, ...], T: int, P: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(shape) * 100 + T)
    return torch.randn(*shape, T, P, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", BATCHES, ids=str)
@pytest.mark.parametrize("T", [3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn", [gram, gram_reference], ids=["triton", "torch"])
def test_gram_of_a_batch_is_the_gram_of_each_entry(fn, shape: tuple[int, ...], T: int, dtype: torch.dtype) -> None:
    J = _batch(shape, T, 1500, dtype)
    G = fn(J)
    assert G.shape == (*shape, T, T)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist() if shape else [[]]:
        assert torch.equal(G[tuple(index)], fn(J[tuple(index)].contiguous())), index


@pytest.mark.parametrize("shape", BATCHES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn", [combine, combine_reference], ids=["triton", "torch"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_of_a_batch_is_the_combine_of_each_entry(fn, shape: tuple[int, ...], dtype: torch.dtype, accumulate: bool) -> None:
    T, P = 5, 1300
    J = _batch(shape, T, P, dtype)
    w = torch.randn(*shape, T, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    start = torch.randn(*shape, P, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    out = fn(w, J, start.clone(), accumulate=accumulate)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist() if shape else [[]]:
        i = tuple(index)
        single = fn(w[i].contiguous(), J[i].contiguous(), start[i].clone(), accumulate=accumulate)
        if fn is combine:  # one program per entry and column block: the unbatched kernel's bits
            assert torch.equal(out[i], single), index
        else:  # BLAS sums a batched product in another order than a matrix-vector product: fp32 rounding
            bound = (T + 2) * 2.0**-24 * ((w[i].abs().float() @ J[i].abs().float()) + start[i].abs().float())
            assert ((out[i].float() - single.float()).abs() <= bound + (2.0**-8 if dtype == torch.bfloat16 else 0) * single.abs().float()).all(), index


def test_mismatched_batch_shapes_are_refused() -> None:
    J = _batch((2,), 3, 10, torch.float32)
    with pytest.raises(ValueError, match=r"w must be of shape \(2, 3\)"):
        combine_reference(torch.ones(3, 3, device=DEVICE), J, torch.empty(2, 10, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be of shape \(2, 10\)"):
        combine_reference(torch.ones(2, 3, device=DEVICE), J, torch.empty(10, device=DEVICE))
