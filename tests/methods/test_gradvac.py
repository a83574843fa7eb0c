"""GradVac against a plain vector-form transcription of the paper's Algorithm 1 (fp64, on J, explicit
visiting orders, the EMA state carried over steps), and its defining properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.methods.gradvac import gradvac_coefficients, gradvac_orders, gradvac_weights
from gradsurgery.methods.pcgrad import pcgrad_weights, random_orders

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads

EPS64 = torch.finfo(torch.float64).eps


def gradvac_vector(
    J: torch.Tensor, orders: list[list[int]], targets: torch.Tensor, beta: float, *, update: str = "always"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang et al. 2021, Algorithm 1 on the rows of J with the visiting orders given; returns
    ``(Σ_i g_i', targets after the step)``. A vector that has cancelled to rounding noise counts as zero
    (cosine 0, no correction), as the library documents; ``magnitude`` bounds its terms' size."""
    J = J.double()
    T = J.shape[0]
    targets = targets.clone().double()
    norms = [J[j].norm().item() for j in range(T)]
    total = torch.zeros(J.shape[1], dtype=torch.float64)
    for i, order in enumerate(orders):
        g = J[i].clone()
        magnitude = norms[i]
        for j in order:
            norm_i = g.norm().item()
            live = norm_i**2 > 64 * T * EPS64 * magnitude**2 and norms[j] > 0
            phi = max(-1.0, min(1.0, torch.dot(g, J[j]).item() / (norm_i * norms[j]))) if live else 0.0
            target = targets[i, j].item()
            if live and phi < target and target**2 < 1:
                room = math.sqrt(1 - target**2)
                a = norm_i * (target * math.sqrt(max(0.0, 1 - phi**2)) - phi * room) / (norms[j] * room)
                g = g + a * J[j]
                magnitude += abs(a) * norms[j]
            if update == "always" or phi < target:
                targets[i, j] = (1 - beta) * target + beta * phi
        total += g
    return total, targets


# fp64 Gram-space vs vector-space algebra: the same operations in another order (1e-9 relative, as for
# PCGrad in tests/test_methods.py; what we observe is ~1e-13).
FP64_RTOL = 1e-9
# Rows that are exactly (anti)parallel, or more tasks than independent directions: a cosine of ±1 is
# known to ε, so the sine the correction uses, √(1 − φ²), only to √ε, and the correction divides by
# √(1 − φ̂²). Both forms carry that error independently.
DEGENERATE = ("parallel", "antiparallel", "rank_deficient")


def _rtol(kind: str, targets: torch.Tensor) -> float:
    if kind not in DEGENERATE:
        return FP64_RTOL
    off = targets[~torch.eye(targets.shape[0], dtype=torch.bool)]
    room = (1 - off.square()).clamp_min(0).sqrt().min().item() if off.numel() else 1.0
    return FP64_RTOL + 64 * math.sqrt(EPS64) / max(room, 1e-3)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = FP64_RTOL) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual.double() - expected.double()).abs().max() <= rtol * scale


def _random_targets(T: int, seed: int) -> torch.Tensor:
    return torch.rand(T, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


@pytest.mark.parametrize("update", ["always", "on_correction"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradvac_matches_paper_algorithm_for_every_order_of_three_tasks(kind: str, update: str) -> None:
    J = make_J(kind, 3, 29, seed=3)
    G = J @ J.T
    targets = _random_targets(3, 1)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    for choice in itertools.product(*[list(itertools.permutations(o)) for o in others]):
        orders = [list(order) for order in choice]
        C, new_targets = gradvac_coefficients(G, torch.tensor(orders), targets, beta=0.3, target_update=update)
        expected, expected_targets = gradvac_vector(J, orders, targets, 0.3, update=update)
        _close(C.sum(0) @ J, expected, _rtol(kind, targets))
        _close(new_targets, expected_targets, _rtol(kind, targets))


@pytest.mark.parametrize("update", ["always", "on_correction"])
@pytest.mark.parametrize("beta", [1e-2, 0.5])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_gradvac_matches_paper_algorithm_over_ten_steps(kind: str, T: int, beta: float, update: str) -> None:
    # The state carried from step to step: a fresh J each step (the same structure), the orders the
    # public function draws, and the targets after ten steps equal to the oracle's.
    generator = torch.Generator().manual_seed(T)
    mirror = torch.Generator().manual_seed(T)
    targets, expected_targets = None, torch.zeros(T, T, dtype=torch.float64)
    for step in range(10):
        J = make_J(kind, T, 41, seed=100 * T + step)
        w, targets = gradvac_weights(J @ J.T, beta=beta, targets=targets, generator=generator, target_update=update)
        orders = gradvac_orders(T, generator=mirror)
        rtol = _rtol(kind, expected_targets)
        expected, expected_targets = gradvac_vector(J, orders.tolist(), expected_targets, beta, update=update)
        _close(w @ J, expected, rtol)
    _close(targets, expected_targets, rtol)


@pytest.mark.parametrize("kind", KINDS)
def test_gradvac_with_more_tasks_than_coordinates(kind: str) -> None:
    T = 8
    J = make_J(kind, T, 5, seed=2)
    targets = _random_targets(T, 2)
    orders = random_orders(T, generator=torch.Generator().manual_seed(4))
    w, new_targets = gradvac_weights(J @ J.T, targets=targets, beta=0.2, generator=torch.Generator().manual_seed(4))
    expected, expected_targets = gradvac_vector(J, orders.tolist(), targets, 0.2)
    _close(w @ J, expected, _rtol(kind, targets))
    _close(new_targets, expected_targets, _rtol(kind, targets))


@given(seed=st.integers(0, 10_000), T=st.integers(2, 7))
def test_gradvac_first_step_is_pcgrad(seed: int, T: int) -> None:
    # Every target starts at 0, where the correction is the projection −(g_i'·g_j)/‖g_j‖²·g_j.
    J = make_J("conflicting", T, 23, seed=seed)
    G = J @ J.T
    w, _ = gradvac_weights(G, generator=torch.Generator().manual_seed(seed))
    _close(w, pcgrad_weights(G, generator=torch.Generator().manual_seed(seed)))


@given(seed=st.integers(0, 10_000), target=st.floats(-0.95, 0.95))
def test_gradvac_reaches_the_target_similarity_for_two_tasks(seed: int, target: float) -> None:
    # The closed form rotates g_i' to exactly angle arccos(φ̂) with g_j when it was below.
    J = make_J("conflicting", 2, 17, seed=seed)
    targets = torch.full((2, 2), target, dtype=torch.float64)
    C, _ = gradvac_coefficients(J @ J.T, torch.tensor([[1], [0]]), targets, beta=0.1)
    modified = C @ J
    for i, j in ((0, 1), (1, 0)):
        before = torch.nn.functional.cosine_similarity(J[i], J[j], dim=0).item()
        after = torch.nn.functional.cosine_similarity(modified[i], J[j], dim=0).item()
        assert after == pytest.approx(target if before < target else before, abs=1e-12)


@given(seed=st.integers(0, 10_000), scale=st.floats(1e-8, 1e8), T=st.integers(1, 6))
def test_gradvac_is_invariant_to_the_gram_scale(seed: int, scale: float, T: int) -> None:
    # Cosines and the ratio ‖g_i'‖/‖g_j‖ do not change: the same weights and targets, so d = wᵀJ is
    # positively homogeneous in J.
    J = make_J("conflicting", T, 19, seed=seed)
    targets = _random_targets(T, seed)
    w, new = gradvac_weights(J @ J.T, targets=targets, beta=0.3, generator=torch.Generator().manual_seed(seed))
    w_s, new_s = gradvac_weights(
        scale * (J @ J.T), targets=targets, beta=0.3, generator=torch.Generator().manual_seed(seed)
    )
    _close(w_s, w, 1e-10)
    _close(new_s, new, 1e-10)


@given(seed=st.integers(0, 10_000), permutation=st.permutations(range(3)))
def test_gradvac_is_equivariant_under_task_permutation(seed: int, permutation: list[int]) -> None:
    # Relabelling the tasks (orders and targets relabelled alike) permutes the weights and targets.
    J = make_J("conflicting", 3, 23, seed=seed)
    targets = _random_targets(3, seed)
    orders = random_orders(3, generator=torch.Generator().manual_seed(seed))
    p = torch.tensor(permutation)  # new task k is old task p[k]
    inverse = torch.argsort(p)
    C, new = gradvac_coefficients(J @ J.T, orders, targets, beta=0.3)
    relabelled_orders = inverse[orders[p]]
    Cp, new_p = gradvac_coefficients(
        (J @ J.T)[p][:, p], relabelled_orders, targets[p][:, p], beta=0.3
    )
    _close(Cp.sum(0), C.sum(0)[p])
    _close(new_p, new[p][:, p])


def test_gradvac_beta_zero_keeps_the_targets() -> None:
    J = make_J("conflicting", 4, 30)
    targets = _random_targets(4, 0)
    _, new = gradvac_weights(J @ J.T, targets=targets, beta=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(new, targets)


def test_gradvac_does_not_modify_its_input_state() -> None:
    J = make_J("conflicting", 4, 30)
    targets = _random_targets(4, 0)
    kept = targets.clone()
    gradvac_weights(J @ J.T, targets=targets, beta=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(targets, kept)


def test_gradvac_generator_makes_it_reproducible() -> None:
    J = make_J("conflicting", 6, 50)
    G = J @ J.T
    a = gradvac_weights(G, beta=0.5, generator=torch.Generator().manual_seed(3))
    b = gradvac_weights(G, beta=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gradvac_draws_nothing_for_two_tasks() -> None:
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    gradvac_weights(make_J("conflicting", 2, 9) @ make_J("conflicting", 2, 9).T, generator=generator)
    assert torch.equal(generator.get_state(), state)


def test_gradvac_one_task_is_its_gradient() -> None:
    G = torch.tensor([[4.0]])
    w, targets = gradvac_weights(G, targets=torch.full((1, 1), 0.3, dtype=torch.float64))
    assert torch.equal(w, torch.ones(1, dtype=torch.float64))
    assert torch.equal(targets, torch.full((1, 1), 0.3, dtype=torch.float64))


def test_gradvac_mean_divides_by_T() -> None:
    G = make_J("conflicting", 5, 20) @ make_J("conflicting", 5, 20).T
    w, _ = gradvac_weights(G, generator=torch.Generator().manual_seed(1))
    w_mean, _ = gradvac_weights(G, generator=torch.Generator().manual_seed(1), reduction="mean")
    assert torch.equal(w_mean, w / 5)


def test_gradvac_zero_gradients_and_saturated_targets_stay_finite() -> None:
    J = make_J("zero_row", 4, 20)
    for fill in (1.0, -1.0, 0.999999999):
        targets = torch.full((4, 4), fill, dtype=torch.float64)
        w, new = gradvac_weights(J @ J.T, targets=targets, beta=0.5, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(w).all() and torch.isfinite(new).all()
        assert (new.abs() <= 1).all()
    # A target of exactly 1 leaves every vector as it is (no finite rotation reaches angle 0).
    w, _ = gradvac_weights(J @ J.T, targets=torch.ones(4, 4, dtype=torch.float64), generator=torch.Generator())
    assert torch.equal(w, torch.ones(4, dtype=torch.float64))
    targets = _random_targets(3, 0)
    w, new = gradvac_weights(torch.zeros(3, 3), targets=targets, beta=0.5)
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))  # d = 0
    # A zero vector's cosine counts as 0 (as LibMTL's and TorchJD's epsilons make it); the diagonal is
    # never touched.
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.equal(new[off], 0.5 * targets[off])
    assert torch.equal(new.diagonal(), targets.diagonal())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gradvac_non_finite_gram_gives_nan_and_keeps_the_state(value: float) -> None:
    G = make_J("conflicting", 3, 10) @ make_J("conflicting", 3, 10).T
    G[1, 2] = value
    targets = _random_targets(3, 5)
    w, new = gradvac_weights(G, targets=targets, beta=0.5, generator=torch.Generator().manual_seed(0))
    assert w.isnan().all()
    assert torch.equal(new, targets)


@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_gradvac_does_not_read_values_back(T: int) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    with ForbidHostReads():
        _, targets = gradvac_weights(G, generator=torch.Generator().manual_seed(0))
        gradvac_weights(G, targets=targets, target_update="on_correction", generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, r"beta must be a number in \[0, 1\], got -0.1"),
        ({"beta": 1.5}, r"beta must be a number in \[0, 1\], got 1.5"),
        ({"beta": float("nan")}, r"beta must be a number in \[0, 1\], got nan"),
        ({"beta": True}, r"beta must be a number in \[0, 1\], got True"),
        ({"target_update": "sometimes"}, "target_update must be one of .* got 'sometimes'"),
        ({"targets": torch.zeros(4, 4)}, r"targets must have shape \(3, 3\) for T=3 tasks, got \(4, 4\)"),
        ({"targets": torch.zeros(3, 3, dtype=torch.int64)}, "targets must be floating point"),
        ({"targets": [[0.0] * 3] * 3}, "targets must be a .* tensor or None, got list"),
        ({"reduction": "avg"}, "reduction must be one of .* got 'avg'"),
    ],
)
def test_gradvac_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gradvac_weights(torch.eye(3), **kwargs)
