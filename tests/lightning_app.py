"""The Lightning side of ``tests/test_lightning.py``: a multi-task module, its data, the plain-PyTorch
loop it must match, and the 2-process DDP run.

``python -m tests.lightning_app METHOD OUT_DIR`` trains :class:`MultiTask` with ``strategy="ddp"`` on
two CPU processes (gloo; Lightning's launcher starts the second by running this command again) and
saves each rank's parameters, diagnostics and optimizer state to ``OUT_DIR/rank{RANK}.pt``. The test
compares them with :func:`reference` in the pytest process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.integrations.lightning import GradSurgeryMixin

TASKS = 3
SAMPLES = 32
BATCH = 8
METHODS: dict[str, Callable[[torch.optim.Optimizer], gs.GradSurgery]] = {
    "PCGrad": lambda inner: gs.PCGrad(inner, seed=0),
    "CAGrad": lambda inner: gs.CAGrad(inner, c=0.4),
    "MGDA": lambda inner: gs.MGDA(inner),
    "UW": lambda inner: gs.UW(inner, num_tasks=TASKS),
}


def data(batch: int = BATCH) -> torch.utils.data.DataLoader:
    """Synthetic regression targets whose tasks conflict (task 1 is minus task 0, plus noise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 5, generator=g)
    base = torch.tanh(x @ torch.randn(5, 1, generator=g))
    y = torch.cat([base, -base + 0.1 * torch.randn(SAMPLES, 1, generator=g), torch.randn(SAMPLES, 1, generator=g)], 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def task_losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    x, y = batch
    z = model.trunk(x)
    return [nn.functional.mse_loss(head(z).squeeze(-1), y[:, t].to(z.dtype)) for t, head in enumerate(model.heads)]


class MultiTask(GradSurgeryMixin, L.LightningModule):
    """A shared trunk and one head per task, trained with manual optimization and ``manual_backward``."""

    def __init__(
        self,
        method: str = "PCGrad",
        *,
        via: str = "manual_backward",
        nonfinite: str = "raise",
        clip: float | None = None,
        nan_at: int | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.method, self.via, self.nonfinite, self.clip, self.nan_at = method, via, nonfinite, clip, nan_at
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(TASKS))
        self.hooks: list[tuple[str, Any]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        losses = task_losses(self, batch)
        if self.global_step == self.nan_at:
            losses[1] = losses[1] * float("nan")
        opt.zero_grad()
        if self.via == "proxy":  # the LightningOptimizer proxy's backward, no Lightning hooks
            opt.backward(losses)
        else:
            self.manual_backward(losses)
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        if opt.last_gram is not None:
            self.log_dict(opt.diagnostics(flat=True), on_step=True, on_epoch=False)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.hooks.append(("on_before_backward", tuple(loss.shape)))

    def on_after_backward(self) -> None:
        self.hooks.append(("on_after_backward", self.trunk[0].weight.grad is not None))

    def configure_optimizers(self) -> gs.GradSurgery:
        inner = torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.nonfinite != "raise":
            return gs.PCGrad(inner, seed=0, nonfinite=self.nonfinite)
        return METHODS[self.method](inner)


def trainer(epochs: int, root: Path, **kw: Any) -> L.Trainer:
    kw.setdefault("logger", False)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        **kw,
    )


def reference(method: str, epochs: int, *, batch: int = BATCH, clip: float | None = None) -> nn.Module:
    """The same training in plain PyTorch: the wrapper's documented loop, no Lightning."""
    model = MultiTask(method)
    opt = METHODS[method](torch.optim.Adam(model.parameters(), lr=1e-2))
    for _ in range(epochs):
        for b in data(batch):
            losses = task_losses(model, b)
            opt.zero_grad()
            opt.backward(losses)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return model


class Sharded(MultiTask):
    """Each rank's slice of :func:`data`: samples ``rank, rank + 2, ...`` in order (Lightning's own
    distributed sampler would shuffle), so each step's two local batches of ``BATCH // 2`` are
    together the single-process batch of ``BATCH``."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = data().dataset
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH // world, sampler=sampler)


def main(method: str, out: Path) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    model = Sharded(method)
    run = trainer(2, out, strategy="ddp", devices=2, use_distributed_sampler=False)
    run.fit(model)
    wrapper = run.optimizers[0]
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "diagnostics": wrapper.diagnostics(flat=True),
            "state": wrapper.state_dict()["gradsurgery"],
            "global_step": run.global_step,
        },
        out / f"rank{run.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
