"""What ``loss.backward()`` does beyond the wrapped optimizer's parameters, and the first step's reading
of which parameters are shared: each case against plain PyTorch.

- leaves the optimizer does not hold (a second optimizer's embedding, an input with ``requires_grad``,
  learnable loss weights elsewhere) get the plain gradient, as ``sum(losses).backward()`` gives it;
- post-accumulate-grad hooks run once per ``backward``, on the final ``.grad``;
- a gradient a tensor hook kept is not aliased by ``.grad``;
- a non-finite loss value is refused where the method reads the values;
- a checkpoint carries the shared set read off the first step's values;
- a first step that leaves that reading open says so.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F
from gradsurgery.errors import NonFiniteGradientError

from .plain import METHODS, assert_grads, expected_grads, weights_of, wrapper


class Tagger(nn.Module):
    """Token embeddings (trained by their own optimizer), a shared trunk, one head per task."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 6)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def losses(self, tokens: torch.Tensor, y: torch.Tensor, shift: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = self.embedding(tokens)
        if shift is not None:
            x = x + shift
        z = self.trunk(x)
        return [((head(z).squeeze(-1) - y[t]) ** 2).mean() for t, head in enumerate(self.heads)]

    def wrapped(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]


def _batch(tasks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (10,), generator=generator), torch.randn(tasks, 10, generator=generator)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_leaves_the_optimizer_does_not_hold_get_their_plain_gradient(method: str, engine: str) -> None:
    tokens, y = _batch()
    plain = Tagger()
    shift = torch.zeros(10, 6, requires_grad=True)
    sum(plain.losses(tokens, y, shift)).backward()

    model = Tagger()
    mine = torch.zeros(10, 6, requires_grad=True)
    opt = wrapper(method, torch.optim.SGD(model.wrapped(), lr=0.1), engine=engine)
    sparse_side = torch.optim.SGD(model.embedding.parameters(), lr=0.1)  # the second optimizer
    losses = model.losses(tokens, y, mine)
    expected = expected_grads(model.wrapped(), losses, weights_of(method))
    opt.backward(losses)

    assert model.embedding.weight.grad is not None and mine.grad is not None
    torch.testing.assert_close(model.embedding.weight.grad, plain.embedding.weight.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine.grad, shift.grad, rtol=1e-6, atol=1e-7)
    assert_grads(model.wrapped(), expected, rtol=1e-5, atol=1e-6)
    sparse_side.step()  # the embedding trains
    assert not torch.equal(model.embedding.weight, plain.embedding.weight)


def test_leaves_beyond_the_optimizer_in_every_path() -> None:
    """Representation mode, the steps between refreshes of every=, loss weighting (which gives them its
    objective's gradient, as objective.backward() would) and accumulation."""
    tokens, y = _batch()
    reference = Tagger()
    sum(reference.losses(tokens, y)).backward()
    plain = reference.embedding.weight.grad
    assert plain is not None

    for build in (
        lambda params: gs.MGDA(torch.optim.SGD(params, lr=0.0)),
        lambda params: gs.PCGrad(torch.optim.SGD(params, lr=0.0), every=2, seed=0),
    ):
        model = Tagger()
        opt = build(model.wrapped())
        for refreshing in (True, False):  # with every=2: a refresh, then a weighted step
            opt.zero_grad()
            model.embedding.zero_grad()
            opt.backward(model.losses(tokens, y))
            opt.step()
            assert model.embedding.weight.grad is not None
            torch.testing.assert_close(model.embedding.weight.grad, plain, rtol=1e-6, atol=1e-7)

    model = Tagger()
    opt = gs.MGDA(torch.optim.SGD(model.wrapped(), lr=0.1))
    x = model.embedding(tokens)
    z = model.trunk(x)
    opt.backward([((head(z).squeeze(-1) - y[t]) ** 2).mean() for t, head in enumerate(model.heads)], features=z)
    assert model.embedding.weight.grad is not None
    torch.testing.assert_close(model.embedding.weight.grad, plain, rtol=1e-6, atol=1e-7)

    model = Tagger()
    opt = gs.MGDA(torch.optim.SGD(model.wrapped(), lr=0.1))
    opt.backward(model.losses(tokens, y))
    opt.backward(model.losses(tokens, y))  # accumulated, as loss.backward() twice
    torch.testing.assert_close(model.embedding.weight.grad, 2 * plain, rtol=1e-6, atol=1e-7)

    model = Tagger()
    uw = gs.UW(torch.optim.SGD(model.wrapped(), lr=0.1), num_tasks=3)
    uw.backward(model.losses(tokens, y))  # UW's log-variances start at 0: its objective is Σ_t L_t + 0
    assert model.embedding.weight.grad is not None
    torch.testing.assert_close(model.embedding.weight.grad, plain, rtol=1e-6, atol=1e-7)


def test_a_refused_call_leaves_the_other_leaves_alone() -> None:
    tokens, y = _batch()
    model = Tagger()
    opt = gs.MGDA(torch.optim.SGD(model.wrapped(), lr=0.1))
    losses = model.losses(tokens, y)
    losses[1] = losses[1] * float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.backward(losses)
    assert model.embedding.weight.grad is None

    skipping = gs.MGDA(torch.optim.SGD(model.wrapped(), lr=0.1), nonfinite="skip")
    losses = model.losses(tokens, y)
    skipping.backward([losses[0], losses[1] * float("nan"), losses[2]])
    assert model.embedding.weight.grad is None


@pytest.mark.parametrize("method", ["Sum", "MGDA", "UW"])
def test_post_accumulate_grad_hooks_run_once_on_the_final_grad(method: str) -> None:
    tokens, y = _batch()
    model = Tagger()
    seen: dict[str, list[torch.Tensor]] = {"trunk": [], "head": [], "embedding": []}
    model.trunk[0].weight.register_post_accumulate_grad_hook(lambda p: seen["trunk"].append(p.grad.clone()))
    model.heads[0].weight.register_post_accumulate_grad_hook(lambda p: seen["head"].append(p.grad.clone()))
    model.embedding.weight.register_post_accumulate_grad_hook(lambda p: seen["embedding"].append(p.grad.clone()))
    options = {"num_tasks": 3} if method == "UW" else {}
    opt = getattr(gs, method)(torch.optim.SGD(model.wrapped(), lr=0.1), **options)
    opt.backward(model.losses(tokens, y))
    for name, tensor in (("trunk", model.trunk[0].weight), ("head", model.heads[0].weight), ("embedding", model.embedding.weight)):
        assert len(seen[name]) == 1, name
        assert tensor.grad is not None and torch.equal(seen[name][0], tensor.grad), name


def test_optimizer_in_backward_trains_every_parameter() -> None:
    """PyTorch's optimizer-in-backward recipe: one optimizer per parameter, stepped from its
    post-accumulate hook. Sum must train the model exactly as sum(losses).backward() does."""
    tokens, y = _batch()

    def attach(model: Tagger) -> None:
        for p in model.parameters():
            inner = torch.optim.SGD([p], lr=0.1)

            def step(q: torch.Tensor, inner: torch.optim.Optimizer = inner) -> None:
                inner.step()
                inner.zero_grad()

            p.register_post_accumulate_grad_hook(step)

    plain, model = Tagger(), Tagger()
    attach(plain)
    attach(model)
    sum(plain.losses(tokens, y)).backward()
    gs.Sum(torch.optim.SGD(model.wrapped(), lr=0.0)).backward(model.losses(tokens, y))
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.trunk[0].weight, Tagger().trunk[0].weight)


def test_a_gradient_kept_by_a_hook_is_not_aliased_by_grad() -> None:
    tokens, y = _batch()
    model = Tagger()
    kept: list[torch.Tensor] = []
    model.heads[0].weight.register_hook(lambda g: kept.append(g) or None)
    opt = gs.MGDA(torch.optim.SGD(model.wrapped(), lr=0.1))
    opt.backward(model.losses(tokens, y))
    first = kept[0].clone()
    opt.backward(model.losses(tokens, y))  # accumulates into .grad
    torch.testing.assert_close(kept[0], first, rtol=0, atol=0)
    grad = model.heads[0].weight.grad
    assert grad is not None and grad.untyped_storage().data_ptr() != kept[0].untyped_storage().data_ptr()


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_a_nan_loss_value_is_refused_where_the_method_reads_it(normalization: str) -> None:
    """An empty mask gives a NaN loss whose gradients are finite zeros: plain PyTorch stays finite, and
    MGDA's loss normalisation would divide by the NaN."""
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    x, y = torch.randn(5, 3), torch.randn(5)
    empty = torch.zeros(5, dtype=torch.bool)
    opt = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), normalization=normalization)
    z = trunk(x)
    losses = [((heads[0](z).squeeze(-1) - y) ** 2).mean(), ((heads[1](z).squeeze(-1)[empty] - y[empty]) ** 2).mean()]
    with pytest.raises(NonFiniteGradientError) as raised:
        opt.backward(losses)
    assert raised.value.tasks == [1]
    assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
    with pytest.raises(NonFiniteGradientError) as raised:
        F.mgda(torch.randn(2, 5), normalization=normalization, losses=[1.0, float("nan")])
    assert raised.value.tasks == [1]


def _fused_losses(model: nn.ModuleDict, step: int) -> torch.Tensor:
    """Losses as one tensor, with task 2 unlabelled on step 0 (its head gets zeros from every task)."""
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 5, generator=generator), torch.randn(16, 3, generator=generator)
    mask = torch.ones(16, 3)
    if step == 0:
        mask[:, 2] = 0
    z = torch.tanh(model["trunk"](x))
    out = torch.cat([head(z) for head in model["heads"]], 1)
    return (((out - y) ** 2) * mask).sum(0) / mask.sum(0).clamp_min(1)


def _fused_model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"trunk": nn.Linear(5, 8), "heads": nn.ModuleList(nn.Linear(8, 1) for _ in range(3))})


def test_a_checkpoint_keeps_the_shared_set_read_off_the_first_step() -> None:
    def train(model: nn.ModuleDict, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            opt.backward(_fused_losses(model, step))
            opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = _fused_model()
        train(reference, gs.MGDA(torch.optim.SGD(reference.parameters(), lr=0.05)), range(6))
        model = _fused_model()
        opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.05))
        train(model, opt, range(3))
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = _fused_model()
    resumed.load_state_dict(saved[0])
    resumed_opt = gs.MGDA(torch.optim.SGD(resumed.parameters(), lr=0.05))
    resumed_opt.load_state_dict(saved[1])
    train(resumed, resumed_opt, range(3, 6))
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_first_step_that_leaves_sharing_open_says_so() -> None:
    model = _fused_model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.05))
    with pytest.warns(RuntimeWarning, match=r"zero gradient for every task.*pass shared="):
        opt.backward(_fused_losses(model, 0))

    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 6), nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    x, y = torch.randn(8, 4), torch.randn(8)
    z = torch.tanh(trunk(x))
    absent = [((heads[0](z).squeeze(-1) - y) ** 2).mean(), 0 * heads[1](z).sum()]
    propagating = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.0), nonfinite="propagate")
    with pytest.warns(RuntimeWarning, match=r"one task only.*never revisited"):
        propagating.backward(absent)

    fine = _fused_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs.MGDA(torch.optim.SGD(fine.parameters(), lr=0.05)).backward(_fused_losses(fine, 1))


def test_sparse_adam_on_a_shared_embedding_is_refused_and_a_second_optimizer_trains_it() -> None:
    torch.manual_seed(0)
    shared = nn.Embedding(20, 6, sparse=True)
    own = nn.ModuleList(nn.Embedding(20, 6, sparse=True) for _ in range(2))
    tokens = torch.tensor([1, 2, 2, 7])

    def losses() -> list[torch.Tensor]:
        z = shared(tokens)
        return [((z + own[t](tokens)).sum(-1) - t).pow(2).mean() for t in range(2)]

    opt = gs.MGDA(torch.optim.SparseAdam([*shared.parameters(), *own.parameters()], lr=0.01))
    with pytest.raises(ValueError, match="SparseAdam takes sparse gradients only"):
        opt.backward(losses())
    assert all(p.grad is None for p in [*shared.parameters(), *own.parameters()])

    # The documented way: the shared embedding in a second SparseAdam, the rest wrapped.
    plain = [torch.autograd.grad(sum(losses()), [shared.weight])[0]]
    opt = gs.MGDA(torch.optim.SparseAdam(list(own.parameters()), lr=0.01))
    side = torch.optim.SparseAdam(list(shared.parameters()), lr=0.01)
    opt.backward(losses())
    assert shared.weight.grad is not None and shared.weight.grad.is_sparse
    torch.testing.assert_close(shared.weight.grad.to_dense(), plain[0].to_dense())
    opt.step()
    side.step()
