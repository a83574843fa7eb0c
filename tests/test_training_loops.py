"""The training loops people write, against plain PyTorch: clearing through the module, losses as one
tensor, fused optimizers on channels_last weights, unreached parameters, the default dtype, a changed
number of tasks, sparse embeddings, activation checkpointing, pre-existing gradients.

Every reference is per-task ``torch.autograd.grad`` and the method's math (``tests/plain.py``), or
``sum(losses).backward()`` for ``Sum``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs

from .plain import METHODS, assert_grads, expected_grads, weights_of, wrapper

ENGINES = ("loop", "batched")


class TrunkHeads(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, tasks: int = 3, width: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, T)``: every head's output."""
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return list(((self.outputs(x) - y) ** 2).mean(0).unbind())

    def separate_losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The same losses, each computed on its own (no fused node above the heads)."""
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(self.heads)]


def _data(seed: int = 0, tasks: int = 3, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, generator=gen), torch.randn(batch, tasks, generator=gen)


def _model(tasks: int = 3, seed: int = 0) -> TrunkHeads:
    torch.manual_seed(seed)
    return TrunkHeads(tasks)


# fp32 Gram and combine against the reference's fp64: ~1e-6 relative; the solvers' weights move with G
# by its conditioning, which these small well-separated problems keep near 1.
RTOL, ATOL = 1e-4, 1e-6


# ---------------------------------------------------------------------- 1. clearing through the module


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("clear", ["model.zero_grad()", "model.zero_grad(set_to_none=False)", "inner.zero_grad()", "p.grad = None"])
def test_clearing_through_the_module_starts_afresh(method: str, clear: str) -> None:
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    opt = wrapper(method, inner)
    x, y = _data()
    for _ in range(3):
        if clear == "model.zero_grad()":
            model.zero_grad()
        elif clear == "model.zero_grad(set_to_none=False)":
            model.zero_grad(set_to_none=False)
        elif clear == "inner.zero_grad()":
            inner.zero_grad()
        else:
            for p in model.parameters():
                p.grad = None
        opt.backward(model.separate_losses(x, y))
        opt.step()
    expected = expected_grads(list(model.parameters()), model.separate_losses(x, y), weights_of(method))
    assert_grads(list(model.parameters()), expected, rtol=RTOL, atol=ATOL)


def test_a_skipped_batch_does_not_skip_the_step_after_zero_grad() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    opt.backward([loss * float("nan") for loss in model.separate_losses(x, y)])
    opt.zero_grad()
    opt.backward(model.separate_losses(x, y))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_skipped_batch_still_skips_when_more_batches_accumulate() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    opt.backward([loss * float("nan") for loss in model.separate_losses(x, y)])
    opt.backward(model.separate_losses(x, y))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("method", METHODS)
def test_a_gradient_already_there_is_a_plain_term(method: str) -> None:
    """``aux.backward()`` before ``opt.backward(losses)``: the auxiliary gradient adds to the update,
    on the shared parameters as on the heads, as ``loss.backward()`` accumulates."""
    model = _model()
    x, y = _data()
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    aux = lambda: sum(p.pow(2).sum() for p in model.parameters()) * 0.1  # noqa: E731
    aux().backward()
    opt.backward(model.separate_losses(x, y))
    params = list(model.parameters())
    surgery = expected_grads(params, model.separate_losses(x, y), weights_of(method))
    plain = torch.autograd.grad(aux(), params)
    assert_grads(params, [s + a for s, a in zip(surgery, plain)], rtol=RTOL, atol=ATOL)


def test_clipping_between_backward_and_step_then_accumulating_adds_on_top() -> None:
    """A change to ``.grad`` by anyone else ends the accumulation: the next ``backward`` adds its
    surgery to what ``.grad`` then holds, as plain PyTorch adds its gradient."""
    model = _model()
    x, y = _data()
    opt = gs.CAGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    opt.backward(model.separate_losses(x, y))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    clipped = [p.grad.clone() for p in model.parameters()]
    x2, y2 = _data(seed=1)
    opt.backward(model.separate_losses(x2, y2))
    params = list(model.parameters())
    second = expected_grads(params, model.separate_losses(x2, y2), weights_of("CAGrad"))
    assert_grads(params, [c + s for c, s in zip(clipped, second)], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- 2. losses as one tensor


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["stacked", "vectorised"])
def test_losses_as_one_tensor_equal_the_list_form(method: str, form: str, engine: str) -> None:
    model = _model()
    x, y = _data()
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    for step in range(2):  # the first step decides the sharing, the second uses it
        opt.zero_grad()
        if form == "stacked":
            opt.backward(torch.stack(model.separate_losses(x, y)))
        else:
            opt.backward(((model.outputs(x) - y) ** 2).mean(0))
        params = list(model.parameters())
        if step == 0 or method != "PCGrad":  # PCGrad's generator has moved on by the second step
            expected = expected_grads(params, model.separate_losses(x, y), weights_of(method))
            assert_grads(params, expected, rtol=RTOL, atol=ATOL)
        for head, t in zip(model.heads, range(3)):  # heads: their own plain gradient, every step
            plain = torch.autograd.grad(model.separate_losses(x, y)[t], list(head.parameters()))
            for p, g in zip(head.parameters(), plain):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        opt.step()


def test_a_fused_head_that_another_task_starts_to_reach_becomes_shared() -> None:
    torch.manual_seed(0)
    trunk = nn.Parameter(torch.randn(4))
    extra = nn.Parameter(torch.randn(4))
    targets = torch.randn(3, 4)

    def losses(extra_users: int) -> torch.Tensor:
        rows = [((trunk + (extra if t < extra_users else 0 * extra) - targets[t]) ** 2).sum() * (t + 1) for t in range(3)]
        return torch.stack(rows)  # fused: every loss's graph reaches extra

    opt = gs.MGDA(torch.optim.SGD([trunk, extra], lr=0.0))
    opt.backward(losses(1))
    assert [id(p) for p in opt._buffer.params] == [id(trunk)]
    opt.zero_grad()
    opt.backward(losses(2))
    expected = expected_grads([trunk, extra], list(losses(2).unbind()), weights_of("MGDA"))
    assert_grads([trunk, extra], expected, rtol=RTOL, atol=ATOL)


def test_a_zero_initialised_head_does_not_unshare_the_trunk() -> None:
    model = _model()
    for head in model.heads:
        nn.init.zeros_(head.weight)
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.separate_losses(x, y))  # every trunk gradient is exactly zero on this step
    opt.step()
    opt.zero_grad()
    opt.backward(model.separate_losses(x, y))
    params = list(model.parameters())
    assert_grads(params, expected_grads(params, model.separate_losses(x, y), weights_of("MGDA")), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- 4. fused optimizers, memory layouts


class ConvHeads(nn.Module):
    """A channels_last convolution and a transposed weight shared by two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.mix = nn.Parameter(torch.randn(6, 4).t())  # (4, 6) with strides (1, 4)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))

    def separate_losses(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.tanh(self.conv(x)).mean(dim=(2, 3)) @ self.mix
        return [head(z).pow(2).mean() * (t + 1) for t, head in enumerate(self.heads)]


OPTIMIZERS = {
    "Adam": lambda p, fused: torch.optim.Adam(p, lr=0.1, fused=fused),
    "AdamW": lambda p, fused: torch.optim.AdamW(p, lr=0.1, fused=fused),
    "SGD": lambda p, fused: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=fused),
    "Adagrad": lambda p, fused: torch.optim.Adagrad(p, lr=0.1, fused=fused),
}


@pytest.mark.parametrize("inner", list(OPTIMIZERS))
@pytest.mark.parametrize("method", ["Sum", "MGDA"])
def test_fused_optimizers_on_channels_last_and_transposed_weights(inner: str, method: str) -> None:
    torch.manual_seed(0)
    model = ConvHeads()
    torch.manual_seed(0)
    reference = ConvHeads()
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    opt = wrapper(method, OPTIMIZERS[inner](model.parameters(), True))
    plain = OPTIMIZERS[inner](reference.parameters(), False)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model.separate_losses(x))
        for p in model.parameters():
            assert p.grad.stride() == p.stride()  # the layout loss.backward() gives
        opt.step()
        plain.zero_grad()
        params = list(reference.parameters())
        for p, g in zip(params, expected_grads(params, reference.separate_losses(x), weights_of(method))):
            p.grad = g
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- 5. shared parameters no task reaches


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inner", ["Adam", "AdamW"])
def test_a_shared_parameter_no_task_reaches_keeps_none(method: str, inner: str) -> None:
    model = _model()
    pooler = nn.Linear(8, 8)  # inside shared=, used by no task (a BERT pooler in a token task)
    shared = nn.ModuleDict({"trunk": model.trunk, "pooler": pooler})
    params = list(model.parameters()) + list(pooler.parameters())
    make = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[inner]
    opt = wrapper(method, make(params, lr=0.1), shared=shared)
    before = [p.detach().clone() for p in pooler.parameters()]
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model.separate_losses(x, y))
        assert all(p.grad is None for p in pooler.parameters())
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(pooler.parameters(), before))


def test_a_branch_taken_on_some_steps_only() -> None:
    model = _model()
    branch = nn.Linear(8, 8)
    opt = gs.MGDA(torch.optim.AdamW(list(model.parameters()) + list(branch.parameters()), lr=0.1))
    x, y = _data()

    def losses(use_branch: bool) -> list[torch.Tensor]:
        z = model.trunk(x)
        z = torch.tanh(branch(z)) if use_branch else z
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]

    opt.zero_grad()
    opt.backward(losses(True))
    opt.step()
    opt.zero_grad()
    opt.backward(losses(False))
    assert all(p.grad is None for p in branch.parameters())
    before = [p.detach().clone() for p in branch.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(branch.parameters(), before))


# ---------------------------------------------------------------------- 6. default dtype float64


@pytest.mark.parametrize("method", METHODS + ("Mean",))
def test_float64_default_dtype(method: str) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = _model()
        x, y = _data()
        x, y = x.double(), y.double()
        opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1)) if method != "Mean" else gs.Mean(torch.optim.SGD(model.parameters(), lr=0.1))
        opt.backward(model.separate_losses(x, y))
        weights = weights_of(method) if method != "Mean" else (lambda G: torch.full((G.shape[0],), 1 / G.shape[0], dtype=torch.float64))
        params = list(model.parameters())
        assert_grads(params, expected_grads(params, model.separate_losses(x, y), weights), rtol=1e-10, atol=1e-12)
        opt.step()
        opt.zero_grad()
        opt.backward(model.separate_losses(x, y))
        opt.diagnostics()
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------- 7. a changed number of tasks


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_more_tasks_after_zero_grad(method: str, engine: str) -> None:
    model = _model(tasks=3)
    x, y = _data(tasks=3)
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    for T in (1, 2, 3, 2):
        opt.zero_grad()
        opt.backward(model.separate_losses(x, y)[:T])
        params = list(model.parameters())
        assert_grads(params, expected_grads(params, model.separate_losses(x, y)[:T], weights_of(method)), rtol=RTOL, atol=ATOL)
        opt.step()


# ---------------------------------------------------------------------- 8. sparse embeddings


@pytest.mark.parametrize("method", METHODS)
def test_sparse_embeddings(method: str) -> None:
    torch.manual_seed(0)
    shared = nn.Embedding(10, 4, sparse=True)
    own = nn.Embedding(10, 4, sparse=True)  # task 0's only
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    params = [*shared.parameters(), *own.parameters(), *heads.parameters()]
    index = torch.tensor([1, 2, 2, 7])

    def losses() -> list[torch.Tensor]:
        z = shared(index)
        return [heads[0](z + own(index)).pow(2).mean(), (heads[1](z) - 1).pow(2).mean()]

    opt = wrapper(method, torch.optim.SGD(params, lr=0.1))
    opt.backward(losses())
    assert own.weight.grad.is_sparse  # task-specific: plain accumulation, as loss.backward() leaves it
    assert_grads(params, expected_grads(params, losses(), weights_of(method)), rtol=RTOL, atol=ATOL)
    opt.step()


# ---------------------------------------------------------------------- 9. activation checkpointing


def test_reentrant_checkpoint_is_refused_before_anything_changes() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    z = torch.utils.checkpoint.checkpoint(model.trunk, x.requires_grad_(), use_reentrant=True)
    losses = [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]
    with pytest.raises(ValueError, match="use_reentrant=False"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_non_reentrant_checkpoint_trains_the_trunk(method: str) -> None:
    model = _model()
    x, y = _data()
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.1))

    def losses() -> list[torch.Tensor]:
        z = torch.utils.checkpoint.checkpoint(model.trunk, x, use_reentrant=False)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() for t, head in enumerate(model.heads)]

    opt.backward(losses())
    params = list(model.parameters())
    assert_grads(params, expected_grads(params, losses(), weights_of(method)), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- sharing decided per step


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_routed_layer_is_shared_only_when_several_tasks_read_it(method: str, engine: str) -> None:
    """An expert read by two tasks on one step and by one task on the next: surgery on the first, the
    plain gradient on the second, and accumulation decides over the accumulated calls."""
    torch.manual_seed(0)
    trunk = nn.Linear(5, 6)
    experts = nn.ParameterList(nn.Parameter(torch.randn(6)) for _ in range(2))
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    params = [*trunk.parameters(), *experts, *heads.parameters()]
    x, y = _data(tasks=2)

    def losses(routes: tuple[int, int]) -> list[torch.Tensor]:
        z = torch.tanh(trunk(x))
        return [((head(z + experts[e]).squeeze(1) - y[:, t]) ** 2).mean() for t, (head, e) in enumerate(zip(heads, routes))]

    opt = wrapper(method, torch.optim.SGD(params, lr=0.0), engine=engine)
    for routes in [(0, 0), (0, 1), (1, 1)]:
        opt.zero_grad()
        opt.backward(losses(routes))
        assert_grads(params, expected_grads(params, losses(routes), weights_of(method)), rtol=RTOL, atol=ATOL)
        opt.step()
    # accumulated: expert 0 read by task 0 in the first call and by task 1 in the second: shared
    opt.zero_grad()
    opt.backward(losses((0, 1)))
    opt.backward(losses((1, 0)))
    summed = [a + b for a, b in zip(losses((0, 1)), losses((1, 0)))]
    assert_grads(params, expected_grads(params, summed, weights_of(method)), rtol=RTOL, atol=ATOL)
