"""Full wrapper steps and functional calls through the Triton kernels equal the PyTorch path.

Runs on the CPU under Triton's interpreter (set by tests/conftest.py when there is no CUDA).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F
from gradsurgery import kernels

pytestmark = pytest.mark.skipif(
    not kernels.triton_runs_on("cuda" if torch.cuda.is_available() else "cpu"), reason="Triton cannot run here"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

WRAPPERS = {
    "Sum": lambda opt, **kw: gs.Sum(opt, **kw),
    "PCGrad": lambda opt, **kw: gs.PCGrad(opt, seed=1, **kw),
    "CAGrad": lambda opt, **kw: gs.CAGrad(opt, **kw),
    "MGDA": lambda opt, **kw: gs.MGDA(opt, **kw),
}


def _train(name: str, backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 33), nn.Tanh()).to(DEVICE)
    heads = nn.ModuleList(nn.Linear(33, 1) for _ in range(3)).to(DEVICE)
    params = [*trunk.parameters(), *heads.parameters()]
    opt = WRAPPERS[name](torch.optim.Adam(params, lr=0.01), backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(10, 6, generator=gen).to(DEVICE), torch.randn(10, 3, generator=gen).to(DEVICE)
        z = trunk(x)
        losses = [((head(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(heads)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_steps_match_between_backends(name: str) -> None:
    for p, q in zip(_train(name, "triton"), _train(name, "torch")):
        # the kernels and BLAS sum in different orders: fp32 rounding, ~1e-6 relative, compounded
        # over three Adam steps
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["pcgrad", "cagrad", "mgda"])
def test_functional_matches_between_backends(method: str) -> None:
    J = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kwargs = {"generator": torch.Generator(device=DEVICE).manual_seed(0)} if method == "pcgrad" else {}
    a = getattr(F, method)(J, backend="triton", **kwargs)
    kwargs = {"generator": torch.Generator(device=DEVICE).manual_seed(0)} if method == "pcgrad" else {}
    b = getattr(F, method)(J, backend="torch", **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_explicit_triton_where_it_cannot_run_raises_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_runs_on", lambda device: False)
    with pytest.raises(ValueError, match='backend="triton" cannot run'):
        gs.MGDA(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), backend="triton")


@pytest.mark.parametrize("method", ["pcgrad", "cagrad", "mgda"])
def test_functional_weights_through_the_fused_solves_match_the_torch_solvers(method: str) -> None:
    J = torch.randn(5, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    G = J @ J.T
    run = getattr(F, f"{method}_weights")
    kwargs = lambda: {"generator": torch.Generator(device=DEVICE).manual_seed(1)} if method == "pcgrad" else {}  # noqa: E731
    fused = run(G, backend="triton", **kwargs())
    plain = run(G, backend="torch", **kwargs())
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-12)
