"""The Triton weight solves against the torch path of ``gradsurgery.methods``: PCGrad's chains to 1e-12,
MGDA's min-norm point and CAGrad's dual to the torch solver's own accuracy, and argument errors.

Without CUDA these run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
needs ~1 s per interpreted 48-iteration solve at T ≤ 8, ~3 s at T = 32 and ~10 s at T = 64 on a busy
core: every (T, kind) pair of the full grid for T ≤ 8, two kinds per solver at T = 17, one at T = 32
and at T = 64 (the largest T the solves serve; the GPU module covers more kinds there).

Tolerances: ``tests/kernels/solve_tolerance.py`` (read off the torch path, not one machine's BLAS).
"""

from __future__ import annotations

import pytest
import torch

from gradsurgery.kernels import (
    SOLVE_MAX_TASKS,
    cagrad_dual_triton,
    min_norm_triton,
    pcgrad_weights_triton,
    triton_runs_on,
)
from gradsurgery.methods import _simplex, cagrad, mgda
from gradsurgery.methods._common import normalized
from gradsurgery.methods.pcgrad import pcgrad_coefficients, random_orders

from tests.helpers import make_J
from tests.kernels.solve_tolerance import (
    ITERATIONS,
    U64,
    barrier_floor,
    last_moves,
    torch_path,
    weight_tolerance,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
)

KINDS = ("conflicting", "agreeing", "rank_deficient", "zero_row")


def _grid(extra: dict[int, tuple[str, ...]]) -> list:
    cases = [(T, kind) for T in (3, 5, 8) for kind in KINDS]
    cases += [(T, kind) for T, kinds in extra.items() for kind in kinds]
    return [pytest.param(T, kind, id=f"T{T}-{kind}") for T, kind in cases]


def _gram(kind: str, T: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    J = make_J(kind, T, 40, seed=T)
    return (J @ J.T).to(dtype).to(DEVICE)


def _min_norm_gap(w: torch.Tensor, G: torch.Tensor) -> float:
    return _simplex.frank_wolfe_gap(w, 2 * G @ w).item()


def _assert_on_simplex(w: torch.Tensor, T: int) -> None:
    assert w.shape == (T,) and w.dtype == torch.float64 and w.device.type == DEVICE.type
    assert torch.isfinite(w).all() and w.min() >= 0 and abs(w.sum().item() - 1) < 1e-12


def test_solver_constants_mirror_the_torch_solver() -> None:
    from gradsurgery.kernels import _solve_triton as kernels

    assert kernels.GROWTH.value == _simplex.GROWTH and kernels.T_MAX.value == _simplex.T_MAX
    assert [2.0**-k for k in range(kernels.LADDER.value)] == _simplex._STEP_LADDER


# ---------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 17, 32, 64])
def test_pcgrad_weights_match_pcgrad_coefficients(T: int, kind: str, dtype: torch.dtype) -> None:
    G = _gram(kind, T, dtype)
    orders = random_orders(T, generator=torch.Generator(device=DEVICE).manual_seed(T), device=DEVICE)
    w = pcgrad_weights_triton(G, orders)
    expected = pcgrad_coefficients(G, orders).sum(dim=0)
    assert w.shape == (T,) and w.dtype == torch.float64 and w.device == G.device
    # The same float64 operations; only the order of the T-term sums differs, by ulps of |c_i|·|G|.
    assert torch.allclose(w, expected, rtol=0, atol=1e-12 * (1 + expected.abs().max().item()))


def test_pcgrad_weights_symmetrise_and_follow_strides() -> None:
    # An asymmetric input read through a transposed view: the kernel must average G and Gᵀ as
    # symmetric64 does, whatever the strides.
    T = 6
    G = _gram("conflicting", T)
    G = G + 1e-3 * torch.randn(T, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    orders = random_orders(T, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE)
    expected = pcgrad_coefficients(G, orders).sum(dim=0)
    w = pcgrad_weights_triton(G.T, orders)
    assert torch.allclose(w, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


# ---------------------------------------------------------------- MGDA


@pytest.mark.parametrize(
    ("T", "kind"), _grid({17: ("conflicting", "rank_deficient"), 32: ("rank_deficient",), 64: ("conflicting",)})
)
def test_min_norm_matches_torch_solver(T: int, kind: str) -> None:
    G = normalized(_gram(kind, T))
    w = min_norm_triton(G, ITERATIONS)
    path = torch_path(lambda iterations: mgda._min_norm(G, iterations))
    ref = path[0]
    _assert_on_simplex(w, T)
    gap, ref_gaps = _min_norm_gap(w, G), [_min_norm_gap(p, G) for p in path]
    # KKT: the torch solver's own bound for float64 Grams (tests/test_methods.py).
    assert gap <= 1e-9
    # No worse than the torch solver, up to what separates two runs of its path: a rung flip in the last
    # iterations, and the barrier's resolution at its last weight (solve_tolerance.barrier_floor).
    assert gap <= ref_gaps[0] + last_moves(ref_gaps) + barrier_floor(T)
    # The min-norm point d* = Jᵀα* is unique even when α* is not: f(α) − f* ≥ ‖J(α − α*)‖² bounds
    # ‖J(w − ref)‖ by √gap + √ref_gap, with both gaps ≤ 1e-9.
    diff = w - ref
    assert (diff @ G @ diff).item() <= (gap**0.5 + ref_gaps[0] ** 0.5) ** 2 + 1e-15
    if kind != "rank_deficient":  # α* is unique: the iterates themselves agree
        assert (w - ref).abs().max() <= weight_tolerance(path)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize(("T", "kind"), [(5, "rank_deficient"), (8, "antiparallel")], ids=lambda v: str(v))
def test_min_norm_survives_an_indefinite_fp32_gram(T: int, kind: str) -> None:
    # An fp32 Gram of rank-deficient gradients has eigenvalues down to ~-1e-7: once t·w²·|λ| > 1 the
    # scaled Hessian is indefinite and its Cholesky factorisation fails. The kernel then takes no step
    # (the torch path instead uses whatever LAPACK left in the factor). The KKT bound is the one the
    # torch solver meets on fp32 Grams (tests/test_methods.py).
    G32 = _gram(kind, T, torch.float32)
    G = normalized(G32)
    assert torch.linalg.eigvalsh(G).min() < 0
    w = min_norm_triton(G, ITERATIONS)
    _assert_on_simplex(w, T)
    assert _min_norm_gap(w, G) <= 1e-6


def test_min_norm_of_one_task_is_one() -> None:
    w = min_norm_triton(torch.full((1, 1), 0.5, device=DEVICE), 3)
    assert torch.equal(w, torch.ones(1, dtype=torch.float64, device=DEVICE))


# ---------------------------------------------------------------- CAGrad


def _dual_problem(G: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    T = G.shape[0]
    return G.sum(dim=1) / T, c * G.sum().clamp_min(0).sqrt() / T


@pytest.mark.parametrize(
    ("T", "kind"), _grid({17: ("agreeing", "zero_row"), 32: ("conflicting",), 64: ("conflicting",)})
)
def test_cagrad_dual_matches_torch_solver(T: int, kind: str) -> None:
    c = 0.4
    G = normalized(_gram(kind, T))
    b, phi = _dual_problem(G, c)
    w = cagrad_dual_triton(G, b, phi, ITERATIONS)
    path = torch_path(lambda iterations: cagrad._solve(G, b, phi, iterations))
    ref = path[0]
    _assert_on_simplex(w, T)
    value, values = cagrad.cagrad_objective(w, G, c).item(), [cagrad.cagrad_objective(p, G, c).item() for p in path]
    # The torch solver reaches the true minimum to 1e-6 relative (checked there against SciPy); the
    # kernel reaches its value up to a rung flip in the last iterations (solve_tolerance) and the
    # rounding of evaluating wᵀb + φ·sqrt(wᵀGw): γ_T-scale relative to the size of its terms (not of the
    # value, which they can cancel), in both evaluations.
    magnitude = (w.abs() @ b.abs() + phi * (w @ G.abs() @ w).sqrt()).item()
    assert value <= values[0] + last_moves(values) + 4 * (T + 2) * U64 * magnitude
    assert (w - ref).abs().max() <= weight_tolerance(path)


@pytest.mark.parametrize("c", [0.0, 2.0])
def test_cagrad_dual_takes_phi_as_a_tensor_or_a_number(c: float) -> None:
    G = normalized(_gram("conflicting", 4))
    b, phi = _dual_problem(G, c)
    from_tensor = cagrad_dual_triton(G, b, phi, ITERATIONS)
    assert torch.equal(from_tensor, cagrad_dual_triton(G, b, phi.item(), ITERATIONS))
    path = torch_path(lambda iterations: cagrad._solve(G, b, phi, iterations))
    assert (from_tensor - path[0]).abs().max() <= weight_tolerance(path)


# ---------------------------------------------------------------- arguments


def test_bad_gram_raises_with_the_value() -> None:
    orders = torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        pcgrad_weights_triton(torch.zeros(3, 4, device=DEVICE), orders)
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        min_norm_triton(torch.zeros(2, 3, 3, device=DEVICE), 4)
    too_many = SOLVE_MAX_TASKS + 1
    with pytest.raises(ValueError, match=f"T={too_many}"):
        min_norm_triton(torch.eye(too_many, device=DEVICE), 4)
    with pytest.raises(ValueError, match="T=0"):
        min_norm_triton(torch.zeros(0, 0, device=DEVICE), 4)
    with pytest.raises(ValueError, match="torch.float16"):
        min_norm_triton(torch.eye(3, dtype=torch.float16, device=DEVICE), 4)
    with pytest.raises(ValueError, match="meta"):
        min_norm_triton(torch.eye(3, device="meta"), 4)


@pytest.mark.parametrize("iterations", [0, -1, True, 2.0])
def test_bad_iterations_raise_with_the_value(iterations: object) -> None:
    with pytest.raises(ValueError, match=repr(iterations)):
        min_norm_triton(torch.eye(3, device=DEVICE), iterations)  # type: ignore[arg-type]


def test_bad_orders_raise_with_the_value() -> None:
    G = torch.eye(4, device=DEVICE)
    with pytest.raises(ValueError, match="torch.int32"):
        pcgrad_weights_triton(G, torch.zeros(4, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        pcgrad_weights_triton(G, torch.zeros(4, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="meta"):
        pcgrad_weights_triton(G, torch.zeros(4, 3, dtype=torch.int64, device="meta"))


def test_bad_dual_arguments_raise_with_the_value() -> None:
    G = torch.eye(4, dtype=torch.float64, device=DEVICE)
    b = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        cagrad_dual_triton(G, torch.zeros(5, dtype=torch.float64, device=DEVICE), 0.1, 4)
    with pytest.raises(ValueError, match="torch.int64"):
        cagrad_dual_triton(G, torch.zeros(4, dtype=torch.int64, device=DEVICE), 0.1, 4)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        cagrad_dual_triton(G, b, torch.zeros(2, device=DEVICE), 4)
    with pytest.raises(ValueError, match="meta"):
        cagrad_dual_triton(G, b, torch.zeros((), device="meta"), 4)
