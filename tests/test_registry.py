"""Every method of ``gradsurgery.methods.REGISTRY`` through the machinery generated from its spec: the
wrapper against the method's own math on per-task ``torch.autograd.grad`` gradients, the functional
pair, option checks, checkpoints, representation mode, signatures and citations.

A method added to the registry is tested here without another line."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F
from gradsurgery.methods import REGISTRY
from gradsurgery.methods.spec import Method

from .helpers import make_J
from .plain import assert_grads, expected_grads
from .test_no_sync import ForbidHostReads

METHODS = {method.name: method for method in REGISTRY if method.loss is None}  # gradient methods
LOSS_METHODS = {method.name: method for method in REGISTRY if method.loss is not None}
FUNCTIONAL = [m for m in REGISTRY if m.function is not None]
GRAM_SPACE = [m for m in FUNCTIONAL if m.combine is None]


def _wrapper(method: Method, optimizer: torch.optim.Optimizer, **options) -> gs.GradSurgery:
    if method.random:
        options.setdefault("seed", 5)
    return getattr(gs, method.name)(optimizer, **options)


def _reference_weights(method: Method):
    """The method's weights for a Gram matrix on the wrapper's first step (same seed, fresh state)."""
    if method.combine is not None or method.function is None:
        return None
    weights = getattr(F, f"{method.function}_weights")
    extra = {"generator": torch.Generator().manual_seed(5)} if method.random else {}
    reduction = dict(method.fixed).get("reduction", "sum")

    def of(G: torch.Tensor) -> torch.Tensor:
        w = weights(G, reduction=reduction, **extra)
        return w[0] if method.state is not None else w

    return of


class Model(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(tasks))

    def losses(self, x: torch.Tensor, y: torch.Tensor, *, features: bool = False):
        z = self.trunk(x)
        losses = [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(self.heads)]
        return (z, losses) if features else losses


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)


@pytest.mark.parametrize("name", METHODS)
def test_the_wrapper_applies_the_method_to_the_shared_gradients(name: str) -> None:
    method = METHODS[name]
    model = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data()
    opt.backward(model.losses(x, y))
    params = list(model.parameters())
    if method.combine is not None:  # elementwise: the functional call on the same J, same seed
        per_task = [torch.autograd.grad(loss, list(model.trunk.parameters()), retain_graph=True) for loss in model.losses(x, y)]
        J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in per_task])
        d = getattr(F, method.function)(J, generator=torch.Generator().manual_seed(5))
        got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
        torch.testing.assert_close(got, d, rtol=1e-5, atol=1e-6)
        return
    weights = _reference_weights(method) or (lambda G: torch.full((G.shape[0],), 1.0 / (3 if name == "Mean" else 1), dtype=torch.float64))
    assert_grads(params, expected_grads(params, model.losses(x, y), weights), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", GRAM_SPACE, ids=lambda m: m.name)
@pytest.mark.parametrize("kind", ["conflicting", "rank_deficient", "zero_row"])
def test_the_functional_pair_agrees(method: Method, kind: str) -> None:
    J = make_J(kind, 4, 9)
    extra = lambda: {"generator": torch.Generator().manual_seed(1)} if method.random else {}  # noqa: E731
    d = getattr(F, method.function)(J, **extra())
    w = getattr(F, f"{method.function}_weights")(J @ J.T, **extra())
    if method.state is not None:
        d, w = d[0], w[0]
    torch.testing.assert_close(d, w @ J, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("method", GRAM_SPACE, ids=lambda m: m.name)
@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_the_weights_never_read_a_value_back(method: Method, T: int) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    extra = {"generator": torch.Generator().manual_seed(0)} if method.random else {}
    if method.state is not None:
        extra["state"] = method.state.init(T, G.device)
    if method.uses_losses(method.defaults()):
        extra["losses"] = torch.ones(T, dtype=torch.float64)
    with ForbidHostReads():
        method.weights(G, reduction="sum", **method.defaults(), **extra)


@pytest.mark.parametrize("name", [m.name for m in REGISTRY if m.options])
def test_a_bad_option_is_refused_at_construction_naming_it(name: str) -> None:
    method = {**METHODS, **LOSS_METHODS}[name]
    for option in method.options:
        with pytest.raises((ValueError, TypeError), match=option.name):
            _wrapper(method, torch.optim.SGD(Model().parameters(), lr=0.1), **{option.name: "bogus-value"})


@pytest.mark.parametrize("name", METHODS)
def test_an_unknown_option_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="unexpected"):
        _wrapper(METHODS[name], torch.optim.SGD(Model().parameters(), lr=0.1), nonsense=1)


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
    run(model, opt, range(2))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(2, 5))
    resumed = Model()
    resumed.load_state_dict(saved[0])
    options = {"seed": 999} if method.random else {}
    opt2 = _wrapper(method, torch.optim.Adam(resumed.parameters(), lr=0.01), **options)
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, range(2, 5))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.state is not None])
def test_a_stateful_method_refuses_a_checkpoint_for_another_number_of_tasks(name: str) -> None:
    method = METHODS[name]
    model = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(*_data()))
    saved = opt.state_dict()
    other = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    other.backward(model.losses(*_data())[:2])
    with pytest.raises(ValueError, match="tasks"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("name", METHODS)
def test_representation_mode(name: str) -> None:
    method = METHODS[name]
    model = Model()
    reference = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data()
    z, losses = model.losses(x, y, features=True)
    opt.backward(losses, features=z)
    z, losses = reference.losses(x, y, features=True)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    if method.combine is not None:
        combined = getattr(F, method.function)(rows, generator=torch.Generator().manual_seed(5))
    else:
        weights = _reference_weights(method) or (lambda G: torch.full((3,), 1.0 / (3 if name == "Mean" else 1), dtype=torch.float64))
        combined = weights(rows.double() @ rows.double().T).float() @ rows
    expected = torch.autograd.grad(z, list(reference.trunk.parameters()), grad_outputs=combined.view_as(z), retain_graph=True)
    for p, g in zip(model.trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    for t, head in enumerate(model.heads):
        plain = torch.autograd.grad(losses[t], list(reference.heads[t].parameters()), retain_graph=True)
        for p, g in zip(head.parameters(), plain):
            torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("name", METHODS)
def test_signature_docs_and_citation(name: str) -> None:
    method = METHODS[name]
    cls = getattr(gs, name)
    parameters = inspect.signature(cls).parameters
    for option in method.options:
        assert parameters[option.name].default == option.default
    assert "nonfinite" in parameters and "shared" in parameters
    assert method.summary() in (cls.__doc__ or "")
    if method.bibtex:
        assert method.bibtex in gs.bibtex()
        assert gs.bibtex(name) == method.bibtex
    if method.function is not None:
        function_parameters = inspect.signature(getattr(F, method.function)).parameters
        assert all(option.name in function_parameters for option in method.options)


def test_elementwise_and_stateful_methods_refuse_the_sync_modes_they_cannot_serve() -> None:
    params = Model().parameters()
    with pytest.raises(ValueError, match='sync="sharded"'):
        gs.GradDrop(torch.optim.SGD(params, lr=0.1), sync="sharded")
    with pytest.raises(ValueError, match='sync="local"'):
        gs.GradVac(torch.optim.SGD(Model().parameters(), lr=0.1), sync="local")


@pytest.mark.parametrize("method", GRAM_SPACE, ids=lambda m: m.name)
def test_the_wrapper_carries_the_generator_and_the_state_from_step_to_step(method: Method) -> None:
    """Over several steps, each step's weights are the method's for that step's Gram matrix with the
    generator and the state carried along (an independent generator, seeded alike)."""
    model = Model()
    opt = _wrapper(method, torch.optim.SGD(model.parameters(), lr=0.05))
    weights = getattr(F, f"{method.function}_weights")
    generator = torch.Generator().manual_seed(5)
    state = None
    for step in range(4):
        opt.zero_grad()
        opt.backward(model.losses(*_data(step)))
        extra = {"generator": generator} if method.random else {}
        if method.state is not None:
            expected, state = weights(opt.last_gram, state=state, **extra)
        else:
            expected = weights(opt.last_gram, **extra)
        assert torch.equal(opt.last_weights, expected), step
        opt.step()


def test_a_method_of_your_own_is_a_few_lines() -> None:
    """The README's recipe: a spec (weights from G, an option) given to ``gs.wrapper_class``."""
    from gradsurgery.methods.spec import Method, Option, finite_number

    def inverse_norm_weights(G: torch.Tensor, *, power: float, reduction: str = "sum") -> torch.Tensor:
        return G.diagonal().to(torch.float64).clamp_min(1e-30) ** (-power / 2)  # w_t = ‖g_t‖^(−power)

    InverseNorm = gs.wrapper_class(
        Method("InverseNorm", None, inverse_norm_weights, doc="Each task's gradient divided by its norm to a power.",
               options=(Option("power", 1.0, finite_number("power", low=0.0), "the exponent"),))
    )
    model = Model()
    opt = InverseNorm(torch.optim.SGD(model.parameters(), lr=0.1), power=1.0)
    opt.backward(model.losses(*_data()))
    params = list(model.parameters())
    expected = expected_grads(params, model.losses(*_data()), lambda G: G.diagonal() ** -0.5)
    assert_grads(params, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="power"):
        InverseNorm(torch.optim.SGD(model.parameters(), lr=0.1), power=-1.0)


def test_a_subclass_is_a_method_too() -> None:
    class Halves(gs.GradSurgery):
        uses_loss_values = False

        def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
            return torch.full((G.shape[0],), 0.5, dtype=torch.float64, device=G.device)

    model = Model()
    opt = Halves(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(*_data()))
    params = list(model.parameters())
    expected = expected_grads(params, model.losses(*_data()), lambda G: torch.full((G.shape[0],), 0.5, dtype=torch.float64))
    assert_grads(params, expected, rtol=1e-5, atol=1e-7)
