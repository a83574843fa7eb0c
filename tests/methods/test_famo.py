"""FAMO through the wrapper against a transcription of the official code (Cranial-XIX/FAMO, famo.py:
get_weighted_loss, update with torch.optim.Adam), fed the next step's losses as "after"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradsurgery as gs
from gradsurgery.methods.famo import famo_objective, famo_state

from ..test_no_sync import ForbidHostReads
from .loss_training import T, assert_same_training, train_reference, train_wrapper


class FamoReference:
    """The official FAMO class (min_losses = 0), on the sum scale (× T), float64 logits."""

    def __init__(self, n_tasks: int, w_lr: float, gamma: float) -> None:
        self.w = torch.zeros(n_tasks, dtype=torch.float64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)
        self.prev_loss: torch.Tensor | None = None

    def update(self, curr_loss: torch.Tensor) -> None:
        delta = (self.prev_loss + 1e-8).log() - (curr_loss + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()

    def __call__(self, losses: torch.Tensor, step: int):
        current = losses.detach().double()
        if self.prev_loss is not None:
            self.update(current)  # the wrapper's "after": this step's losses
        self.prev_loss = current
        z = F.softmax(self.w, -1).detach()
        D = losses.double() + 1e-8
        c = (z / D).sum().detach()
        loss = (D.log() * z / c).sum() * T
        return loss, T * z / (c * D.detach())


@pytest.mark.parametrize("w_lr, gamma", [(0.025, 0.001), (0.3, 0.0), (0.1, 0.01)])
def test_famo_matches_the_official_update_over_twenty_steps(w_lr: float, gamma: float) -> None:
    ours = train_wrapper(lambda inner: gs.FAMO(inner, w_lr=w_lr, gamma=gamma))
    reference = FamoReference(T, w_lr, gamma)
    assert_same_training(ours, train_reference(reference))
    _, _, opt = ours
    # The logits see the float32 losses: they agree to what those do.
    torch.testing.assert_close(opt._outcome.method_state["logits"], reference.w.detach(), rtol=1e-6, atol=1e-9)


def test_famo_starts_uniform_and_weights_sum_to_t() -> None:
    _, weights, opt = train_wrapper(lambda inner: gs.FAMO(inner, w_lr=0.3))
    for w in weights:
        assert abs(float(w.sum()) - T) <= 1e-5 and (w > 0).all()
    _, mean, _ = train_wrapper(lambda inner: gs.FAMO(inner, w_lr=0.3, reduction="mean"))
    for w in mean:  # the official scale
        assert abs(float(w.sum()) - 1) <= 1e-6 and (w > 0).all()


def test_famo_raises_the_logit_of_the_task_that_fell_least() -> None:
    state = famo_state(3, torch.device("cpu"))
    state["calls"] = torch.ones(3, dtype=torch.float64)  # the second call: the logits take a step
    state["previous"] = torch.ones(3, dtype=torch.float64)
    losses = torch.tensor([0.5, 0.99, 0.7], requires_grad=True)  # task 1 barely fell
    value, new_state = famo_objective(losses, state=state, params={}, w_lr=0.025, gamma=0.0)
    logits = new_state["logits"]
    assert logits.argmax() == 1 and logits.argmin() == 0
    # Adam's first step moves each logit by lr·|g|/(|g| + eps) against its gradient g (bias-corrected moments).
    z0 = torch.full((3,), 1 / 3, dtype=torch.float64)
    delta = torch.log(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) + 1e-8) - torch.log(losses.detach().double() + 1e-8)
    g = z0 * (delta - (z0 * delta).sum())
    torch.testing.assert_close(logits, -0.025 * g / (g.abs() + 1e-8), rtol=1e-12, atol=0)
    (w,) = torch.autograd.grad(value, losses)
    z = torch.softmax(logits, 0)
    expected = 3 * z / (z / (losses.detach().double() + 1e-8)).sum() / (losses.detach().double() + 1e-8)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(state["logits"], torch.zeros(3, dtype=torch.float64))  # the input state is untouched


def test_famo_refuses_a_loss_that_is_not_positive_naming_the_task() -> None:
    model = torch.nn.Linear(2, 3)
    opt = gs.FAMO(torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(torch.ones(1, 2)).squeeze(0)
    losses = [out[0] ** 2 + 1, out[1] * 0.0, out[2] ** 2 + 1]
    with pytest.raises(ValueError, match=r"FAMO takes the logarithm .* loss\(es\) \[1\]"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    assert opt._outcome.method_state is None


@pytest.mark.parametrize(
    "name, value", [("w_lr", 0.0), ("w_lr", -0.1), ("w_lr", float("inf")), ("gamma", -1e-3), ("gamma", float("nan"))]
)
def test_famo_refuses_a_bad_option_naming_it(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be .*got {value!r}"):
        gs.FAMO(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), **{name: value})


def test_famo_objective_reads_nothing_back() -> None:
    state = famo_state(4, torch.device("cpu"))
    with ForbidHostReads():
        for step in range(4):
            _, state = famo_objective(torch.rand(4) + 0.1, state=state, params={}, w_lr=0.025, gamma=0.001)
    assert torch.equal(state["calls"], torch.full((4,), 4.0, dtype=torch.float64))
