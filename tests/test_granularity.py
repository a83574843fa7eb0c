"""``granularity=``: the method on each block of the shared parameters, against plain PyTorch (per-task
``torch.autograd.grad``, the block's own Gram matrix, the method's math on it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F

METHODS = {
    "Sum": (lambda p, **kw: gs.Sum(p, **kw), lambda G: torch.ones(G.shape[-1], dtype=torch.float64)),
    "PCGrad": (lambda p, **kw: gs.PCGrad(p, seed=0, **kw), None),
    "CAGrad": (lambda p, **kw: gs.CAGrad(p, **kw), F.cagrad_weights),
    "MGDA": (lambda p, **kw: gs.MGDA(p, **kw), F.mgda_weights),
    "IMTLG": (lambda p, **kw: gs.IMTLG(p, **kw), F.imtl_g_weights),
}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(1) - y[:, t]) ** 2).mean() * (t + 1) for t, head in enumerate(self.heads)]


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)


def _expected(model: Model, blocks: list[list[torch.Tensor]], weights_of, x, y) -> dict[int, torch.Tensor]:
    """Each block's parameters: wᵀJ_b with w the method's weights for the block's own Gram matrix."""
    out = {}
    for b, block in enumerate(blocks):
        per_task = [torch.autograd.grad(loss, block, retain_graph=True) for loss in model.losses(x, y)]
        J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in per_task]).double()
        d = weights_of(b, J @ J.T) @ J
        offset = 0
        for p in block:
            out[id(p)] = d[offset : offset + p.numel()].view_as(p).float()
            offset += p.numel()
    return out


def _weights(name: str, blocks: int):
    if name != "PCGrad":
        return lambda b, G: METHODS[name][1](G)
    # PCGrad draws the blocks' orders in one batch from its generator: entry b as the b-th draw
    draws = torch.Generator().manual_seed(0)
    weights = [None] * blocks
    return lambda b, G: weights[b] if weights[b] is not None else weights.__setitem__(b, F.pcgrad_weights(G, generator=draws)) or weights[b]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("granularity", ["parameter", "module", "model", "groups"])
def test_each_block_gets_its_own_surgery(name: str, granularity: str) -> None:
    model = Model()
    trunk = list(model.trunk.parameters())
    layers = [list(m.parameters()) for m in model.trunk if list(m.parameters())]
    choice = {
        "parameter": ("parameter", [[p] for p in trunk]),
        "module": ("module", layers),
        "model": (model.trunk, layers),
        "groups": ([trunk[:1], trunk[1:]], [trunk[:1], trunk[1:]]),
    }[granularity]
    options = {"shared": model.trunk} if granularity == "module" else {}
    opt = METHODS[name][0](torch.optim.SGD(model.parameters(), lr=0.1), granularity=choice[0], **options)
    x, y = _data()
    opt.backward(model.losses(x, y))
    assert opt.last_gram.shape == (len(choice[1]), 3, 3) and opt.last_weights.shape == (len(choice[1]), 3)
    expected = _expected(model, choice[1], _weights(name, len(choice[1])), x, y)
    for p in trunk:
        torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-4, atol=1e-6)
    for t, head in enumerate(model.heads):  # heads: their plain gradient, whatever the blocks
        for p, g in zip(head.parameters(), torch.autograd.grad(model.losses(x, y)[t], list(head.parameters()))):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    assert opt.blocks == [sorted(index[id(p)] for p in block) for block in choice[1]]


def test_one_block_is_the_whole_model_step_bit_for_bit() -> None:
    a, b = Model(), Model()
    whole = gs.MGDA(torch.optim.SGD(a.parameters(), lr=0.1))
    one = gs.MGDA(torch.optim.SGD(b.parameters(), lr=0.1), granularity=[list(b.trunk.parameters())])
    for step in range(2):
        for opt, model in ((whole, a), (one, b)):
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_diagnostics_per_block() -> None:
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), granularity="parameter")
    opt.backward(model.losses(*_data()))
    report = opt.diagnostics()
    assert len(report["blocks"]) == 4 and len(report["blocks"][0]["weights"]) == 3
    flat = opt.diagnostics(flat=True)
    assert "block/3/cos/0-2" in flat and "block/0/weight/1" in flat and "block/2/conflicts" in flat
    # The top level describes the whole shared gradient: the blocks' Gram matrices sum to its Gram matrix.
    whole = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    whole.backward(model.losses(*_data()))
    expected = whole.diagnostics()
    assert "weights" not in report and "weights" in expected
    torch.testing.assert_close(torch.tensor(report["norms"]), torch.tensor(expected["norms"]))
    torch.testing.assert_close(torch.tensor(report["cosine"]), torch.tensor(expected["cosine"]))
    assert report["conflicts"] == expected["conflicts"]
    assert flat["cos/0-2"] == report["cosine"][0][2]


def test_gradvac_keeps_a_state_per_block_and_resumes_it() -> None:
    def run(model: Model, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            opt.backward(model.losses(*_data(step)))
            opt.step()

    model = Model()
    opt = gs.GradVac(torch.optim.SGD(model.parameters(), lr=0.05), granularity="parameter", seed=1)
    run(model, opt, range(2))
    assert opt.state_dict()["gradsurgery"]["state"]["targets"].shape == (4, 3, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(2, 4))
    resumed = Model()
    resumed.load_state_dict(saved[0])
    opt2 = gs.GradVac(torch.optim.SGD(resumed.parameters(), lr=0.05), granularity="parameter", seed=7)
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, range(2, 4))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_triton_blocks_give_the_torch_step() -> None:
    pytest.importorskip("triton")
    from gradsurgery.kernels import triton_runs_on

    if not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton's interpreter is not on")
    a, b = Model(), Model()
    torch_opt = gs.MGDA(torch.optim.SGD(a.parameters(), lr=0.1), granularity="parameter", backend="torch")
    triton_opt = gs.MGDA(torch.optim.SGD(b.parameters(), lr=0.1), granularity="parameter", backend="triton")
    for opt, model in ((torch_opt, a), (triton_opt, b)):
        opt.backward(model.losses(*_data()))
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: dict(granularity="layer"), "granularity must be one of"),
        (lambda m: dict(granularity="module"), "shared="),
        (lambda m: dict(granularity=[[m.trunk[0].weight], [m.trunk[0].weight]]), r"granularity\[1\]\[0\] .* also in granularity\[0\]"),
        (lambda m: dict(granularity=[[torch.nn.Parameter(torch.ones(2))]]), r"granularity\[0\]\[0\] .* not a parameter of the optimizer"),
        (lambda m: dict(granularity=[[m.trunk[0].weight], "x"]), r"granularity\[1\] must be a list"),
        (lambda m: dict(granularity="parameter", every=2), "every"),
    ],
    ids=["unknown", "module-without-shared", "overlap", "not-held", "not-a-list", "every"],
)
def test_bad_granularity_is_refused_at_construction(make, message: str) -> None:
    model = Model()
    with pytest.raises(ValueError, match=message):
        gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), **make(model))


def test_groups_that_miss_a_shared_parameter_are_refused_before_anything_changes() -> None:
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), granularity=[list(model.trunk[0].parameters())])
    with pytest.raises(ValueError, match="cover every shared parameter"):
        opt.backward(model.losses(*_data()))
    assert all(p.grad is None for p in model.parameters())
