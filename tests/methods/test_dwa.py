"""DWA through the wrapper against a plain transcription of the paper's weights (Liu et al. 2019, Eq. 7,
the official code's epoch averages, here over periods of backward() calls)."""

from __future__ import annotations

import math

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods.dwa import dwa_objective, dwa_state

from ..test_no_sync import ForbidHostReads
from .loss_training import T, assert_same_training, train_reference, train_wrapper


def dwa_reference(temperature: float, period: int):
    """λ_k(t) = K·exp(w_k(t−1)/T) / Σ_i exp(w_i(t−1)/T), w_k(t−1) = L̄_k(t−1)/L̄_k(t−2), with L̄ the
    average loss over a period; λ = 1 for the first two periods (lorenmt/mtan's training loop)."""
    averages: list[list[float]] = []
    running: list[list[float]] = []

    def objective(losses: torch.Tensor, step: int):
        if len(averages) >= 2:
            ratios = [averages[-1][t] / averages[-2][t] for t in range(T)]
            e = [math.exp(r / temperature) for r in ratios]
            weights = torch.tensor([T * v / sum(e) for v in e], dtype=torch.float64)
        else:
            weights = torch.ones(T, dtype=torch.float64)
        running.append([float(v) for v in losses.detach().double()])
        if len(running) == period:
            averages.append([sum(column) / period for column in zip(*running)])
            running.clear()
        return (weights.float() * losses).sum(), weights

    return objective


@pytest.mark.parametrize("temperature, period", [(2.0, 1), (0.5, 1), (2.0, 4), (1.0, 7)])
def test_dwa_matches_the_paper_over_twenty_steps(temperature: float, period: int) -> None:
    ours = train_wrapper(lambda inner: gs.DWA(inner, temperature=temperature, period=period))
    assert_same_training(ours, train_reference(dwa_reference(temperature, period)))


@pytest.mark.parametrize("period", [1, 3])
def test_dwa_is_naive_summation_for_two_periods_then_weights_sum_to_t(period: int) -> None:
    _, weights, _ = train_wrapper(lambda inner: gs.DWA(inner, period=period))
    for step, w in enumerate(weights):
        if step < 2 * period:
            assert torch.equal(w, torch.ones(T, dtype=torch.float64))
        else:
            assert not torch.equal(w, torch.ones(T, dtype=torch.float64))
            assert abs(float(w.sum()) - T) <= 1e-6 and (w > 0).all()


def test_dwa_weights_the_task_whose_loss_fell_least() -> None:
    state = dwa_state(3, torch.device("cpu"))
    state["averages"] = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 0.8]], dtype=torch.float64)
    state["calls"] = torch.full((3,), 2.0, dtype=torch.float64)
    losses = torch.tensor([0.4, 0.9, 0.7], requires_grad=True)
    value, new_state = dwa_objective(losses, state=state, params={}, temperature=2.0, period=1)
    (w,) = torch.autograd.grad(value, losses)
    assert w.argmax() == 1 and w.argmin() == 0
    expected = 3 * torch.softmax(torch.tensor([0.5, 1.0, 0.8], dtype=torch.float64) / 2, 0)
    torch.testing.assert_close(w.double(), expected, rtol=1e-7, atol=0)
    # The period closed: the newest average moved to "older", this step's losses are the newest.
    torch.testing.assert_close(new_state["averages"], torch.tensor([[0.5, 1.0, 0.8], [0.4, 0.9, 0.7]], dtype=torch.float64))
    assert torch.equal(new_state["calls"], torch.full((3,), 3.0, dtype=torch.float64))
    assert torch.equal(state["calls"], torch.full((3,), 2.0, dtype=torch.float64))  # the input state is untouched


def test_dwa_mean_reduction_gives_weights_summing_to_one() -> None:
    _, mean, _ = train_wrapper(lambda inner: gs.DWA(inner, temperature=0.5, reduction="mean"), steps=4)
    assert torch.equal(mean[0], torch.full((T,), 1 / T, dtype=torch.float32).double())
    for w in mean:
        assert abs(float(w.sum()) - 1) <= 1e-6


@pytest.mark.parametrize(
    "name, value",
    [("temperature", 0.0), ("temperature", -2.0), ("temperature", float("nan")), ("period", 0), ("period", 1.5), ("period", True)],
)
def test_dwa_refuses_a_bad_option_naming_it(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
        gs.DWA(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), **{name: value})


def test_dwa_objective_reads_nothing_back() -> None:
    state = dwa_state(4, torch.device("cpu"))
    losses = torch.rand(4) + 0.1
    with ForbidHostReads():
        for _ in range(5):
            _, state = dwa_objective(losses, state=state, params={}, temperature=2.0, period=2)
    assert torch.equal(state["calls"], torch.full((4,), 5.0, dtype=torch.float64))
