"""Cheap modes: ``every=k`` (weights from a full step every k steps, one weighted backward between) and
``tasks_per_step=k`` (k − 1 drawn tasks and the others' pseudo-task), against plain PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F

from .plain import assert_grads, expected_grads

T = 5
METHODS = ("PCGrad", "CAGrad", "MGDA", "UPGrad", "NashMTL")


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(T))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() * (1 + t % 3) for t, head in enumerate(self.heads)]


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=gen), torch.randn(16, T, generator=gen)


def _make(name: str, model: nn.Module, lr: float = 0.05, **options) -> gs.GradSurgery:
    if name == "PCGrad":
        options.setdefault("seed", 1)
    return getattr(gs, name)(torch.optim.SGD(model.parameters(), lr=lr), **options)


@pytest.mark.parametrize("name", METHODS)
def test_every_1_is_the_full_step_bit_for_bit(name: str) -> None:
    a, b = Model(), Model()
    full, one = _make(name, a), _make(name, b, every=1)
    for step in range(3):
        for opt, model in ((full, a), (one, b)):
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", METHODS)
def test_every_k_reuses_the_weights_with_plain_heads(name: str) -> None:
    """Steps between refreshes: shared parameters Σ_t w_t ∇L_t with the refresh step's weights, heads their
    plain gradient; a refresh every k steps."""
    model = Model()
    opt = _make(name, model, every=3)
    refreshes = []
    for step in range(7):
        opt.zero_grad()
        x, y = _data(step)
        opt.backward(model.losses(x, y))
        refreshes.append(opt.refreshed)
        if not opt.refreshed:
            weights = opt.last_weights  # the refresh step's, reused
            params = list(model.parameters())
            expected = expected_grads(params, model.losses(x, y), lambda G: weights)
            assert_grads(params, expected, rtol=1e-5, atol=1e-7)
            assert opt.diagnostics()["refreshed"] is False
        opt.step()
    assert refreshes == [True, False, False, True, False, False, True]


def test_every_k_accumulates_the_weighted_backwards() -> None:
    model = Model()
    opt = _make("MGDA", model, every=2)
    opt.backward(model.losses(*_data(0)))
    opt.step()
    opt.zero_grad()
    weights = opt.last_weights
    opt.backward(model.losses(*_data(1)))
    opt.backward(model.losses(*_data(2)))
    assert not opt.refreshed
    params = list(model.parameters())
    summed = [a + b for a, b in zip(model.losses(*_data(1)), model.losses(*_data(2)))]
    assert_grads(params, expected_grads(params, summed, lambda G: weights), rtol=1e-5, atol=1e-7)


def test_a_task_with_a_zero_weight_keeps_its_plain_head_gradient() -> None:
    torch.manual_seed(0)
    trunk = nn.Parameter(torch.randn(4))
    heads = nn.ParameterList(nn.Parameter(torch.randn(4)) for _ in range(3))
    targets = torch.randn(3, 4)

    def losses() -> list[torch.Tensor]:  # task 2's gradient dominates: MGDA puts weight 0 on it
        scales = (1.0, 1.0, 30.0)
        return [(((trunk + h) - t) ** 2).sum() * s for h, t, s in zip(heads, targets, scales)]

    opt = gs.MGDA(torch.optim.SGD([trunk, *heads], lr=0.0), every=2)
    opt.backward(losses())
    opt.zero_grad()
    opt.backward(losses())
    assert not opt.refreshed
    plain = torch.autograd.grad(losses()[2], heads[2])[0]
    torch.testing.assert_close(heads[2].grad, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_tasks_per_step_T_is_the_full_method(name: str) -> None:
    a, b = Model(), Model()
    full, drawn = _make(name, a), _make(name, b, tasks_per_step=T)
    for step in range(3):
        for opt, model in ((full, a), (drawn, b)):
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", ["CAGrad", "MGDA", "Sum"])
def test_tasks_per_step_k_is_the_method_on_the_drawn_tasks_and_the_mean_of_the_others(name: str) -> None:
    model = Model()
    opt = _make(name, model, tasks_per_step=3)
    weights_of = {
        "CAGrad": F.cagrad_weights,
        "MGDA": F.mgda_weights,
        "Sum": lambda G: torch.ones(G.shape[0], dtype=torch.float64),
    }[name]
    for step in range(3):
        opt.zero_grad()
        x, y = _data(step)
        opt.backward(model.losses(x, y))
        slots = opt.last_slots
        assert sorted(t for slot in slots for t in slot) == list(range(T)) and len(slots) == 3
        losses = model.losses(x, y)
        rows = [sum(losses[t] for t in slot) for slot in slots]  # the last: the sum of the others
        m = len(slots[-1])

        def weights(G: torch.Tensor) -> torch.Tensor:
            scale = torch.ones(G.shape[0], dtype=torch.float64)
            scale[-1] = 1.0 / m  # the mean of the others chooses the weights
            return weights_of(G * scale[:, None] * scale[None, :])

        params = list(model.trunk.parameters())
        expected = expected_grads(params, rows, weights, shared=params)
        assert_grads(params, expected, rtol=1e-4, atol=1e-6)
        for t, head in enumerate(model.heads):  # every head: its plain gradient
            for p, g in zip(head.parameters(), torch.autograd.grad(losses[t], list(head.parameters()), retain_graph=True)):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        opt.step()


@pytest.mark.parametrize("options", [{"every": 3}, {"tasks_per_step": 2}, {"every": 2, "tasks_per_step": 3}])
def test_a_checkpoint_in_the_middle_of_a_period_resumes_bit_identically(options: dict) -> None:
    def run(model: Model, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()

    model = Model()
    opt = _make("MGDA", model, **options)
    run(model, opt, range(4))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(4, 9))
    resumed = Model()
    resumed.load_state_dict(saved[0])
    torch.manual_seed(12345)  # another draw for the fresh wrapper's generator: the checkpoint must restore it
    opt2 = _make("MGDA", resumed, **options)
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, range(4, 9))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_representation_mode_with_every() -> None:
    model = Model()
    opt = _make("MGDA", model, every=2)
    for step in range(3):
        opt.zero_grad()
        x, y = _data(step)
        z = model.trunk(x)
        losses = [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]
        opt.backward(losses, features=z)
        if not opt.refreshed:
            w = opt.last_weights
            params = list(model.parameters())
            z = model.trunk(x)
            again = [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]
            assert_grads(params, expected_grads(params, again, lambda G: w), rtol=1e-5, atol=1e-7)
        opt.step()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: gs.MGDA(torch.optim.SGD(p, lr=0.1), every=0), "every"),
        (lambda p: gs.MGDA(torch.optim.SGD(p, lr=0.1), every=1.5), "every"),
        (lambda p: gs.MGDA(torch.optim.SGD(p, lr=0.1), tasks_per_step=0), "tasks_per_step"),
        (lambda p: gs.GradDrop(torch.optim.SGD(p, lr=0.1), every=2), "no weights to reuse"),
        (lambda p: gs.GradVac(torch.optim.SGD(p, lr=0.1), tasks_per_step=2), "tasks_per_step"),
        (lambda p: gs.UW(torch.optim.SGD(p, lr=0.1), num_tasks=T, every=2), "every"),
    ],
    ids=["every-0", "every-float", "tasks-0", "graddrop-every", "gradvac-tasks", "uw-every"],
)
def test_bad_cheap_options_are_refused_at_construction(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(list(Model().parameters()))


def test_more_drawn_tasks_than_losses_is_refused_before_anything_changes() -> None:
    model = Model()
    opt = _make("MGDA", model, tasks_per_step=T + 1)
    with pytest.raises(ValueError, match=f"tasks_per_step={T + 1}"):
        opt.backward(model.losses(*_data(0)))
    assert all(p.grad is None for p in model.parameters())
