"""What only real hardware can show: autotuning that keeps the bits, no autotuning side effects on
``accumulate``, offsets past 2**31 elements, and run-to-run determinism with real parallelism (the
interpreter runs programs one after another, so it hides races)."""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import combine, combine_reference, gram, gram_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _random(T: int, P: int, dtype: torch.dtype, *, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(T, P, generator=gen, device="cuda").to(dtype)


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("T", [8, 33, 128])
def test_gram_autotune_configs_give_identical_bits(T: int, dtype_name: str) -> None:
    from triton.runtime.errors import OutOfResources

    from gradsurgery.kernels import _gram_triton as kernels
    from gradsurgery.kernels.gram import _multiprocessor_count, gram_plan

    J = _random(T, (1 << 20) + 3, DTYPES[dtype_name], seed=T)
    plan = gram_plan(T, J.shape[1], interpreted=False, max_splits=4 * _multiprocessor_count(J.device.index or 0))
    results = []
    for config in kernels.tuned_partials_kernel().configs:
        partials = torch.empty(plan.num_splits, plan.block_t, plan.block_t, device="cuda")
        try:
            kernels._gram_partials_kernel[(plan.num_splits, 1)](
                J, partials, T, J.shape[1], 0, J.stride(0), plan.cols_per_split,
                BT=plan.block_t, BLOCK_P=plan.block_p, UPCAST=False,
                num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
            )  # fmt: skip
        except OutOfResources:
            continue  # the autotuner skips such a config too
        results.append(partials)
    assert len(results) > 1
    for other in results[1:]:
        assert torch.equal(results[0], other)
    G = gram(J)
    assert torch.equal(G, gram(J))
    assert len(kernels.tuned_partials_kernel().cache) >= 1  # the launcher went through the autotuner


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_combine_autotune_configs_give_identical_bits(dtype_name: str) -> None:
    from gradsurgery.kernels import _combine_triton as kernels

    T, P = 9, (1 << 22) + 5
    J = _random(T, P, DTYPES[dtype_name], seed=1)
    w = torch.randn(T, dtype=torch.float64, device="cuda")
    results = []
    for config in kernels.tuned_combine_kernel().configs:
        out = torch.empty(P, dtype=torch.float32, device="cuda")
        block = config.kwargs["BLOCK_P"]
        kernels._combine_kernel[(-(-P // block), 1)](
            w, J, out, T, P, w.stride(0), J.stride(0), 0, 0, 0, kernels.size_class(P),
            ACCUMULATE=False, BLOCK_P=block, num_warps=config.num_warps, enable_fp_fusion=True,
        )  # fmt: skip
        results.append(out)
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_combine_first_call_accumulates_once_despite_autotuning(dtype_name: str) -> None:
    # Clear the tunings so this call is the one that autotunes: its timing runs must not each add into out.
    from gradsurgery.kernels import _combine_triton as kernels

    kernels.tuned_combine_kernel().cache.clear()
    T, P = 5, 3_000_001
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(2)
    J = torch.randint(-1, 2, (T, P), generator=gen, device="cuda").to(dtype)
    w = torch.randint(-2, 3, (T,), generator=gen, device="cuda").double()
    out = torch.randint(-2, 3, (P,), generator=gen, device="cuda").to(dtype)
    expected = combine_reference(w, J, out.clone(), accumulate=True)
    assert torch.equal(combine(w, J, out, accumulate=True), expected)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_gram_and_combine_are_deterministic_at_scale(dtype_name: str) -> None:
    J = _random(8, 1 << 25, DTYPES[dtype_name], seed=4)
    w = torch.randn(8, dtype=torch.float64, device="cuda")
    first_G = gram(J)
    first_d = combine(w, J, torch.empty(J.shape[1], device="cuda"))
    for _ in range(10):
        assert torch.equal(gram(J), first_G)
        assert torch.equal(combine(w, J, torch.empty(J.shape[1], device="cuda")), first_d)
    # Same bound as the CPU rounding test: 2·(P+1)·u32 relative to |J||J|ᵀ.
    exact = gram_reference(J.double())
    bound = 2 * (J.shape[1] + 1) * 2.0**-24 * gram_reference(J.double().abs())
    assert ((first_G.double() - exact).abs() <= bound).all()


def _sparse_tail(T: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 zeros except small integers in the last 5 columns: exact results that only correct 64-bit
    offsets can produce (an offset wrapped to 32 bits reads zeros or faults)."""
    J = torch.zeros(T, P, dtype=torch.bfloat16, device="cuda")
    tail = torch.arange(1, 5 * T + 1, dtype=torch.float32, device="cuda").view(T, 5) % 7 - 3
    J[:, -5:] = tail.to(torch.bfloat16)
    return J, tail


@pytest.mark.parametrize(("T", "P"), [(2, (1 << 30) + (1 << 20)), (1, (1 << 31) + 1024)], ids=["rows", "columns"])
def test_offsets_beyond_int32(T: int, P: int) -> None:
    # "rows": row 1 ends past element 2**31; "columns": a single row longer than 2**31 (P itself is int64).
    needed = T * P * 2 + P * 4 + (1 << 28)
    if _free_bytes() < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free on the GPU")
    J, tail = _sparse_tail(T, P)
    assert torch.equal(gram(J), tail @ tail.T)
    out = torch.full((P,), 7.0, device="cuda")
    w = torch.arange(1, T + 1, dtype=torch.float64, device="cuda")
    combine(w, J, out)
    assert torch.equal(out[-5:], w.float() @ tail)
    assert int(torch.count_nonzero(out[:-5])) == 0
    del J, out
    torch.cuda.empty_cache()
