"""The CAGrad two-task toy of the study (bench/study/toy.py): losses, Pareto set, a short run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.study.toy import (
    STARTS,
    BatchedAdam,
    average_loss_minimum,
    distance_to_polyline,
    min_norm,
    pareto_set,
    run_methods,
    run_trajectory,
    toy_jacobian,
    toy_losses,
    units,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x1: float, x2: float) -> tuple[float, float]:
    """The formulas of the CAGrad paper's toy, written out independently in NumPy (float64)."""
    c1 = max(np.tanh(x2 / 2), 0.0)
    c2 = max(np.tanh(-x2 / 2), 0.0)
    h1 = np.log(max(abs(-(x1 + 7) / 2 + np.tanh(x2)), 5e-6)) + 6
    h2 = np.log(max(abs(-(x1 - 3) / 2 - np.tanh(x2) + 2), 5e-6)) + 6
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    return c1 * h1 + c2 * q1, c1 * h2 + c2 * q2


# Starts, both half-planes, the x1-axis (where c1 = c2 = 0), both L1 minima of the log valley
# (clamped at 5e-6) and a point of the Pareto set.
POINTS = [*STARTS, (0.0, 0.0), (3.0, 0.0), (-1.5, 2.0), (4.0, -3.0), (-7.0 + 2 * np.tanh(1.0), 1.0), (0.0, -8.35)]


@pytest.mark.parametrize("point", POINTS, ids=[f"({a:.2f},{b:.2f})" for a, b in POINTS])
def test_losses_match_numpy_reference(point: tuple[float, float]) -> None:
    l1, l2 = toy_losses(torch.tensor(point, dtype=torch.float64))
    r1, r2 = _reference(*point)
    # float64 evaluation of the same formulas: agreement to a few ulps of values of order 10.
    assert l1.item() == pytest.approx(r1, rel=1e-12, abs=1e-12)
    assert l2.item() == pytest.approx(r2, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("point", POINTS, ids=[f"({a:.2f},{b:.2f})" for a, b in POINTS])
def test_gradients_are_finite(point: tuple[float, float]) -> None:
    x = torch.tensor(point, dtype=torch.float32, requires_grad=True)
    for loss in toy_losses(x):
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.isfinite(grad).all()


def test_losses_broadcast_over_a_grid() -> None:
    grid = torch.tensor([[list(p) for p in POINTS]], dtype=torch.float64)  # (1, n, 2)
    l1, l2 = toy_losses(grid)
    assert l1.shape == l2.shape == (1, len(POINTS))
    assert l1[0, 0].item() == pytest.approx(_reference(*POINTS[0])[0], rel=1e-12)


def test_pareto_set_is_pareto_stationary_and_non_dominated() -> None:
    front = pareto_set(7)
    # The sweep runs from the minimiser of L2 (x1 = -7) to that of L1 (x1 = 7).
    assert front[0, 0] == pytest.approx(-7.0, abs=1e-3)
    assert front[-1, 0] == pytest.approx(7.0, abs=1e-3)
    assert np.all(np.diff(front[:, 0]) > 0)
    for point in front:
        # L-BFGS stops at gradient norm ~1e-6 of the weighted sum; the gradients are O(1).
        assert min_norm(point) < 1e-4
    losses = np.array([[v.item() for v in toy_losses(torch.tensor(p, dtype=torch.float64))] for p in front])
    axis = np.linspace(-10, 10, 81)
    with torch.no_grad():
        g1, g2 = toy_losses(torch.tensor(np.stack(np.meshgrid(axis, axis), axis=-1)))
    for l1, l2 in losses:
        dominated = (g1.numpy() < l1 - 1e-9) & (g2.numpy() < l2 - 1e-9)
        assert not dominated.any()


def test_min_norm_is_positive_away_from_the_pareto_set() -> None:
    assert min_norm(np.array(STARTS[1])) > 0.1


def test_distance_to_polyline() -> None:
    line = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert distance_to_polyline(np.array([0.5, 0.5]), line) == pytest.approx(0.5)
    assert distance_to_polyline(np.array([2.0, 2.0]), line) == pytest.approx(np.sqrt(2.0))
    assert distance_to_polyline(np.array([1.0, 0.5]), line) == pytest.approx(0.0)


@pytest.mark.parametrize("method", ["sum", "pcgrad", "cagrad", "mgda"])
def test_short_run_through_the_wrapper(method: str) -> None:
    ticks: list[int] = []
    traj = run_trajectory(method, STARTS[0], 50, points=10, seed=0, tick=ticks.append)
    assert sum(ticks) == 50
    assert traj.points[0].tolist() == list(STARTS[0])
    assert traj.points.shape == (11, 2)
    assert np.isfinite(traj.points).all()
    # Adam moves each coordinate by at most ~lr per step.
    assert np.abs(traj.points[-1] - np.array(STARTS[0])).max() <= 50 * 1e-3 * 1.01
    l0 = sum(v.item() for v in toy_losses(torch.tensor(STARTS[0])))
    l1 = sum(v.item() for v in toy_losses(torch.tensor(traj.points[-1])))
    assert l1 < l0


@pytest.mark.parametrize("point", POINTS, ids=[f"({a:.2f},{b:.2f})" for a, b in POINTS])
def test_closed_form_jacobian_is_autograds(point: tuple[float, float]) -> None:
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    rows = [torch.autograd.grad(loss, x, retain_graph=True)[0] for loss in toy_losses(x)]
    J = toy_jacobian(np.array(point, dtype=np.float64))
    # Same formulas, another order of operations: agreement to rounding of values up to 1/LOWER.
    np.testing.assert_allclose(J, torch.stack(rows).numpy(), rtol=1e-12, atol=1e-12)


def test_closed_form_jacobian_keeps_autograds_clamps() -> None:
    # On the x1-axis (tanh(x2/2) = 0: clamp_min at equality passes the gradient) and at |u1| < LOWER
    # (the clamped log: no gradient from the valley).
    for point in ((2.0, 0.0), (-7.0 + 2 * np.tanh(1.0) + 1e-7, 1.0)):
        x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
        rows = [torch.autograd.grad(loss, x, retain_graph=True)[0] for loss in toy_losses(x)]
        np.testing.assert_allclose(toy_jacobian(np.array(point)), torch.stack(rows).numpy(), rtol=1e-12, atol=1e-12)


def test_closed_form_jacobian_is_batched_in_float32() -> None:
    x = np.array([[list(p) for p in POINTS]] * 2, dtype=np.float32)  # (2, n, 2)
    J = toy_jacobian(x)
    assert J.shape == (2, len(POINTS), 2, 2) and J.dtype == np.float32
    np.testing.assert_array_equal(J[1, 3], toy_jacobian(x[1, 3]))


def test_batched_adam_is_torch_adam_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(4, 3, 2, generator=gen)
    theirs = torch.nn.Parameter(ours.clone())
    adam, reference = BatchedAdam(ours, lr=1e-3), torch.optim.Adam([theirs], lr=1e-3)
    for _ in range(200):
        grad = 10 * torch.randn(4, 3, 2, generator=gen)
        adam.step(grad)
        theirs.grad = grad.clone()
        reference.step()
    assert torch.equal(ours, theirs.detach())


# The batched functional path (one gs.functional call for the three starts per step, one Jacobian
# and one Adam step for all) against the wrapper path (each start through opt.backward), 200 steps.
@pytest.mark.parametrize("method", ["sum", "pcgrad", "cagrad", "mgda", "upgrad", "nash_mtl", "imtl_g", "graddrop"])
def test_batched_path_agrees_with_the_wrapper(method: str) -> None:
    steps = 200
    batched = run_methods([method], steps, points=steps)[method]
    for start, run in zip(STARTS, batched):
        assert run.path == "batched functional"
        reference = run_trajectory(method, start, steps, points=steps, seed=0)
        assert run.points.shape == reference.points.shape == (steps + 1, 2)
        # fp32 points moved by ~0.2 in 200 steps of 1e-3; the two paths round the Jacobian, the Gram
        # matrix and the combine in different orders: a few ulps of |x| ≤ 10 per step at most.
        np.testing.assert_allclose(run.points, reference.points, rtol=0, atol=2e-5)


def test_methods_batched_together_equal_each_alone() -> None:
    together = run_methods(["sum", "cagrad", "mgda"], 100, points=10)
    alone = run_methods(["cagrad"], 100, points=10)["cagrad"]
    for a, b in zip(together["cagrad"], alone):
        np.testing.assert_array_equal(a.points, b.points)


def test_loss_weighting_runs_through_the_wrapper() -> None:
    assert units(["sum", "uw", "pcgrad"]) == [("sum", "pcgrad"), ("uw",)]
    runs = run_methods(["uw"], 20, points=5)["uw"]
    assert [r.path for r in runs] == ["wrapper"] * 3
    np.testing.assert_array_equal(runs[0].points, run_trajectory("uw", STARTS[0], 20, points=5, seed=0).points)


def test_average_loss_minimum_is_on_the_pareto_set() -> None:
    target = average_loss_minimum()
    np.testing.assert_allclose(target, [0.0, -8.35], atol=1e-2)
    # L-BFGS stops at a gradient norm ~1e-6 of the weighted sum; the gradients are O(1).
    assert min_norm(target) < 1e-4
    assert distance_to_polyline(target, pareto_set(11)) < 1e-3
