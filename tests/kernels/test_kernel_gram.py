"""The Triton ``gram`` against ``gram_reference``: exact parity on integer data, rounding bounds on random
data, determinism, symmetry, and argument errors.

Without CUDA these run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
Triton is imported); with CUDA they run the compiled kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import gram, gram_reference, triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TASKS = (1, 2, 3, 7, 16, 17, 64, 128)  # below, at and above the 16-row tl.dot tile; up to the largest T
COLUMNS = (1, 100, 1023, 1024, 4097)  # smaller than a block, around a power of two, not a multiple
# 10**6 columns crosses many blocks and every split, but the interpreter needs seconds per case (fp16
# tl.dot is a slow NumPy loop there): one case per dtype and tile width keeps the module under ~90 s.
MILLION = ((7, "fp32"), (64, "fp32"), (3, "fp16"), (17, "bf16"))
U32 = 2.0**-24  # fp32 unit roundoff


def _integer_matrix(T: int, P: int, dtype: torch.dtype, *, seed: int, pad: int = 0) -> torch.Tensor:
    """Entries in {-3, …, 3}: every product and partial sum is an integer below 9·10**6 < 2**24, hence exact
    in fp32 whatever the summation order, so kernel and reference must agree bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randint(-3, 4, (T, P + pad), generator=gen).to(dtype)
    return buf.to(DEVICE)[:, :P]


def _cases() -> list:
    grid = [(T, P, name) for T in TASKS for P in COLUMNS for name in DTYPES]
    grid += [(T, 10**6, name) for T, name in MILLION]
    return [pytest.param(T, P, name, id=f"T{T}-P{P}-{name}") for T, P, name in grid]


@pytest.mark.parametrize(("T", "P", "dtype_name"), _cases())
def test_gram_matches_reference_exactly_on_integers(T: int, P: int, dtype_name: str) -> None:
    J = _integer_matrix(T, P, DTYPES[dtype_name], seed=T * 7919 + P)
    G = gram(J)
    assert G.shape == (T, T) and G.dtype == torch.float32 and G.device == J.device
    assert torch.equal(G, gram_reference(J))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("T", "P"), [(3, 100), (17, 4097), (64, 1023)], ids=lambda v: str(v))
def test_gram_reads_rows_with_padding(T: int, P: int, dtype_name: str) -> None:
    J = _integer_matrix(T, P, DTYPES[dtype_name], seed=P, pad=37)
    assert J.stride(0) == P + 37
    assert torch.equal(gram(J), gram_reference(J))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("T", "P"), [(2, 100), (7, 1023), (17, 4097), (64, 1024)], ids=lambda v: str(v))
def test_gram_rounding_within_fp32_accumulation_bound(T: int, P: int, dtype_name: str) -> None:
    # Any order of summing P rounded products has |error| ≤ γ_P · Σ_k |J_ik J_jk| with γ_P ≈ P·u (Higham,
    # Accuracy and Stability, §3.1/§4.2). 16-bit products are exact in fp32, so the same bound covers
    # them. Tensor cores may truncate instead of round (Fasi et al. 2021), doubling u: hence 2·(P+1)·u32.
    # fp16 accumulation (u = 2**-11) or TF32 inputs (2**-11 per operand) break this for these P.
    gen = torch.Generator().manual_seed(T + P)
    J = torch.randn(T, P, generator=gen).to(DTYPES[dtype_name]).to(DEVICE)
    exact = gram_reference(J.double())
    magnitude = gram_reference(J.double().abs())
    error = (gram(J).double() - exact).abs()
    assert (error <= 2 * (P + 1) * U32 * magnitude).all()


def test_gram_fp32_is_not_tf32() -> None:
    # 1 + 2**-15 needs 16 mantissa bits: TF32 (10 bits) would read it as 1 and return exactly 256.
    J = torch.full((2, 256), 1 + 2.0**-15, device=DEVICE)
    expected = 256 * (1 + 2.0**-14)  # each square rounds to 1 + 2**-14 in fp32; the sums are exact
    assert torch.equal(gram(J), torch.full((2, 2), expected, device=DEVICE))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_gram_is_deterministic_and_symmetric(dtype_name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(17, 50_003, generator=gen).to(DTYPES[dtype_name]).to(DEVICE)
    first, second = gram(J), gram(J)
    assert torch.equal(first, second)
    assert torch.equal(first, first.T)


def test_gram_of_empty_columns_is_zero() -> None:
    assert torch.equal(gram(torch.empty(3, 0, device=DEVICE)), torch.zeros(3, 3, device=DEVICE))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda: torch.ones(5, device=DEVICE), r"\(T, P\) or \(\.\.\., T, P\), got shape \(5,\)", id="rank1"),
        pytest.param(lambda: torch.ones(10, 3, device=DEVICE).T, r"contiguous rows .*\(1, 3\)", id="column-major"),
        pytest.param(lambda: torch.ones(2, 8, dtype=torch.float64, device=DEVICE), "torch backend", id="fp64"),
        pytest.param(lambda: torch.ones(2, 8, dtype=torch.int32, device=DEVICE), "torch.int32", id="int32"),
        pytest.param(lambda: torch.ones(129, 8, device=DEVICE), "T=129", id="T129"),
        pytest.param(lambda: torch.ones(0, 8, device=DEVICE), "T=0", id="T0"),
    ],
)
def test_gram_rejects_bad_input(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gram(make())


def test_gram_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="J must be a torch.Tensor, got list"):
        gram([[1.0, 2.0]])  # type: ignore[arg-type]


def test_gram_rejects_cpu_tensor_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="J is on cpu, where Triton does not run"):
        gram(torch.ones(2, 8))


@pytest.mark.parametrize(("dtype_name", "stages"), [("fp32", {3, 4}), ("bf16", {3}), ("fp16", {3})])
def test_autotuner_times_one_pipeline_depth_for_16_bit_inputs(dtype_name: str, stages: set[int]) -> None:
    # fp32 tiles are software-pipelined (more stages, more shared memory); 16-bit ones are not, and their
    # 3- and 4-stage binaries are identical: only one of them is worth timing.
    from gradsurgery.kernels._gram_triton import _without_unpipelined_stages, tuned_partials_kernel

    configs = tuned_partials_kernel().configs
    kept = _without_unpipelined_stages(configs, {"J": torch.ones(2, 8, dtype=DTYPES[dtype_name])})
    assert {config.num_stages for config in kept} == stages
    assert {config.num_warps for config in kept} == {config.num_warps for config in configs}
