"""STCH through the wrapper against the smooth Tchebycheff scalarization written plainly (Lin et al.
2024: μ·log Σ exp((f_t − z*_t)/μ), stabilised by its maximum as the official code does) on the sum
scale (× T, the official MTL code's factor), and the official MTL recipe (Xi-L/STCH's STCH.py: Σ log L
while warming up, the warm-up's mean loss as nadir, then STCH on log(L/nadir)), its warm-up in steps."""

from __future__ import annotations

import math

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods.stch import stch_objective, stch_state

from ..test_no_sync import ForbidHostReads
from .loss_training import T, assert_same_training, train_reference, train_wrapper


def stch_reference(mu: float, ideal: str, warmup: int):
    minimum = [math.inf] * T
    warmup_sum = torch.zeros(T, dtype=torch.float64)

    def objective(losses: torch.Tensor, step: int):
        nonlocal warmup_sum
        L = losses.double()
        for t in range(T):
            minimum[t] = min(minimum[t], float(L[t].detach()))
        if step < warmup:
            warmup_sum = warmup_sum + L.detach()
            return torch.log(L).sum(), 1 / L.detach()
        if warmup:
            reference = torch.tensor(minimum, dtype=torch.float64) if ideal == "running_min" else warmup_sum / warmup
            f = torch.log(L / reference)
        else:
            f = L - torch.tensor(minimum, dtype=torch.float64) if ideal == "running_min" else L
        top = f.detach().max()
        value = T * (mu * torch.log(torch.exp((f - top) / mu).sum()) + top)
        e = [math.exp(float((v - top) / mu)) for v in f.detach()]
        weights = torch.tensor([T * v / sum(e) for v in e], dtype=torch.float64)
        return value, weights / L.detach() if warmup else weights

    return objective


@pytest.mark.parametrize(
    "mu, ideal, warmup", [(1.0, "zero", 0), (0.3, "running_min", 0), (2.0, "zero", 0), (1.0, "zero", 5), (0.5, "running_min", 5)]
)
def test_stch_matches_the_paper_over_twenty_steps(mu: float, ideal: str, warmup: int) -> None:
    # On the raw losses nearly all the weight (up to T) goes to the largest loss (task 2, scaled by 5):
    # a smaller step keeps that training stable.
    lr = 0.05 if warmup else 0.01
    ours = train_wrapper(lambda inner: gs.STCH(inner, mu=mu, ideal=ideal, warmup=warmup), lr=lr)
    assert_same_training(ours, train_reference(stch_reference(mu, ideal, warmup), lr=lr))


def test_stch_is_naive_summation_at_equal_shifted_losses_and_the_maximum_as_mu_vanishes() -> None:
    state = stch_state(4, torch.device("cpu"))
    equal = torch.full((4,), 0.7, requires_grad=True)
    (w,) = torch.autograd.grad(stch_objective(equal, state=state, params={}, mu=0.1, ideal="zero", warmup=0)[0], equal)
    torch.testing.assert_close(w, torch.ones(4), rtol=1e-6, atol=0)
    losses = torch.tensor([0.2, 1.5, 1.4, 0.1], requires_grad=True)
    (sharp,) = torch.autograd.grad(stch_objective(losses, state=state, params={}, mu=1e-3, ideal="zero", warmup=0)[0], losses)
    torch.testing.assert_close(sharp, torch.tensor([0.0, 4.0, 0.0, 0.0]), rtol=0, atol=1e-6)  # all on the worst task
    (flat,) = torch.autograd.grad(stch_objective(losses, state=state, params={}, mu=1e6, ideal="zero", warmup=0)[0], losses)
    torch.testing.assert_close(flat, torch.ones(4), rtol=0, atol=1e-5)


def test_stch_warm_up_then_nadir() -> None:
    _, weights, opt = train_wrapper(lambda inner: gs.STCH(inner, warmup=4), steps=6)
    state = opt._outcome.method_state
    assert torch.equal(state["calls"], torch.full((T,), 6.0, dtype=torch.float64))
    assert (state["warmup_sum"] > 0).all()
    for w in weights[4:]:  # T·softmax(log(L/n)/μ)_t / L_t: in log space the weights sum to T
        assert (w > 0).all()


def test_stch_with_warm_up_refuses_a_loss_that_is_not_positive() -> None:
    model = torch.nn.Linear(2, 3)
    opt = gs.STCH(torch.optim.SGD(model.parameters(), lr=0.1), warmup=3)
    out = model(torch.ones(1, 2)).squeeze(0)
    with pytest.raises(ValueError, match=r"loss\(es\) \[1\] are ≤ 0"):
        opt.backward([out[0] ** 2 + 1, out[1] * 0.0, out[2] ** 2 + 1])
    assert all(p.grad is None for p in model.parameters())
    assert opt._outcome.method_state is None


@pytest.mark.parametrize(
    "name, value",
    [("mu", 0.0), ("mu", -1.0), ("mu", float("inf")), ("ideal", "nadir"), ("warmup", -1), ("warmup", 2.5), ("warmup", True)],
)
def test_stch_refuses_a_bad_option_naming_it(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be .*{value!r}"):
        gs.STCH(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), **{name: value})


@pytest.mark.parametrize("warmup", [0, 2])
def test_stch_objective_reads_nothing_back(warmup: int) -> None:
    state = stch_state(4, torch.device("cpu"))
    with ForbidHostReads():
        for _ in range(4):
            _, state = stch_objective(torch.rand(4) + 0.1, state=state, params={}, mu=0.5, ideal="running_min", warmup=warmup)
