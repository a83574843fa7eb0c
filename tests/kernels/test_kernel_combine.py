"""The Triton ``combine`` against ``combine_reference``: exact parity on integer data, rounding bounds on
random data, accumulation, mixed dtypes, in-place writes through views, and argument errors."""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import combine, combine_reference, triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
TRITON_DTYPES = ("fp32", "fp16", "bf16")
TASKS = (1, 2, 3, 7, 16, 17, 64, 128)
COLUMNS = (1, 100, 1023, 1024, 4097)
# The interpreter walks T rows of 10**6 columns in NumPy (bf16 slowest: it converts bit patterns),
# so a few cases cover the large-P path.
MILLION = ((7, "fp32", True), (64, "fp16", False), (3, "bf16", True))
U32 = 2.0**-24
# Rounding of the final store into out. fp32/fp16 round to nearest (half an ulp: the unit roundoff).
# bf16 gets a full ulp because Triton's interpreter truncates fp32 → bf16 (the GPU rounds to nearest).
# The second number is the absolute error of rounding into fp16's subnormal range (half its spacing).
STORE_ROUNDING = {"fp32": (2.0**-24, 0.0), "fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-7, 0.0)}


def _integers(shape: tuple[int, ...], low: int, high: int, *, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, shape, generator=gen).double()


def _cases() -> list:
    grid = [(T, P, name, acc) for T in TASKS for P in COLUMNS for name in TRITON_DTYPES for acc in (False, True)]
    grid += [(T, 10**6, name, acc) for T, name, acc in MILLION]
    return [
        pytest.param(T, P, name, acc, id=f"T{T}-P{P}-{name}{'-accumulate' if acc else ''}")
        for T, P, name, acc in grid
    ]


@pytest.mark.parametrize(("T", "P", "dtype_name", "accumulate"), _cases())
def test_combine_matches_reference_exactly_on_integers(T: int, P: int, dtype_name: str, accumulate: bool) -> None:
    # w ∈ {-w_max..w_max}, J ∈ {-1, 0, 1}, out ∈ {-2..2}: every partial sum is an integer of magnitude
    # ≤ w_max·T + 2 ≤ 130, exact in fp32 and in bf16 (integers ≤ 256), so the results agree bit for bit
    # (and rounding-mode differences on the store cannot show).
    dtype = DTYPES[dtype_name]
    seed = T * 7919 + P
    w_max = 2 if T <= 64 else 1
    w = _integers((T,), -w_max, w_max, seed=seed).to(DEVICE)  # fp64 weights, as the methods produce them
    J = _integers((T, P), -1, 1, seed=seed + 1).to(dtype).to(DEVICE)
    out = _integers((P,), -2, 2, seed=seed + 2).to(dtype).to(DEVICE)
    expected = combine_reference(w, J, out.clone(), accumulate=accumulate)
    returned = combine(w, J, out, accumulate=accumulate)
    assert returned is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype_name", TRITON_DTYPES)
@pytest.mark.parametrize(("T", "P"), [(3, 100), (17, 4097)], ids=lambda v: str(v))
def test_combine_reads_rows_with_padding(T: int, P: int, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    w = _integers((T,), -2, 2, seed=P).to(DEVICE)
    J = _integers((T, P + 37), -1, 1, seed=P + 1).to(dtype).to(DEVICE)[:, :P]
    out = torch.empty(P, dtype=dtype, device=DEVICE)
    assert torch.equal(combine(w, J, out), combine_reference(w, J, out.clone()))


def _random_case(T: int, P: int, j_name: str, w_name: str, out_name: str, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(T, generator=gen, dtype=torch.float64).to(DTYPES[w_name]).to(DEVICE)
    J = torch.randn(T, P, generator=gen).to(DTYPES[j_name]).to(DEVICE)
    out = torch.randn(P, generator=gen).to(DTYPES[out_name]).to(DEVICE)
    return w, J, out


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize(
    ("j_name", "w_name", "out_name"),
    [
        ("fp32", "fp64", "fp32"),
        ("fp32", "fp32", "fp32"),
        ("fp16", "fp64", "fp16"),
        ("bf16", "fp64", "bf16"),
        ("bf16", "bf16", "fp32"),
        ("fp16", "fp32", "bf16"),
        ("fp32", "fp16", "bf16"),
    ],
    ids=lambda v: v,
)
@pytest.mark.parametrize("T", [2, 17, 64])
def test_combine_rounding_within_fp32_accumulation_bound(
    T: int, j_name: str, w_name: str, out_name: str, accumulate: bool
) -> None:
    # Kernel: w is rounded to fp32 (as in the reference, so the exact value below starts from w32), then
    # T rounded products and T (+1 with accumulate) fp32 additions: |acc - exact| ≤ γ_{T+2}·S with
    # S = Σ_t |w_t J_tp| (+ |out_p|), γ_n = n·u/(1 - n·u) (Higham §3.1). The store into out adds
    # `STORE_ROUNDING` relative to |acc|, plus the subnormal absolute term.
    P = 4097
    w, J, out = _random_case(T, P, j_name, w_name, out_name, seed=T)
    w32 = w.to(torch.float32).double()
    exact = w32 @ J.double()
    magnitude = w32.abs() @ J.double().abs()
    if accumulate:
        exact = exact + out.double()
        magnitude = magnitude + out.double().abs()
    n = T + 2
    gamma = n * U32 / (1 - n * U32)
    relative, absolute = STORE_ROUNDING[out_name]
    bound = gamma * magnitude + relative * (exact.abs() + gamma * magnitude) + absolute
    combine(w, J, out, accumulate=accumulate)
    assert ((out.double() - exact).abs() <= bound).all()


def test_combine_accumulates_in_fp32() -> None:
    # In fp16, 2048 + 1 rounds back to 2048 (spacing 2 there); in fp32 the sum is 2050, exact in fp16.
    J = torch.tensor([[2048.0], [1.0], [1.0]], dtype=torch.float16, device=DEVICE)
    out = torch.empty(1, dtype=torch.float16, device=DEVICE)
    combine(torch.ones(3, device=DEVICE), J, out)
    assert out.item() == 2050.0


def test_combine_writes_through_grad_views() -> None:
    # The optimizer hands combine a flat buffer whose slices are the parameters' .grad tensors.
    flat = torch.zeros(10 + 6, device=DEVICE)
    weight_grad, bias_grad = flat[:10].view(2, 5), flat[10:]
    J = torch.arange(2 * 16, dtype=torch.float32, device=DEVICE).view(2, 16)
    combine(torch.tensor([1.0, -1.0], device=DEVICE), J, flat)
    assert torch.equal(weight_grad, torch.full((2, 5), -16.0, device=DEVICE))
    assert torch.equal(bias_grad, torch.full((6,), -16.0, device=DEVICE))


def test_combine_is_deterministic() -> None:
    w, J, _ = _random_case(17, 200_003, "bf16", "fp64", "fp32", seed=5)
    first = combine(w, J, torch.empty(200_003, device=DEVICE))
    second = combine(w, J, torch.empty(200_003, device=DEVICE))
    assert torch.equal(first, second)


def test_combine_with_empty_columns_returns_out() -> None:
    out = torch.empty(0, device=DEVICE)
    assert combine(torch.ones(3, device=DEVICE), torch.empty(3, 0, device=DEVICE), out) is out


def _args(**change):
    args = {
        "w": torch.ones(3, device=DEVICE),
        "J": torch.ones(3, 8, device=DEVICE),
        "out": torch.empty(8, device=DEVICE),
    }
    args.update({name: make() for name, make in change.items()})
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"w": lambda: torch.ones(4, device=DEVICE)}, r"w must be a 1-D tensor of length T=3, got \(4,\)", id="w-length"),
        pytest.param({"w": lambda: torch.ones(3, 1, device=DEVICE)}, r"w must be .* got \(3, 1\)", id="w-rank"),
        pytest.param({"w": lambda: torch.ones(3, dtype=torch.int64, device=DEVICE)}, "w must have a floating-point dtype, got torch.int64", id="w-int"),
        pytest.param({"w": lambda: torch.ones(3, device="meta")}, "w is on meta but J is on", id="w-device"),
        pytest.param({"out": lambda: torch.empty(7, device=DEVICE)}, r"out must be a 1-D tensor of length P=8, got \(7,\)", id="out-length"),
        pytest.param({"out": lambda: torch.empty(16, device=DEVICE)[::2]}, r"out must be contiguous, got stride \(2,\)", id="out-strided"),
        pytest.param({"out": lambda: torch.empty(8, dtype=torch.float64, device=DEVICE)}, "out has dtype torch.float64.*torch backend", id="out-fp64"),
        pytest.param({"out": lambda: torch.empty(8, dtype=torch.int32, device=DEVICE)}, "out has unsupported dtype torch.int32", id="out-int"),
        pytest.param({"J": lambda: torch.ones(3, 8, dtype=torch.float64, device=DEVICE)}, "J has dtype torch.float64.*torch backend", id="J-fp64"),
        pytest.param({"J": lambda: torch.ones(8, 3, device=DEVICE).T}, r"J must have contiguous rows .*\(1, 3\)", id="J-column-major"),
        pytest.param({"J": lambda: torch.ones(3, device=DEVICE)}, r"J must be \(T, P\) or \(\.\.\., T, P\), got shape \(3,\)", id="J-rank"),
    ],
)
def test_combine_rejects_bad_input(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        combine(**_args(**change))


def test_combine_rejects_out_overlapping_J() -> None:
    J = torch.ones(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out must not share memory with J"):
        combine(torch.ones(3, device=DEVICE), J, J[1])
