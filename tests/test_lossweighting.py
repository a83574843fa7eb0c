"""Loss-weighting methods through the wrapper: one backward of the method's objective, ``.grad`` as
that backward writes it, the learnable parameters in the inner optimizer, checkpoints, refusals.

Each method's own math is tested against a hand-written reference of its paper in
``tests/methods/test_<method>.py``; what is checked here holds for every loss-weighting method of
the registry."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.methods import REGISTRY
from gradsurgery.methods.spec import Method

METHODS = {method.name: method for method in REGISTRY if method.loss is not None}
T = 3


def _wrapper(method: Method, optimizer: torch.optim.Optimizer, **options) -> gs.GradSurgery:
    if method.random:
        options.setdefault("seed", 5)
    if method.loss is not None and method.loss.learnable is not None:
        options.setdefault("num_tasks", T)
    return getattr(gs, method.name)(optimizer, **options)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(T))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() * (t + 1) for t, head in enumerate(self.heads)]


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.randn(16, T, generator=gen)


@pytest.mark.parametrize("name", METHODS)
def test_one_backward_of_the_objective_with_its_effective_weights(name: str) -> None:
    """``.grad`` of every parameter is ``Σ_t w_t ∇L_t`` with ``w`` the weights the wrapper reports
    (``∂objective/∂L_t``), computed here from per-task ``torch.autograd.grad``."""
    method = METHODS[name]
    model = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(3):
        opt.zero_grad()
        x, y = _data(step)
        opt.backward(model.losses(x, y))
        w = opt.last_weights
        params = list(model.parameters())
        per_task = [
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
            for loss in model.losses(x, y)
        ]
        for i, p in enumerate(params):
            expected = sum(float(w[t]) * per_task[t][i] for t in range(T))
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
        opt.step()


@pytest.mark.parametrize("name", METHODS)
def test_a_checkpoint_resumes_bit_identically(name: str) -> None:
    method = METHODS[name]

    def run(model: Model, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()

    model = Model()
    opt = _wrapper(method, torch.optim.Adam(model.parameters(), lr=0.01))
    run(model, opt, range(3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(3, 6))
    resumed = Model()
    resumed.load_state_dict(saved[0])
    opt2 = _wrapper(method, torch.optim.Adam(resumed.parameters(), lr=0.01), **({"seed": 99} if method.random else {}))
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for key, value in getattr(opt, "learned", {}).items():
        assert torch.equal(value, opt2.learned[key])


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.loss.learnable is not None])
def test_learnable_parameters_join_the_inner_optimizer(name: str) -> None:
    method = METHODS[name]
    model = Model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt = _wrapper(method, inner)
    learned = list(opt.learned.values())
    assert any(
        {id(p) for p in learned} <= {id(q) for q in group["params"]} and group["weight_decay"] == 0.0 for group in inner.param_groups
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in learned]
    opt.zero_grad()
    opt.backward(model.losses(*_data()))
    assert all(p.grad is not None for p in learned)
    opt.step()
    scheduler.step()
    assert all(group["lr"] == 0.005 for group in inner.param_groups)
    assert any(not torch.equal(p, q) for p, q in zip(learned, before))
    with pytest.raises(ValueError, match="num_tasks"):
        getattr(gs, name)(torch.optim.SGD(Model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="num_tasks=3"):
        opt.backward(model.losses(*_data())[:2])


@pytest.mark.parametrize("name", METHODS)
def test_with_grad_scaler(name: str) -> None:
    """``opt.backward(losses, scaler=scaler)`` scales the objective, not the losses: the steps equal the
    unscaled ones (a power-of-two scale: exact up to the order of the operations)."""
    method = METHODS[name]
    model, reference = Model(), Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    plain = _wrapper(method, torch.optim.SGD(reference.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        opt.zero_grad()
        opt.backward(model.losses(*_data(step)), scaler=scaler)
        scaler.step(opt)
        scaler.update()
        plain.zero_grad()
        plain.backward(reference.losses(*_data(step)))
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_refusals_before_anything_changes(name: str) -> None:
    method = METHODS[name]
    model = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data()
    nan = model.losses(x, y)
    nan[1] = nan[1] * float("nan")
    with pytest.raises(gs.NonFiniteGradientError) as error:
        opt.backward(nan)
    assert error.value.tasks == [1]
    assert all(p.grad is None for p in model.parameters())
    positive = method.loss.positive
    if positive(method.defaults()) if callable(positive) else positive:
        zero = model.losses(x, y)
        zero[2] = zero[2] * 0.0
        with pytest.raises(ValueError, match=r"loss\(es\) \[2\]"):
            opt.backward(zero)
        assert all(p.grad is None for p in model.parameters())
    for option in ("shared", "engine", "storage_dtype", "sync"):
        with pytest.raises(ValueError, match=option):
            _wrapper(method, torch.optim.SGD(Model().parameters(), lr=0.1), **{option: None})
    with pytest.raises(ValueError, match="features"):
        opt.backward(model.losses(x, y), features=model.trunk(x))


@pytest.mark.parametrize("name", METHODS)
def test_signature_docs_and_citation(name: str) -> None:
    method = METHODS[name]
    cls = getattr(gs, name)
    parameters = inspect.signature(cls).parameters
    for option in method.options:
        assert parameters[option.name].default == option.default
    assert "shared" not in parameters and "nonfinite" in parameters
    assert method.summary() in (cls.__doc__ or "")
    assert gs.bibtex(name) == method.bibtex
