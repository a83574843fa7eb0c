"""``torch.compile``d models: the compiled graph fuses heads and trunk into one node, so which
parameters are shared is read off the first step's values (gradsurgery.sharing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs

from .plain import METHODS, assert_grads, expected_grads, weights_of, wrapper

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


@pytest.fixture(scope="module")
def compiled() -> tuple[Model, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Model()
    return model, torch.compile(model), {k: v.clone() for k, v in model.state_dict().items()}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)


@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_model_gets_the_eager_update(method: str, compiled) -> None:
    model, fast, initial = compiled
    model.load_state_dict(initial)
    x, y = _data()
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        opt.zero_grad()
        opt.backward(((fast(x) - y) ** 2).mean(0))
        params = list(model.parameters())
        eager = [((out - target) ** 2).mean() for out, target in zip(model(x).unbind(1), y.unbind(1))]
        if method != "PCGrad" or _ == 0:  # PCGrad's generator moves on after the first step
            assert_grads(params, expected_grads(params, eager, weights_of(method)), rtol=1e-4, atol=1e-6)
        assert {id(p) for p in opt._buffer.params} == {id(p) for p in model.trunk.parameters()}
        opt.step()
    model.load_state_dict(initial)


def test_a_backward_compiled_for_one_pass_is_refused_clearly() -> None:
    x, y = _data()
    donated = torch._functorch.config.donated_buffer
    torch._functorch.config.donated_buffer = True
    try:
        torch.manual_seed(1)
        other = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))  # a graph compiled nowhere else
        other_fast = torch.compile(other)
        ((other_fast(x) - y) ** 2).mean().backward()  # compiles the backward for a single pass
        other.zero_grad()
        opt = gs.MGDA(torch.optim.SGD(other.parameters(), lr=0.1))
        with pytest.raises(ValueError, match="donated_buffer = False"):
            opt.backward(((other_fast(x) - y) ** 2).mean(0))
        assert all(p.grad is None for p in other.parameters())
    finally:
        torch._functorch.config.donated_buffer = donated


def test_a_compiled_training_step_keeps_the_wrapper_state_and_breaks_the_graph_once_for_backward() -> None:
    """``torch.compile`` of a whole step (forward, ``opt.backward``, ``opt.step``): the wrapper's backward
    runs eagerly (``torch.autograd.grad`` per task is not traced), the rest compiles; the state the
    wrapper keeps (last Gram matrix, weights, diagnostics) is the eager step's."""

    def make() -> tuple[Model, gs.GradSurgery]:
        torch.manual_seed(2)
        model = Model()
        return model, gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))

    def step(model: Model, opt: gs.GradSurgery, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = ((model(x) - y) ** 2).mean(0)
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        return losses.detach()

    x, y = _data()
    model, opt = make()
    explanation = torch._dynamo.explain(step)(model, opt, x, y)
    assert explanation.graph_break_count <= 2, [str(b.reason)[:80] for b in explanation.break_reasons]
    eager_model, eager_opt = make()
    fast_model, fast_opt = make()
    fast = torch.compile(step, backend="eager")
    for _ in range(3):
        step(eager_model, eager_opt, x, y)
        fast(fast_model, fast_opt, x, y)
    for p, q in zip(eager_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast_opt.last_weights, eager_opt.last_weights)
    assert fast_opt.diagnostics(flat=True).keys() == eager_opt.diagnostics(flat=True).keys()


def test_a_recompile_for_a_new_batch_size_is_refused_with_the_fix() -> None:
    """A smaller last batch recompiles the model: that graph's backward is built for a single pass too.
    The refusal names the cause and the fix (static shapes, donated_buffer off), before any gradient."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    forward = torch.compile(lambda x: [head(trunk(x)).squeeze(-1) for head in heads])
    opt = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1))
    gen = torch.Generator().manual_seed(0)
    for size in (8, 8, 6):
        x, y = torch.randn(size, 5, generator=gen), torch.randn(size, 3, generator=gen)
        losses = [nn.functional.mse_loss(out, y[:, t]) for t, out in enumerate(forward(x))]
        opt.zero_grad()
        if size == 6:
            with pytest.raises(ValueError, match="recompiled for a new input shape.*keep input shapes static"):
                opt.backward(losses)
            assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
        else:
            opt.backward(losses)
            opt.step()
