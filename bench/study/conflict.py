"""Study 3: conflict sweep — shared-bottom regression with a controlled angle between the tasks.

The synthetic two-task regression of the MMoE paper (Ma et al., KDD 2018, §4.1): orthonormal
``u1, u2 ∈ R^d``; task weight vectors ``w1 = u1`` and ``w2 = cos θ · u1 + sin θ · u2``, so ``θ`` is the
angle between the tasks' optimal directions (0°: the same task; 180°: opposite); targets
``y_t = w_tᵀx + Σ_i sin(α_i w_tᵀx + β_i) + ε`` (3 sinusoids here, MMoE uses 10), ``x ~ N(0, I)``. The
sinusoids keep the tasks nonlinear, so a task head cannot absorb a sign flip and 180° is a real
conflict. A narrow shared ReLU layer (the bottleneck the tasks compete for) feeds a linear head per
task; single-task networks of the same shape are the reference. Losses are reported as test MSE
divided by the target variance (fraction of variance unexplained), comparable across angles; the
noise floor is ``σ² / Var(y)``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.methods import CAGRAD_C

from . import figures
from .methods import known, label
from .report import Report, Table
from .training import SharedBottom, train

N_SINES = 3
NOISE = 0.1


@dataclass(frozen=True)
class ConflictConfig:
    angles: tuple[float, ...]
    dim: int
    hidden: int
    n_train: int
    n_test: int
    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class TaskData:
    x_train: torch.Tensor
    y_train: torch.Tensor  # (n, 2), standardised per task with the training statistics
    x_test: torch.Tensor
    y_test: torch.Tensor
    noise_floor: tuple[float, float]


def make_tasks(angle_deg: float, *, seed: int, dim: int, n_train: int, n_test: int) -> TaskData:
    """Train/test data of the two tasks at ``angle_deg`` (same seed: same ``u``, ``α``, ``β``, ``x``)."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    theta = math.radians(angle_deg)
    w = torch.stack([basis[:, 0], math.cos(theta) * basis[:, 0] + math.sin(theta) * basis[:, 1]], dim=1)
    alpha = torch.randn(N_SINES, generator=gen, dtype=torch.float64)
    beta = torch.randn(N_SINES, generator=gen, dtype=torch.float64)
    x = torch.randn(n_train + n_test, dim, generator=gen, dtype=torch.float64)
    noise = NOISE * torch.randn(n_train + n_test, 2, generator=gen, dtype=torch.float64)
    proj = x @ w
    y = proj + torch.sin(proj[..., None] * alpha + beta).sum(-1) + noise
    # Standardising keeps both tasks' losses on one scale at every angle; the noise scales with them.
    mean, std = y[:n_train].mean(0), y[:n_train].std(0)
    y = (y - mean) / std
    floor = (NOISE / std) ** 2
    return TaskData(
        x[:n_train].float(), y[:n_train].float(), x[n_train:].float(), y[n_train:].float(),
        (float(floor[0]), float(floor[1])),
    )


def make_net(dim: int, hidden: int, n_heads: int) -> SharedBottom:
    """``hidden`` shared ReLU units and a linear head per task: the heads add no capacity of their own,
    so at large angles the two tasks compete for the few shared units."""
    encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
    return SharedBottom(encoder, [nn.Linear(hidden, 1) for _ in range(n_heads)])


def _losses(tasks: Sequence[int]) -> Callable[[Sequence[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    def losses(outputs: Sequence[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.mse_loss(out.squeeze(-1), y[:, t]) for out, t in zip(outputs, tasks)]

    return losses


def run_point(
    method: str, angle: float, seed: int, cfg: ConflictConfig, device: torch.device, tick: Callable[[int], None]
) -> dict[str, Any]:
    """Final test losses of ``method`` (``"stl"``: two single-task networks) at one angle and seed."""
    data = make_tasks(angle, seed=seed, dim=cfg.dim, n_train=cfg.n_train, n_test=cfg.n_test)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    groups = [[0], [1]] if method == "stl" else [[0, 1]]
    test_loss = [0.0, 0.0]
    step_ms = []
    for tasks in groups:
        torch.manual_seed(seed)
        net = make_net(cfg.dim, cfg.hidden, len(tasks)).to(device)
        loss_fn = _losses(tasks)

        def evaluate(model: SharedBottom) -> dict[str, float]:
            _, outputs = model(x_test)
            return {str(t): float(v) for t, v in zip(tasks, loss_fn(outputs, y_test))}

        log = train(
            net, None if method == "stl" else method, x_train, y_train, loss_fn,
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
            evaluate=evaluate, log_every=10**9, tick=tick,
        )
        for t in tasks:
            test_loss[t] = log.evals[-1][str(t)]
        step_ms.append(log.median_step_ms)
    return {"test_loss": test_loss, "noise_floor": list(data.noise_floor), "median_step_ms": statistics.median(step_ms)}


def summarize(points: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Per method and angle: mean and std over seeds of each task's loss and of their mean."""
    out: dict[str, dict[str, list[float]]] = {}
    for method, by_angle in points.items():
        row: dict[str, list[float]] = {"angles": []}
        for key in ("task1_mean", "task1_std", "task2_mean", "task2_std", "avg_mean", "avg_std"):
            row[key] = []
        for angle, seeds in by_angle.items():
            losses = [r["test_loss"] for r in seeds.values()]
            row["angles"].append(float(angle))
            for key, values in (
                ("task1", [l[0] for l in losses]),
                ("task2", [l[1] for l in losses]),
                ("avg", [(l[0] + l[1]) / 2 for l in losses]),
            ):
                row[f"{key}_mean"].append(statistics.fmean(values))
                row[f"{key}_std"].append(statistics.stdev(values) if len(values) > 1 else 0.0)
        out[method] = row
    return out


TITLE = "Conflict sweep (shared-bottom regression, angle between the tasks)"


def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
    summary = data.get("summary")
    if not summary:
        return [], []
    cfg = data["config"]
    notes = [
        f"MMoE-style synthetic regression (d = {cfg['dim']}, {cfg['hidden']} shared ReLU units, linear heads), "
        f"{cfg['epochs']} epochs of Adam (lr {cfg['lr']:g}, batch {cfg['batch_size']}) on {cfg['n_train']:,} samples; "
        f"test MSE / Var(y) (lower is better; noise floor ≈ {data['noise_floor']:.3f}), mean over seeds "
        f"{data['seeds']}. Single-task = one network of the same shape per task.",
    ]
    angles = [float(a) for a in cfg["angles"]]
    methods = [m for m in ("stl", *known()) if m in summary]
    # Mid-run, some methods have reached fewer angles than others: those cells stay empty.
    avg = {m: dict(zip(summary[m]["angles"], summary[m]["avg_mean"])) for m in methods}
    rows = []
    for method in methods:
        row = summary[method]
        last = row["angles"].index(angles[-1]) if angles[-1] in row["angles"] else None
        worse = "—" if last is None else f"{max(row['task1_mean'][last], row['task2_mean'][last]):.3f}"
        rows.append([label(method), *(f"{avg[method][a]:.3f}" if a in avg[method] else "—" for a in angles), worse])
    bold = set()
    for col, angle in enumerate(angles, start=1):
        joint = {i: avg[m][angle] for i, m in enumerate(methods) if m != "stl" and angle in avg[m]}
        if joint:
            bold.add((min(joint, key=joint.__getitem__), col))
    table = Table(
        label="gradsurgery-conflict",
        caption="Conflict sweep: mean test loss of the two tasks (MSE / Var(y), lower is better) by angle "
        "between the tasks' directions; last column: worse task at the largest angle.",
        columns=["Method"] + [f"{a:g}°" for a in angles] + [f"worse task, {angles[-1]:g}°"],
        rows=rows, align="l" + "r" * (len(angles) + 1), bold=frozenset(bold),
    )
    return notes, [table]


def prepare(cfg: ConflictConfig, methods: Sequence[str], seeds: Sequence[int], device: torch.device, report: Report) -> dict[str, Any]:
    """Register the study (its methods: the single-task reference and ``methods``)."""
    data = report.study("conflict", TITLE, describe)
    floor = make_tasks(0.0, seed=seeds[0], dim=cfg.dim, n_train=cfg.n_train, n_test=cfg.n_test).noise_floor
    data.update({"config": asdict(cfg), "seeds": list(seeds), "cagrad_c": CAGRAD_C, "n_sines": N_SINES,
                 "noise": NOISE, "noise_floor": float(statistics.fmean(floor)), "device": str(device), "points": {}})
    return data


def run_unit(cfg: ConflictConfig, method: str, seed: int, device: str) -> dict[str, dict[str, Any]]:
    """One unit of work (in a worker process): ``method`` (or ``"stl"``) at every angle for one seed."""
    return {f"{angle:g}": run_point(method, angle, seed, cfg, torch.device(device), lambda n: None) for angle in cfg.angles}


def store(data: dict[str, Any], method: str, seed: int, result: dict[str, dict[str, Any]]) -> str:
    """A finished unit into the study's data, the summary recomputed; returns its log line's result."""
    by_angle = data["points"].setdefault(method, {})
    for angle in (f"{a:g}" for a in data["config"]["angles"]):
        by_angle.setdefault(angle, {})[str(seed)] = result[angle]
    data["summary"] = summarize(data["points"])
    return headline(result)


def headline(result: dict[str, dict[str, Any]]) -> str:
    """A finished unit's one-line result for the log: the mean test loss at each angle."""
    return "test loss by angle " + ", ".join(f"{a}° {sum(p['test_loss']) / 2:.3f}" for a, p in result.items())


def draw(data: dict[str, Any], report: Report) -> None:
    if not data.get("summary"):
        return
    figures.conflict_sweep(report.out / "conflict_sweep.png", data["summary"], data["noise_floor"])
    report.add_figure("conflict", "conflict_sweep.png", "Final per-task test loss against the angle between the tasks")
