"""The Triton ``graddrop`` against ``graddrop_reference``: the same draws (the hash, bit for bit, also past
2^32 columns), the same masked sums bit for bit on odd sizes and every input dtype, leaks, scaling,
non-finite columns, in-place writes, and argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradsurgery.kernels import triton_runs_on
from gradsurgery.kernels.graddrop import (
    graddrop,
    graddrop_reference,
    graddrop_seed,
    graddrop_uniforms,
    graddrop_uniforms_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# 16411 = 2^14 + 27: one full interpreted block and a ragged one; 1 and 100 are below a block.
COLUMNS = (1, 100, 4097, 16411)


def _seed(value: int) -> torch.Tensor:
    return graddrop_seed(torch.Generator(device=DEVICE).manual_seed(value))


def _bits(x: torch.Tensor) -> torch.Tensor:
    # NaN payloads may differ between the two computations; everything else must match bit for bit.
    return x.nan_to_num(nan=7.0, posinf=8.0, neginf=9.0).view(torch.int32)


def _matrix(T: int, P: int, dtype: torch.dtype, *, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=gen)
    # Columns whose entries all share a sign, and exact zeros, next to the random (conflicting) ones.
    J[:, ::7] = J[:, ::7].abs()
    J[:, 3::7] = -J[:, 3::7].abs()
    J[:, 5::11] = 0
    if T > 1:
        J[0, 2::13] = 0
    return J.to(dtype).to(DEVICE)


@pytest.mark.parametrize(("start", "P"), [(0, 5000), (2**31 - 100, 300), (2**32 - 2500, 5000), (3 * 2**40 + 7, 1000)])
@pytest.mark.parametrize("seed", [0, 1, 123456789])
def test_graddrop_draws_match_reference_hash(start: int, P: int, seed: int) -> None:
    s = _seed(seed)
    assert torch.equal(graddrop_uniforms_triton(s, P, start=start), graddrop_uniforms(s, P, start=start))


@pytest.mark.parametrize("leak", [False, True], ids=["pure", "leak"])
@pytest.mark.parametrize("scale", [1.0, 1 / 3], ids=["sum", "scaled"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("P", COLUMNS)
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_graddrop_matches_reference_bit_for_bit(T: int, P: int, dtype_name: str, scale: float, leak: bool) -> None:
    # The same fp32 sums in the same order, the same exact sign test, separately rounded multiplies
    # and adds on both sides: an fp32 out agrees bit for bit.
    J = _matrix(T, P, DTYPES[dtype_name], seed=T * 1000 + P)
    leaks = torch.linspace(0.1, 0.9, T, device=DEVICE) if leak else None
    seed = _seed(P + T)
    expected = graddrop_reference(J, seed, torch.empty(P, device=DEVICE), leak=leaks, scale=scale)
    returned_out = torch.empty(P, device=DEVICE)
    returned = graddrop(J, seed, returned_out, leak=leaks, scale=scale)
    assert returned is returned_out
    assert torch.equal(_bits(returned), _bits(expected))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_graddrop_stores_into_the_input_dtype(dtype_name: str) -> None:
    # fp32 accumulation rounded once into out. fp16 rounds to nearest on both sides; the interpreter
    # truncates fp32 → bf16 (the GPU rounds to nearest), so bf16 is within one bf16 ulp of the reference.
    dtype = DTYPES[dtype_name]
    J = _matrix(3, 4097, dtype, seed=11)
    seed = _seed(4)
    accumulated = graddrop_reference(J, seed, torch.empty(4097, device=DEVICE))
    expected = graddrop_reference(J, seed, torch.empty(4097, dtype=dtype, device=DEVICE))
    assert torch.equal(expected, accumulated.to(dtype))
    got = graddrop(J, seed, torch.empty(4097, dtype=dtype, device=DEVICE))
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        ulp = 2.0**-7 * accumulated.abs()
        assert ((got.float() - accumulated).abs() <= ulp).all()
    else:
        assert torch.equal(got, expected)


def test_graddrop_reads_rows_with_padding() -> None:
    J = _matrix(3, 1000 + 37, torch.float32, seed=2)[:, :1000]
    seed = _seed(9)
    expected = graddrop_reference(J.contiguous(), seed, torch.empty(1000, device=DEVICE))
    assert torch.equal(_bits(graddrop(J, seed, torch.empty(1000, device=DEVICE))), _bits(expected))


def test_graddrop_reports_non_finite_columns() -> None:
    J = _matrix(3, 50, torch.float32, seed=3)
    J[0, 4] = float("nan")
    J[1, 9] = float("inf")
    J[2, 9] = 1.0
    J[:, 12] = float("-inf")
    seed = _seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's NumPy sees inf − inf
        got = graddrop(J, seed, torch.empty(50, device=DEVICE))
    expected = graddrop_reference(J, seed, torch.empty(50, device=DEVICE))
    bad = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    bad[[4, 9, 12]] = True
    assert got[bad].isnan().all() and expected[bad].isnan().all()
    assert torch.equal(got[~bad], expected[~bad]) and torch.isfinite(got[~bad]).all()


def test_graddrop_writes_through_grad_views() -> None:
    flat = torch.zeros(10 + 6, device=DEVICE)
    weight_grad, bias_grad = flat[:10].view(2, 5), flat[10:]
    J = torch.arange(1, 2 * 16 + 1, dtype=torch.float32, device=DEVICE).view(2, 16)  # all positive: kept
    graddrop(J, _seed(0), flat)
    assert torch.equal(weight_grad, (J[0] + J[1])[:10].view(2, 5))
    assert torch.equal(bias_grad, (J[0] + J[1])[10:])


def test_graddrop_is_deterministic() -> None:
    J = _matrix(5, 200_003, torch.bfloat16, seed=5)
    seed = _seed(3)
    first = graddrop(J, seed, torch.empty(200_003, device=DEVICE))
    second = graddrop(J, seed, torch.empty(200_003, device=DEVICE))
    assert torch.equal(first, second)


def test_graddrop_with_empty_columns_returns_out() -> None:
    out = torch.empty(0, device=DEVICE)
    assert graddrop(torch.empty(3, 0, device=DEVICE), _seed(0), out) is out


def _args(**change):
    args = {
        "J": torch.ones(3, 8, device=DEVICE),
        "seed": torch.zeros(1, dtype=torch.int64, device=DEVICE),
        "out": torch.empty(8, device=DEVICE),
        "leak": None,
    }
    args.update({name: make() for name, make in change.items()})
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"seed": lambda: torch.zeros(1, device=DEVICE)}, r"seed must be a \(1,\) int64 tensor", id="seed-float"),
        pytest.param({"seed": lambda: torch.zeros(2, dtype=torch.int64, device=DEVICE)}, r"seed must be .* shape \(2,\)", id="seed-shape"),
        pytest.param({"seed": lambda: torch.zeros((), dtype=torch.int64, device=DEVICE)}, r"seed must be .* shape \(\)", id="seed-0d"),
        pytest.param({"seed": lambda: torch.zeros(1, dtype=torch.int64, device="meta")}, "seed is on meta but J is on", id="seed-device"),
        pytest.param({"leak": lambda: torch.ones(4, device=DEVICE)}, r"leak must be a 1-D tensor of length T=3, got \(4,\)", id="leak-length"),
        pytest.param({"leak": lambda: torch.ones(3, dtype=torch.int64, device=DEVICE)}, "leak must have a floating-point dtype", id="leak-int"),
        pytest.param({"out": lambda: torch.empty(7, device=DEVICE)}, r"out must be a 1-D tensor of length P=8, got \(7,\)", id="out-length"),
        pytest.param({"out": lambda: torch.empty(16, device=DEVICE)[::2]}, r"out must be contiguous", id="out-strided"),
        pytest.param({"out": lambda: torch.empty(8, dtype=torch.float64, device=DEVICE)}, "out has dtype torch.float64.*torch backend", id="out-fp64"),
        pytest.param({"J": lambda: torch.ones(3, 8, dtype=torch.float64, device=DEVICE)}, "J has dtype torch.float64.*torch backend", id="J-fp64"),
        pytest.param({"J": lambda: torch.ones(8, 3, device=DEVICE).T}, r"J must have contiguous rows", id="J-column-major"),
        pytest.param({"J": lambda: torch.ones(0, 8, device=DEVICE)}, "T = 0 tasks", id="J-no-rows"),
    ],
)
def test_graddrop_rejects_bad_input(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        graddrop(**_args(**change))


def test_graddrop_rejects_out_overlapping_J() -> None:
    J = torch.ones(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out must not share memory with J"):
        graddrop(J, torch.zeros(1, dtype=torch.int64, device=DEVICE), J[1])
