"""The per-task gradient engines: loop and batched (vmapped) backward agree; batching falls back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsurgery.taskgrads import BatchingUnsupportedError, reach, task_gradients


def _setup(tasks: int = 4):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(9, 1) for _ in range(tasks))
    unused = nn.Parameter(torch.zeros(3))
    params = [*trunk.parameters(), *heads.parameters(), unused]
    x, y = torch.randn(7, 5), torch.randn(tasks, 7)

    def losses() -> list[torch.Tensor]:
        z = trunk(x)
        return [((head(z).squeeze(-1) - y[t]) ** 2).mean() for t, head in enumerate(heads)]

    return params, losses


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_batched_engine_equals_the_loop(chunk_size: int | None) -> None:
    params, losses = _setup()
    loop = task_gradients(losses(), params, engine="loop")
    batched = task_gradients(losses(), params, engine="batched", chunk_size=chunk_size)
    assert loop.reached == batched.reached
    for row_a, row_b in zip(loop.grads, batched.grads):
        for a, b in zip(row_a, row_b):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reach_follows_the_graph() -> None:
    params, losses = _setup(tasks=2)
    reached = reach(losses(), params)
    trunk_count, head_count = 4, 2
    assert all(reached[t][:trunk_count] == [True] * trunk_count for t in range(2))
    assert reached[0][trunk_count : trunk_count + 2 * head_count] == [True, True, False, False]
    assert reached[1][-1] is False  # the unused parameter


class NoBatchingRule(torch.autograd.Function):
    """An autograd function whose backward reads a tensor's data pointer: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(grad.detach().numpy() * 2)


def test_auto_falls_back_to_the_loop_and_batched_raises_when_vmap_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradsurgery.taskgrads as taskgrads

    monkeypatch.setattr(taskgrads, "prefers_batched", lambda device: True)  # as on CUDA
    w = nn.Parameter(torch.randn(3))
    losses = lambda: [NoBatchingRule.apply(w).sum(), (NoBatchingRule.apply(w) ** 2).sum()]  # noqa: E731
    with pytest.raises(BatchingUnsupportedError, match="batched backward cannot run"):
        task_gradients(losses(), [w], engine="batched")
    result = task_gradients(losses(), [w], engine="auto")
    assert result.engine == "loop"
    torch.testing.assert_close(result.grads[0][0], torch.full((3,), 2.0))
    torch.testing.assert_close(result.grads[1][0], 8 * w.detach())


@pytest.mark.parametrize("method", ["PCGrad", "CAGrad", "MGDA"])
def test_wrapper_engines_give_the_same_step(method: str) -> None:
    import gradsurgery as gs

    results = []
    for engine in ("loop", "batched", "auto"):
        params, losses = _setup()
        make = {"PCGrad": lambda o: gs.PCGrad(o, seed=0, engine=engine), "CAGrad": lambda o: gs.CAGrad(o, engine=engine),
                "MGDA": lambda o: gs.MGDA(o, engine=engine)}[method]
        opt = make(torch.optim.SGD(params, lr=0.1))
        for _ in range(2):
            opt.zero_grad()
            opt.backward(losses())
            opt.step()
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_engine_options_are_refused() -> None:
    import gradsurgery as gs

    params, _ = _setup()
    with pytest.raises(ValueError, match="engine must be one of"):
        gs.MGDA(torch.optim.SGD(params, lr=0.1), engine="vmap")
    with pytest.raises(ValueError, match="chunk_size"):
        gs.MGDA(torch.optim.SGD(params, lr=0.1), chunk_size=0)
