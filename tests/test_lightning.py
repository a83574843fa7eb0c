"""PyTorch Lightning, manual optimization: the ``LightningOptimizer`` proxy keeps the wrapper's state,
``self.manual_backward(losses)`` (``GradSurgeryMixin``) runs Lightning's hooks and precision plugins
around the wrapper's backward and trains as the plain loop does, checkpoints resume bit-identically,
and 2-process DDP trains as one process on the whole batch.

The module, its data and the plain-PyTorch references are in ``tests/lightning_app.py``.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

import gradsurgery as gs  # noqa: E402
from gradsurgery.integrations.lightning import GradSurgeryMixin  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from .lightning_app import METHODS, MultiTask, data, reference, task_losses, trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIT_METHODS = ["PCGrad", "CAGrad", "MGDA"]


@pytest.fixture(autouse=True)
def quiet(one_thread: None) -> None:
    # Lightning's tips, its "few workers" and "no logger" notices: nothing the tests look at.
    warnings.filterwarnings("ignore", module="lightning")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, a), b in zip(_params(actual).items(), _params(expected).values()):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("method", FIT_METHODS)
def test_manual_backward_trains_as_the_plain_loop_and_runs_the_hooks(tmp_path: Path, method: str) -> None:
    model = MultiTask(method)
    run = trainer(2, tmp_path)
    run.fit(model, data())
    _assert_equal(model, reference(method, 2))
    steps = 2 * len(data())
    assert run.global_step == steps
    assert model.hooks == [("on_before_backward", (3,)), ("on_after_backward", True)] * steps
    wrapper = run.optimizers[0]
    assert type(wrapper).__name__ == method
    assert set(wrapper.diagnostics(flat=True)) >= {"norm/0", "norm/2", "cos/0-1", "cos/1-2", "conflicts", "weight/2"}


def test_the_proxy_backward_keeps_the_state_on_the_wrapper(tmp_path: Path) -> None:
    # opt.backward on self.optimizers()'s LightningOptimizer, no mixin hooks: what a user writes first.
    model = MultiTask(via="proxy", nonfinite="skip", nan_at=2)
    run = trainer(1, tmp_path)
    run.fit(model, data())
    wrapper = run.optimizers[0]
    assert isinstance(wrapper, gs.PCGrad) and type(wrapper).__name__ == "PCGrad"
    assert wrapper.skipped_steps == 1
    assert wrapper.diagnostics()["conflicts"] >= 0 and len(wrapper.diagnostics()["norms"]) == 3
    run.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["optimizer_states"][0]["gradsurgery"]
    assert saved["num_tasks"] == 3 and saved["skipped_steps"] == 1 and saved["method"] == "PCGrad"
    assert model.hooks == []


def test_manual_backward_skips_a_nonfinite_step_on_the_wrapper(tmp_path: Path) -> None:
    model = MultiTask(nonfinite="skip", nan_at=1)
    run = trainer(1, tmp_path)
    run.fit(model, data())
    assert run.optimizers[0].skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", FIT_METHODS)
def test_resume_from_a_checkpoint_continues_bit_identically(tmp_path: Path, method: str) -> None:
    straight = MultiTask(method)
    trainer(2, tmp_path / "straight").fit(straight, data())
    first = MultiTask(method)
    run = trainer(1, tmp_path / "first")
    run.fit(first, data())
    run.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = MultiTask(method)
    trainer(2, tmp_path / "resumed").fit(resumed, data(), ckpt_path=tmp_path / "epoch1.ckpt")
    _assert_equal(resumed, straight)


def test_gradient_clipping_sees_the_surgery(tmp_path: Path) -> None:
    model = MultiTask(clip=0.05)
    trainer(1, tmp_path).fit(model, data())
    _assert_equal(model, reference("PCGrad", 1, clip=0.05))
    unclipped = reference("PCGrad", 1)
    assert any(not torch.equal(a, b) for a, b in zip(_params(model).values(), _params(unclipped).values()))


def test_64_true_trains_in_double_as_the_plain_loop(tmp_path: Path) -> None:
    model = MultiTask()
    trainer(1, tmp_path, precision="64-true").fit(model, data())
    assert model.trunk[0].weight.dtype == torch.float64
    # 64-true: a float64 module and inputs, and float64 as the default dtype inside the training step
    # (so Adam's step counter is float64 too).
    expected = MultiTask().double()
    opt = gs.PCGrad(torch.optim.Adam(expected.parameters(), lr=1e-2), seed=0)
    batches = list(data())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for x, y in batches:
            losses = task_losses(expected, (x.double(), y.double()))
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
    finally:
        torch.set_default_dtype(default)
    _assert_equal(model, expected)


def test_bf16_mixed_trains_under_autocast(tmp_path: Path) -> None:
    model = MultiTask()
    run = trainer(1, tmp_path, precision="bf16-mixed")
    run.fit(model, data())
    assert run.precision_plugin.scaler is None
    # The training step's autocast region is left for the wrapper's backward: no bf16 Gram matrix.
    assert run.optimizers[0].last_gram.dtype == torch.float32
    assert model.hooks[:2] == [("on_before_backward", (3,)), ("on_after_backward", True)]
    # Under bf16 autocast the forward differs from fp32's: close to the fp32 run, not equal to it.
    fp32 = _params(reference("PCGrad", 1))
    assert any(not torch.equal(a, fp32[name]) for name, a in _params(model).items())
    for name, a in _params(model).items():
        torch.testing.assert_close(a, fp32[name], atol=5e-2, rtol=0)


@pytest.mark.parametrize("method", ["PCGrad", "UW"])
def test_16_mixed_gives_its_scaler_to_the_wrapper(tmp_path: Path, method: str) -> None:
    # Trainer(precision="16-mixed") on the CPU becomes bf16-mixed (Lightning's choice); the plugin itself
    # runs fp16 autocast with a GradScaler on the CPU. Reference: the README's AMP loop with scaler=,
    # which scales a loss-weighting method's objective rather than its losses.
    model = MultiTask(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer(1, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, data())
    assert scaler.get_scale() == 2.0**10  # no overflow: every step was taken

    expected = MultiTask(method)
    opt = METHODS[method](torch.optim.Adam(expected.parameters(), lr=1e-2))
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in data():
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            losses = task_losses(expected, batch)
        opt.zero_grad()
        opt.backward(losses, scaler=ref_scaler)
        ref_scaler.step(opt)
        ref_scaler.update()
    _assert_equal(model, expected)


def test_log_dict_of_flat_diagnostics_reaches_the_logger(tmp_path: Path) -> None:
    model = MultiTask()
    trainer(1, tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(model, data())
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert {"cos/0-1", "cos/0-2", "cos/1-2", "norm/0", "weight/1", "conflicts"} <= set(rows[0])
    assert len([r for r in rows if r["cos/0-1"]]) == len(data())
    assert all(-1.0 <= float(r["cos/0-1"]) <= 1.0 for r in rows if r["cos/0-1"])


def test_one_scalar_loss_goes_to_lightning_unchanged(tmp_path: Path) -> None:
    class Single(MultiTask):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(sum(task_losses(self, batch)))
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Single()
    trainer(1, tmp_path).fit(model, data())
    expected = MultiTask()
    opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    for batch in data():
        opt.zero_grad()
        sum(task_losses(expected, batch)).backward()
        opt.step()
    _assert_equal(model, expected)


def test_several_losses_without_a_gradsurgery_wrapper_are_refused(tmp_path: Path) -> None:
    class Plain(MultiTask):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match=re.escape("configure_optimizers returned ['Adam'], 0 of them gradsurgery wrappers")):
        trainer(1, tmp_path).fit(Plain(), data())


def test_gs_backward_on_the_proxy_trains_as_the_wrapper(tmp_path: Path) -> None:
    class ViaFunction(MultiTask):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            gs.backward(opt, task_losses(self, batch))
            opt.step()

    model = ViaFunction("MGDA")
    trainer(1, tmp_path).fit(model, data())
    _assert_equal(model, reference("MGDA", 1))


def test_several_losses_under_automatic_optimization_are_refused(tmp_path: Path) -> None:
    class Automatic(MultiTask):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            return torch.stack(task_losses(self, batch))

    with pytest.raises(TypeError, match="set self.automatic_optimization = False"):
        trainer(1, tmp_path).fit(Automatic(), data())


def test_the_recipe_in_docs_lightning_md_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "lightning.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "recipe"}
    exec(compile("".join(blocks), "docs/lightning.md", "exec"), namespace)
    wrapper, run = namespace["wrapper"], namespace["trainer"]
    assert type(wrapper).__name__ == "PCGrad" and run.global_step == 16
    assert wrapper.last_gram.dtype == torch.float32
    assert {"cos/0-1", "norm/2", "weight/1", "conflicts"} <= set(run.logged_metrics)
    saved = torch.load(tmp_path / "multitask.ckpt", weights_only=False)["optimizer_states"][0]["gradsurgery"]
    assert saved["num_tasks"] == 3


def test_the_mixin_imports_no_framework() -> None:
    assert "lightning" not in GradSurgeryMixin.__module__.split(".")[:1]
    code = "import sys, gradsurgery, gradsurgery.integrations.lightning, gradsurgery.integrations.accelerate; " \
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'accelerate'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_ddp_on_two_processes_trains_as_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    # strategy="ddp": Lightning's launcher starts rank 1 by running the command again, so the run is a
    # script of its own (tests/lightning_app.py), not this pytest process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    run = subprocess.run(
        [sys.executable, "-m", "tests.lightning_app", "PCGrad", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected = _params(reference("PCGrad", 2))
    for name, value in expected.items():
        # DDP reduces no gradient under the wrapper's autograd.grad: equal ranks are the wrapper's own reduction.
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6)
    for record in ranks:
        assert record["global_step"] == 2 * len(data())
        assert record["state"]["num_tasks"] == 3
        assert record["diagnostics"] == ranks[0]["diagnostics"]
