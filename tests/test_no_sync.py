"""The weight solvers never read a tensor value back to the host (which on CUDA is a sync).

Checked on the CPU by intercepting ``aten._local_scalar_dense`` (what ``.item()``, ``bool(t)``,
``int(t)`` and indexing with a 0-d tensor dispatch to).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradsurgery.functional as F
from gradsurgery.methods import cagrad_weights, mgda_weights, pcgrad_weights

from .helpers import make_J


class ForbidHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor value was read back to the host")
        # torch.tensor(python_data, device=...) dispatches lift_fresh: on CUDA that is a copy from
        # pageable host memory, which waits for the device (a sync in the other direction).
        if func is torch.ops.aten.lift_fresh.default:
            raise AssertionError("a tensor was built from host data")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [1, 2, 3, 8, 12])  # 12: the interior point and its exact finish
@pytest.mark.parametrize(
    "weights",
    [
        lambda G: pcgrad_weights(G, generator=torch.Generator().manual_seed(0)),
        lambda G: cagrad_weights(G, max_iter=5),
        lambda G: mgda_weights(G, max_iter=5),
        lambda G: mgda_weights(G, normalization="loss+", losses=torch.ones(G.shape[0]), max_iter=5),
    ],
    ids=["pcgrad", "cagrad", "mgda", "mgda-loss+"],
)
def test_weights_do_not_read_values_back(T: int, weights) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    with ForbidHostReads():
        weights(G)


def test_the_spy_catches_a_read() -> None:
    index = torch.tensor(1)
    with pytest.raises(AssertionError, match="read back"), ForbidHostReads():
        torch.ones(3)[index].item()


def test_the_spy_catches_host_data() -> None:
    with pytest.raises(AssertionError, match="host data"), ForbidHostReads():
        torch.tensor([0.5, 0.25], dtype=torch.float64)


def test_combine_and_gram_do_not_read_values_back() -> None:
    J = make_J("conflicting", 4, 300, dtype=torch.float32)
    with ForbidHostReads():
        G = F.gram(J, backend="torch")
        w = pcgrad_weights(G)
        F._backend.combine(w, J, torch.empty(300), backend="torch")


@pytest.mark.parametrize("name", ["Sum", "PCGrad", "CAGrad", "MGDA"])
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_wrapper_backward_with_propagate_does_not_read_values_back(name: str, engine: str) -> None:
    import gradsurgery as gs

    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 8)
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
    make = {"Sum": gs.Sum, "PCGrad": lambda o, **k: gs.PCGrad(o, seed=0, **k), "CAGrad": gs.CAGrad, "MGDA": gs.MGDA}[name]
    opt = make(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), nonfinite="propagate", engine=engine)
    x = torch.randn(5, 4)
    for _ in range(2):  # the first call lays out the buffer; both must be free of reads
        z = torch.tanh(trunk(x))
        losses = [head(z).pow(2).mean() for head in heads]
        opt.zero_grad()
        with ForbidHostReads():
            opt.backward(losses)
        opt.step()
