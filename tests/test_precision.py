"""Mixed precision: autocast + GradScaler through surgery, half-precision parameters, and a
checkpoint resumed in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F

from .helpers import make_J

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_bf16_autocast_with_grad_scaler_trains(name: str) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(3))
    params = [*trunk.parameters(), *heads.parameters()]
    make = {"PCGrad": lambda o: gs.PCGrad(o, seed=0, nonfinite="propagate"),
            "CAGrad": lambda o: gs.CAGrad(o, nonfinite="propagate"),
            "MGDA": lambda o: gs.MGDA(o, nonfinite="propagate")}[name]
    opt = make(torch.optim.Adam(params, lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(64, 8), torch.randn(64, 3)

    def losses() -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = trunk(x)
            return [nn.functional.mse_loss(head(z).squeeze(-1).float(), y[:, t]) for t, head in enumerate(heads)]

    start = sum(losses()).item()
    for _ in range(30):
        opt.zero_grad()
        opt.backward(scaler.scale(losses()))
        scaler.step(opt)
        scaler.update()
    assert sum(losses()).item() < 0.8 * start
    assert all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("method", ["pcgrad", "cagrad", "mgda"])
def test_scaling_the_losses_commutes_with_surgery(method: str) -> None:
    # What GradScaler relies on: surgery of s·J, divided by s, is surgery of J (positive homogeneity).
    J = make_J("conflicting", 4, 200, dtype=torch.float32, seed=5)
    run = {"pcgrad": lambda A: F.pcgrad(A, generator=torch.Generator().manual_seed(0)), "cagrad": F.cagrad, "mgda": F.mgda}[method]
    for scale in (2.0**16, 2.0**-8, 65536.0 * 3):
        torch.testing.assert_close(run(J * scale) / scale, run(J), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_use_fp32_gram_and_fp64_solve(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64).to(dtype))
    targets = torch.randn(3, 64)
    opt = gs.MGDA(torch.optim.SGD([w], lr=0.1))
    opt.backward([((w.float() - t) ** 2).mean() for t in targets])
    assert w.grad.dtype == dtype
    assert opt.last_gram.dtype == torch.float32 and opt.last_weights.dtype == torch.float64
    J = torch.stack([torch.autograd.grad(((w.float() - t) ** 2).mean(), w)[0].float() for t in targets])
    expected = F.mgda_weights(J.double() @ J.double().T).float() @ J
    torch.testing.assert_close(w.grad.float(), expected, rtol=2e-2, atol=1e-3)  # half-precision rows


SCRIPT = textwrap.dedent(
    """
    import sys, torch, gradsurgery as gs
    from torch import nn
    name, mode, path = sys.argv[1:4]
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh()); heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(4))
    params = [*trunk.parameters(), *heads.parameters()]
    make = {"PCGrad": lambda o: gs.PCGrad(o, seed=7), "CAGrad": gs.CAGrad, "MGDA": gs.MGDA}[name]
    opt = make(torch.optim.Adam(params, lr=1e-2))
    def step(i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g)
        z = trunk(x)
        opt.zero_grad(); opt.backward([((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]); opt.step()
    if mode == "resume":
        state = torch.load(path, weights_only=False)
        for p, q in zip(params, state["params"]): p.data.copy_(q)
        opt.load_state_dict(state["opt"]); first = 3
    else:
        first = 0
    for i in range(first, 6):
        step(i)
        if mode == "save" and i == 2:
            torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, path)
    print(repr([p.detach().flatten()[:4].tolist() for p in params]))
    """
)


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_checkpoint_resumed_in_a_fresh_process_is_bit_identical(name: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    path = tmp_path / "ckpt.pt"

    def run(mode: str) -> str:
        result = subprocess.run([sys.executable, str(script), name, mode, str(path)], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert run("save") == run("resume")


def test_backward_inside_an_autocast_region_keeps_the_gram_in_the_gradients_precision() -> None:
    """Frameworks call backward inside the forward's autocast region: the wrapper leaves it, so its
    Gram matrix is the fp32 one, as outside the region."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(8, 8)
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
    x = torch.randn(32, 8) * 3
    grams = []
    for region in (False, True):
        opt = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1))
        z = torch.tanh(trunk(x))
        losses = [head(z).pow(2).mean() for head in heads]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region):
            opt.backward(losses)
        grams.append(opt.last_gram)
    assert grams[1].dtype == torch.float32
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-6, atol=1e-7)
