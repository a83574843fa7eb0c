"""Hugging Face Accelerate: ``gs.backward(opt, losses, accelerator=)`` through the
``AcceleratedOptimizer``: ``accumulate(2)`` on half batches equals one whole batch, the GradScaler
path equals the README's AMP loop, bf16 autocast leaves the wrapper's arithmetic alone,
``save_state``/``load_state`` resume bit-identically, and the recipe of ``docs/accelerate.md`` runs
as written. Also :func:`gradsurgery.frameworks.unwrap` on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import gradsurgery as gs  # noqa: E402
from gradsurgery.frameworks import unwrap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = 3

# Deterministic methods: a random one (PCGrad) draws at every backward, so accumulate(2) draws twice per step.
METHODS: dict[str, Callable[[torch.optim.Optimizer], gs.GradSurgery]] = {
    "MGDA": lambda inner: gs.MGDA(inner),
    "CAGrad": lambda inner: gs.CAGrad(inner),
    "UW": lambda inner: gs.UW(inner, num_tasks=TASKS),  # loss weighting: its objective is divided
}


@pytest.fixture(autouse=True)
def fresh_accelerate(one_thread: None) -> Iterator[None]:
    """Accelerate keeps its state (mixed precision, accumulation steps) in process-wide singletons."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g)
    base = torch.tanh(x[:, :1] - x[:, 1:2])
    return x, torch.cat([base, -base + 0.1 * torch.randn(32, 1, generator=g), torch.randn(32, 1, generator=g)], 1)


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(out.float(), y[:, t]) for t, out in enumerate(model(x))]


def _batches(size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _whole_batches(method: str, size: int) -> nn.Module:
    """The plain loop on batches of ``size``."""
    model = MultiTask()
    opt = METHODS[method](torch.optim.SGD(model.parameters(), lr=0.2))
    for x, y in _batches(size):
        opt.zero_grad()
        opt.backward(_losses(model, x, y))
        opt.step()
    return model


def _accumulated(method: str, size: int, *, accelerator_arg: bool = True) -> tuple[nn.Module, gs.GradSurgery]:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = MultiTask()
    model, opt = accelerator.prepare(model, METHODS[method](torch.optim.SGD(model.parameters(), lr=0.2)))
    for x, y in _batches(size):
        with accelerator.accumulate(model):
            gs.backward(opt, _losses(model, x, y), accelerator=accelerator if accelerator_arg else None)
            opt.step()
            opt.zero_grad()
    return model, opt.optimizer


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("method", list(METHODS))
def test_accumulate_2_on_half_batches_equals_the_whole_batch(method: str) -> None:
    model, wrapper = _accumulated(method, 4)
    expected = _whole_batches(method, 8)
    assert _max_difference(model, expected) < 1e-6
    assert wrapper.state_dict()["gradsurgery"]["num_tasks"] == TASKS


def test_without_the_accelerator_accumulate_sums_the_micro_batches() -> None:
    # What users got before: each micro-batch's full gradient, twice the whole batch's with SGD.
    model, _ = _accumulated("MGDA", 4, accelerator_arg=False)
    assert _max_difference(model, _whole_batches("MGDA", 8)) > 1e-2


@pytest.mark.parametrize("method", ["MGDA", "UW"])
def test_the_accelerators_scaler_scales_as_the_amp_loop(method: str) -> None:
    # Accelerate's fp16 scaler exists on GPUs only; on the CPU one is given to the accelerator by hand
    # so that the same code path (gs.backward's scaler=, the AcceleratedOptimizer's scaler.step) runs.
    # (Not clip_grad_norm_: it unscales only when Accelerate itself set up fp16.)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model = MultiTask()
    model, opt = accelerator.prepare(model, METHODS[method](torch.optim.SGD(model.parameters(), lr=0.2)))
    for x, y in _batches(8):
        gs.backward(opt, _losses(model, x, y), accelerator=accelerator)
        opt.step()
        opt.zero_grad()

    expected = MultiTask()
    ref = METHODS[method](torch.optim.SGD(expected.parameters(), lr=0.2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in _batches(8):
        ref.zero_grad()
        ref.backward(_losses(expected, x, y), scaler=scaler)
        scaler.step(ref)
        scaler.update()
    assert accelerator.scaler.get_scale() == 2.0**12
    assert _max_difference(model, expected) == 0.0


def test_bf16_autocast_leaves_the_wrappers_gram_in_fp32() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = MultiTask()
    model, opt = accelerator.prepare(model, gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.2)))
    x, y = _batches(8)[0]
    with accelerator.autocast():
        losses = _losses(model, x, y)
        assert torch.is_autocast_enabled("cpu")
        gs.backward(opt, losses, accelerator=accelerator)
    assert opt.optimizer.last_gram.dtype == torch.float32
    assert model.trunk[0].weight.grad.dtype == torch.float32


def test_save_state_and_load_state_resume_bit_identically(tmp_path: Path) -> None:
    def run(steps: range, load: Path | None = None, save: Path | None = None) -> tuple[nn.Module, gs.GradSurgery]:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = MultiTask()
        model, opt = accelerator.prepare(model, gs.PCGrad(torch.optim.Adam(model.parameters(), lr=1e-2), seed=0))
        if load is not None:
            accelerator.load_state(str(load))
        batches = _batches(4)
        for i in steps:
            with accelerator.accumulate(model):
                gs.backward(opt, _losses(model, *batches[i]), accelerator=accelerator)
                opt.step()
                opt.zero_grad()
            if save is not None and i == 3:
                accelerator.save_state(str(save))
        return model, opt.optimizer

    straight, _ = run(range(8), save=tmp_path / "ckpt")
    resumed, wrapper = run(range(4, 8), load=tmp_path / "ckpt")
    assert _max_difference(resumed, straight) == 0.0
    saved = torch.load(tmp_path / "ckpt" / "optimizer.bin", weights_only=True)["gradsurgery"]
    assert saved["method"] == "PCGrad" and saved["num_tasks"] == TASKS
    assert wrapper.state_dict()["gradsurgery"]["num_tasks"] == TASKS


def test_deepspeed_is_refused() -> None:
    class DeepSpeedLike:
        distributed_type = type("Kind", (), {"value": "DEEPSPEED"})()
        scaler = None
        gradient_accumulation_steps = 1

    model = MultiTask()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="DEEPSPEED"):
        gs.backward(opt, _losses(model, *_batches(8)[0]), accelerator=DeepSpeedLike())
    assert all(p.grad is None for p in model.parameters())


def test_unwrap_finds_the_wrapper_through_the_proxies_and_names_what_it_got() -> None:
    accelerator = Accelerator(cpu=True)
    model = MultiTask()
    wrapper = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    assert unwrap(wrapper) is wrapper
    prepared = accelerator.prepare(wrapper)
    assert unwrap(prepared) is wrapper
    plain = accelerator.prepare(torch.optim.Adam(MultiTask().parameters()))
    with pytest.raises(TypeError, match="got AcceleratedOptimizer -> Adam: wrap the torch optimizer"):
        gs.backward(plain, _losses(model, *_batches(8)[0]))
    with pytest.raises(TypeError, match="got SGD"):
        unwrap(wrapper.optimizer)  # the inner optimizer is not the wrapper


def test_the_recipe_in_docs_accelerate_md_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "accelerate.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "recipe"}
    exec(compile(blocks[1] + blocks[2], "docs/accelerate.md", "exec"), namespace)
    wrapper = namespace["wrapper"]
    assert isinstance(wrapper, gs.MGDA)
    assert set(wrapper.diagnostics(flat=True)) == {f"norm/{t}" for t in range(3)} | {"cos/0-1", "cos/0-2", "cos/1-2", "conflicts"} | {
        f"weight/{t}" for t in range(3)
    }
    assert (tmp_path / "checkpoint" / "optimizer.bin").exists()
    assert "gs.backward(opt, losses, accelerator=accelerator)" in blocks[0]
