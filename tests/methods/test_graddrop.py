"""GradDrop against a plain transcription of the paper's Algorithm 1 given the same draws, and its defining
properties: agreeing coordinates pass unchanged, conflicted ones keep one sign with probability equal
to its purity, the draws are uniform and reproducible, and the options behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from gradsurgery.kernels import triton_runs_on
from gradsurgery.kernels.graddrop import graddrop_seed, graddrop_uniforms
from gradsurgery.methods.graddrop import check_graddrop_options, graddrop

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads


def graddrop_vector(J: torch.Tensor, U: torch.Tensor, leak: torch.Tensor | None = None) -> torch.Tensor:
    """Chen et al. 2020, Algorithm 1, on the rows of J, with the uniform draws U given (fp64)."""
    J = J.double()
    leak = torch.zeros(J.shape[0], dtype=torch.float64) if leak is None else leak.double()
    total, magnitude = J.sum(dim=0), J.abs().sum(dim=0)
    purity = 0.5 * (1 + total / magnitude)
    purity[magnitude == 0] = 0.5
    mask = ((purity > U) & (J > 0)) | ((purity < U) & (J < 0))
    return ((leak[:, None] + (1 - leak[:, None]) * mask) * J).sum(dim=0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draws(seed: int, P: int) -> torch.Tensor:
    return graddrop_uniforms(graddrop_seed(_generator(seed)), P)


def _sequential_sum(J: torch.Tensor) -> torch.Tensor:
    # Σ_t J[t] added in row order in the accumulation dtype: what an unmasked column must give exactly.
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    total = torch.zeros(J.shape[1], dtype=acc)
    for row in J:
        total += row.to(acc)
    return total


# The oracle sums each column in another order: a few ulps of Σ|J| (1e-12 is three orders above).
def _close(actual: torch.Tensor, expected: torch.Tensor, J: torch.Tensor) -> None:
    bound = 1e-12 * J.double().abs().sum(dim=0).clamp_min(1e-300)
    assert ((actual.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_graddrop_matches_paper_algorithm(kind: str, T: int) -> None:
    P = 3001
    J = make_J(kind, T, P, seed=T)
    _close(graddrop(J, generator=_generator(T)), graddrop_vector(J, _draws(T, P)), J)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_graddrop_matches_paper_algorithm_with_leaks(T: int) -> None:
    P = 2003
    J = make_J("conflicting", T, P, seed=T)
    leak = [0.0, 1.0, 0.25, 0.5, 0.75][:T]
    expected = graddrop_vector(J, _draws(7, P), torch.tensor(leak, dtype=torch.float64))
    _close(graddrop(J, generator=_generator(7), leak=leak), expected, J)
    _close(graddrop(J, generator=_generator(7), leak=torch.tensor(leak)), expected, J)
    # One number for every task.
    expected = graddrop_vector(J, _draws(7, P), torch.full((T,), 0.3, dtype=torch.float64))
    _close(graddrop(J, generator=_generator(7), leak=0.3), expected, J)


def test_graddrop_with_more_tasks_than_coordinates() -> None:
    J = make_J("conflicting", 8, 5, seed=1)
    _close(graddrop(J, generator=_generator(2)), graddrop_vector(J, _draws(2, 5)), J)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-20, 1e20))
def test_graddrop_passes_agreeing_coordinates_unchanged(dtype: torch.dtype, seed: int, scale: float) -> None:
    # Purity 1 (or 0) keeps every entry whatever the draw: the exact row-order sum of the column.
    gen = _generator(seed)
    T, P = 4, 301
    J = (torch.rand(T, P, generator=gen, dtype=torch.float64) * scale).to(dtype)
    signs = torch.where(torch.rand(P, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    J = J * signs
    assert torch.equal(graddrop(J, generator=gen), _sequential_sum(J).to(dtype))


@pytest.mark.parametrize(("positive", "negative"), [(3.0, -1.0), (1.0, -1.0), (1.0, -7.0), (0.25, -0.5)])
def test_graddrop_keeps_a_sign_with_its_purity(positive: float, negative: float) -> None:
    # Every column is (positive, negative): purity p = ½(1 + (a + b)/(a − b)); the column keeps a
    # (d = a) with probability p, else b. Binomial with n = 200000: the 6σ band is ≤ 0.0068.
    n = 200_000
    J = torch.tensor([[positive], [negative]]).expand(2, n).contiguous()
    d = graddrop(J, generator=_generator(11))
    assert ((d == positive) | (d == negative)).all()
    purity = 0.5 * (1 + (positive + negative) / (positive - negative))
    frequency = (d == positive).double().mean().item()
    assert abs(frequency - purity) <= 6 * math.sqrt(purity * (1 - purity) / n)


def test_graddrop_draws_are_uniform_and_independent() -> None:
    n = 100_000
    U = _draws(0, n)
    assert ((U >= 0) & (U < 1)).all()
    assert torch.equal(U * 2**24, (U * 2**24).floor())  # on the 2^-24 grid
    # Kolmogorov–Smirnov at the 0.1% level; correlations within 5/√n (the draws are fixed, the
    # thresholds are what an independent uniform sample of this size passes with near certainty).
    assert stats.kstest(U.numpy(), "uniform").pvalue > 1e-3
    limit = 5 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack((U[:-1], U[1:])))[0, 1]) < limit  # neighbouring columns
    for other in (1, 2, 2**32):  # the next steps' draws for the same columns
        V = graddrop_uniforms(graddrop_seed(_generator(0)) + other, n)
        assert abs(torch.corrcoef(torch.stack((U, V)))[0, 1]) < limit
    bits = (U * 2**24).long()
    frequencies = torch.stack([((bits >> b) & 1).double().mean() for b in range(24)])
    assert ((frequencies - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all()


def test_graddrop_generator_makes_it_reproducible() -> None:
    J = make_J("conflicting", 5, 4000)
    a = graddrop(J, generator=_generator(3))
    assert torch.equal(a, graddrop(J, generator=_generator(3)))
    assert not torch.equal(a, graddrop(J, generator=_generator(4)))
    # Exactly one draw per call: a generator that drew one seed is where graddrop leaves it.
    generator, reference = _generator(8), _generator(8)
    graddrop(J, generator=generator)
    graddrop_seed(reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_graddrop_successive_steps_draw_afresh() -> None:
    J = make_J("conflicting", 3, 4000)
    generator = _generator(5)
    assert not torch.equal(graddrop(J, generator=generator), graddrop(J, generator=generator))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_graddrop_mean_is_the_sum_divided_by_T(dtype: torch.dtype) -> None:
    J = make_J("conflicting", 3, 500, dtype=dtype)
    total = graddrop(J, generator=_generator(1))
    mean = graddrop(J, generator=_generator(1), reduction="mean")
    # The kept sum is multiplied once by ±1/T (rounded to J's accumulation dtype).
    assert torch.equal(mean, total * torch.tensor(1 / 3, dtype=dtype))


def test_graddrop_full_leak_is_the_sum() -> None:
    J = make_J("conflicting", 4, 700, dtype=torch.float32)
    assert torch.equal(graddrop(J, generator=_generator(0), leak=1.0), _sequential_sum(J))


def test_graddrop_one_task_is_its_gradient() -> None:
    J = make_J("conflicting", 1, 300)
    assert torch.equal(graddrop(J, generator=_generator(0)), J[0])


def test_graddrop_zero_gradients_give_zero() -> None:
    assert torch.equal(graddrop(torch.zeros(3, 40), generator=_generator(0)), torch.zeros(40))


@given(seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_graddrop_is_positively_homogeneous(seed: int, scale: float) -> None:
    # P is invariant to a common positive scale: the same entries are kept (a flip needs a draw within
    # rounding of the purity), and d scales with the gradients.
    J = make_J("conflicting", 4, 400, seed=seed % 1000)
    d = graddrop(J, generator=_generator(seed))
    scaled = graddrop(scale * J, generator=_generator(seed))
    _close(scaled / scale, d, J)


@given(seed=st.integers(0, 2**31), permutation=st.permutations(range(4)))
def test_graddrop_is_invariant_to_task_order(seed: int, permutation: list[int]) -> None:
    # Integer gradients: every column sum is exact in any order, so the permuted tasks give the same d.
    gen = _generator(seed)
    J = torch.randint(-5, 6, (4, 300), generator=gen).float()
    leak = torch.tensor([0.0, 0.5, 0.25, 1.0])
    order = torch.tensor(permutation)
    d = graddrop(J, generator=_generator(seed), leak=leak)
    assert torch.equal(graddrop(J[order], generator=_generator(seed), leak=leak[order]), d)


def test_graddrop_non_finite_gradients_give_nan() -> None:
    J = make_J("conflicting", 3, 30, dtype=torch.float32)
    J[0, 3] = float("nan")
    J[2, 7] = float("inf")
    d = graddrop(J, generator=_generator(0))
    assert d[3].isnan() and d[7].isnan()
    rest = torch.ones(30, dtype=torch.bool)
    rest[[3, 7]] = False
    assert torch.isfinite(d[rest]).all()


@pytest.mark.skipif(not triton_runs_on("cpu"), reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_graddrop_backends_keep_the_same_entries() -> None:
    J = make_J("conflicting", 5, 20_011, dtype=torch.float32)
    torch_path = graddrop(J, generator=_generator(6), backend="torch")
    assert torch.equal(graddrop(J, generator=_generator(6), backend="triton"), torch_path)


@pytest.mark.parametrize("leak", ["none", "scalar", "sequence", "tensor"])
@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_graddrop_does_not_read_values_back(T: int, leak: str) -> None:
    J = make_J("conflicting", T, 100, dtype=torch.float32)
    leaks = {"none": None, "scalar": 0.5, "sequence": [t / T for t in range(T)], "tensor": torch.rand(T)}[leak]
    with ForbidHostReads():
        graddrop(J, generator=_generator(0), leak=leaks, reduction="mean", backend="torch")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"leak": -0.1}, r"leak must lie in \[0, 1\], got -0.1"),
        ({"leak": 1.5}, r"leak must lie in \[0, 1\], got 1.5"),
        ({"leak": float("nan")}, r"leak must lie in \[0, 1\], got nan"),
        ({"leak": True}, "leak must be a number in .* got True"),
        ({"leak": "0.5"}, "leak must be a number in .* got '0.5'"),
        ({"leak": [0.1, 0.2]}, "leak has 2 values but there are T=3 tasks"),
        ({"leak": [0.1, 2.0, 0.0]}, r"leak must lie in \[0, 1\], got \[0.1, 2.0, 0.0\]"),
        ({"leak": torch.ones(2)}, r"leak must be a length T=3 tensor, got shape \(2,\)"),
        ({"leak": torch.ones(3, dtype=torch.int64)}, "leak must be a floating-point tensor"),
        ({"reduction": "avg"}, "reduction must be one of .* got 'avg'"),
        ({"backend": "gpu"}, "backend must be one of .* got 'gpu'"),
    ],
)
def test_graddrop_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        graddrop(torch.ones(3, 5), **kwargs)


def test_graddrop_options_check_without_T() -> None:
    check_graddrop_options([0.0, 1.0])
    with pytest.raises(ValueError, match="leak must lie in"):
        check_graddrop_options([0.0, -1.0])
