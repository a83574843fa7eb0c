"""Study 1: the two-task toy of the CAGrad paper (Liu et al., NeurIPS 2021, Fig. 1).

Two losses of ``x = (x1, x2)``: on the upper half-plane each is a logarithmic valley ``h_t``, on the
lower half a quadratic bowl ``q_t``, blended by ``c1 = max(tanh(x2/2), 0)`` and
``c2 = max(tanh(−x2/2), 0)``. The three starting points and Adam(lr 1e-3) are the paper's; every start
is a separate run through the public wrapper (the wrappers treat all parameters as shared, so batching
starts into one parameter would couple them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import figures
from bench.methods import lookup

from .methods import REPRESENTATION, label, make_optimizer
from .report import MakeBar, Report, Table, num

STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
LR = 1e-3
PAPER_STEPS = 100_000
CAGRAD_C = 0.5  # the paper's toy value (the benchmarks' 0.4 is its NYUv2/Cityscapes one)
LOWER = 5e-6
BOX = (-10.0, 10.0)
# Why a method the study compares is not run on the toy: it has no shared representation, so no
# representation mode; Adam is invariant to the gradient's scale, so Mean is Sum.
SKIPPED: dict[str, str] = {
    "mean": "equals Sum under Adam (scale-invariant)",
    **{name: "no shared representation in the toy" for name in REPRESENTATION},
}
NEGATIVE_LOSSES = "takes the logarithm of the losses, and the toy's losses go below 0"


def skip_reason(method: str) -> str | None:
    """Why ``method`` does not run on the toy, or ``None``."""
    if method in SKIPPED:
        return SKIPPED[method]
    loss = getattr(lookup(method), "loss", None)
    return NEGATIVE_LOSSES if loss is not None and loss.positive else None


def runs_on_toy(method: str) -> bool:
    return skip_reason(method) is None


@dataclass(frozen=True)
class ToyConfig:
    steps: int
    pareto_weights: int
    trajectory_points: int


def toy_losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` at ``x[..., 0] = x1``, ``x[..., 1] = x2`` (any batch shape)."""
    x1, x2 = x[..., 0], x[..., 1]
    c1 = torch.tanh(x2 / 2).clamp_min(0)
    c2 = torch.tanh(-x2 / 2).clamp_min(0)
    h1 = torch.log((-(x1 + 7) / 2 + torch.tanh(x2)).abs().clamp_min(LOWER)) + 6
    h2 = torch.log((-(x1 - 3) / 2 - torch.tanh(x2) + 2).abs().clamp_min(LOWER)) + 6
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    return c1 * h1 + c2 * q1, c1 * h2 + c2 * q2


@dataclass
class Trajectory:
    method: str
    start: tuple[float, float]
    steps: int
    points: np.ndarray  # (n, 2): x every `every` steps, first and last step included
    every: int
    seconds: float


def run_trajectory(
    method: str, start: tuple[float, float], steps: int, *, points: int, seed: int, tick: Callable[[int], None]
) -> Trajectory:
    """``steps`` Adam steps of ``method`` from ``start``, recording ``≈points`` positions."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = make_optimizer(method, torch.optim.Adam([x], lr=LR), seed=seed, num_tasks=2, options={"CAGrad": {"c": CAGRAD_C}})
    every = max(1, steps // points)
    trace = torch.empty(steps // every + 2, 2)
    trace[0] = x.detach()
    n = 1
    chunk = max(1, steps // 100)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad()
        opt.backward(list(toy_losses(x)))
        opt.step()
        if step % every == 0 or step == steps:
            trace[n] = x.detach()
            n += 1
        if step % chunk == 0:
            tick(chunk)
    tick(steps % chunk)
    seconds = time.perf_counter() - began
    return Trajectory(method, start, steps, trace[:n].numpy().copy(), every, seconds)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(*BOX, n)
    X1, X2 = np.meshgrid(axis, axis)
    with torch.no_grad():
        L1, L2 = toy_losses(torch.from_numpy(np.stack([X1, X2], axis=-1)))
    return X1, X2, L1.numpy(), L2.numpy()


def pareto_set(n_weights: int, *, grid: int = 201) -> np.ndarray:
    """Points of the Pareto set, ordered from the minimiser of ``L2`` to that of ``L1``, ``(m, 2)``.

    Sweeps the weighted-sum minimisers ``argmin_x αL1 + (1−α)L2`` for ``n_weights`` values of ``α``:
    each starts from the best point of a ``grid × grid`` grid of ``BOX²`` (so the sweep finds the global
    minimiser, not the nearest valley) and is polished by L-BFGS in float64. The front of this toy is
    convex (both losses are bowls ``c2·q_t`` below the x1-axis, where they reach ``−20``, against
    ``≥ −6.2`` above it), so the sweep traces the whole Pareto set.
    """
    X1, X2, L1, L2 = _grid(grid)
    points = []
    for alpha in np.linspace(0.0, 1.0, n_weights):
        best = np.argmin(alpha * L1 + (1 - alpha) * L2)
        x = torch.tensor([X1.ravel()[best], X2.ravel()[best]], dtype=torch.float64, requires_grad=True)
        solver = torch.optim.LBFGS([x], lr=1.0, max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            solver.zero_grad()
            l1, l2 = toy_losses(x)
            value = alpha * l1 + (1 - alpha) * l2
            value.backward()
            return value

        solver.step(closure)
        points.append(x.detach().numpy().copy())
    return np.array(points)


def distance_to_polyline(point: np.ndarray, line: np.ndarray) -> float:
    """Euclidean distance from ``point`` to the polyline through the rows of ``line``."""
    a, b = line[:-1], line[1:]
    ab = b - a
    length2 = np.maximum((ab * ab).sum(axis=1), 1e-300)
    t = np.clip(((point - a) * ab).sum(axis=1) / length2, 0.0, 1.0)
    nearest = a + t[:, None] * ab
    return float(np.min(np.linalg.norm(nearest - point, axis=1)))


def min_norm(point: np.ndarray) -> float:
    """``min_{α∈[0,1]} ‖α∇L1 + (1−α)∇L2‖`` at ``point``: 0 exactly at Pareto-stationary points."""
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    (g1,) = torch.autograd.grad(l1, x, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, x)
    diff = g1 - g2
    denom = float(diff @ diff)
    alpha = 0.5 if denom == 0 else min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
    return float((alpha * g1 + (1 - alpha) * g2).norm())


def summarize(traj: Trajectory, pareto: np.ndarray) -> dict[str, object]:
    """The numbers one run contributes to ``results.json``."""
    final = traj.points[-1]
    with torch.no_grad():
        l1, l2 = toy_losses(torch.tensor(final, dtype=torch.float64))
    stride = max(1, len(traj.points) // 200)
    return {
        "start": list(traj.start),
        "steps": traj.steps,
        "final": final.tolist(),
        "L1": float(l1),
        "L2": float(l2),
        "mean_loss": float((l1 + l2) / 2),
        "distance_to_pareto_set": distance_to_polyline(final, pareto),
        "min_norm": min_norm(final),
        "seconds": traj.seconds,
        "step_us": 1e6 * traj.seconds / traj.steps,
        "trajectory_every": traj.every * stride,
        "trajectory": np.vstack([traj.points[::stride], traj.points[-1:]]).tolist(),
    }


TITLE = "1. Two-task toy (CAGrad paper, Fig. 1)"


def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
    """Notes and the final-point table for ``results.md`` / ``results.tex``."""
    if "steps" not in data:
        return [], []
    steps = data["steps"]
    shortfall = "" if steps >= PAPER_STEPS else f" — fewer than the paper's {PAPER_STEPS:,}, so trajectories may stop short"
    notes = [
        f"Adam (lr {LR:g}), **{steps:,} steps per run**{shortfall}; CAGrad c = {CAGRAD_C}; every start is a "
        "separate run through the public wrapper. Pareto set: weighted-sum minimisers "
        f"({data['pareto_weights']} weights, L-BFGS-polished). *dist* is the distance from the final point "
        "to the Pareto set; *min-norm* is min over α of ‖α∇L1 + (1−α)∇L2‖ there (0 = Pareto-stationary).",
    ]
    rows = []
    for method, runs in data.get("runs", {}).items():
        for run in runs:
            rows.append([
                label(method), f"({num(run['start'][0], 'g')}, {num(run['start'][1], 'g')})",
                f"({num(run['final'][0], '.2f')}, {num(run['final'][1], '.2f')})", num(run["L1"], ".3f"),
                num(run["L2"], ".3f"), num(run["mean_loss"], ".3f"), num(run["distance_to_pareto_set"], ".3f"),
                num(run["min_norm"], ".1e"),
            ])
    table = Table(
        label="gradsurgery-toy",
        caption=f"CAGrad toy: final points after {steps:,} Adam steps (lr {LR:g}) from the paper's three starts.",
        columns=["Method", "Start", "Final x", "L1", "L2", "(L1+L2)/2", "dist", "min-norm"],
        rows=rows, align="lllrrrrr",
    )
    return notes, [table] if rows else []


def prepare(cfg: ToyConfig, methods: Sequence[str], report: Report) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """Register the study, compute the Pareto set; returns the JSON dict, the methods to run, the set."""
    data = report.study("toy", TITLE, describe)
    chosen = [m for m in methods if runs_on_toy(m)]
    data.update({
        "steps": cfg.steps, "paper_steps": PAPER_STEPS, "lr": LR, "cagrad_c": CAGRAD_C, "starts": [list(s) for s in STARTS],
        "pareto_weights": cfg.pareto_weights, "skipped_methods": {m: skip_reason(m) for m in methods if not runs_on_toy(m)},
        "runs": {}, "device": "cpu",
    })
    pareto = pareto_set(cfg.pareto_weights)
    data["pareto_set"] = pareto.tolist()
    report.flush()
    return data, chosen, pareto


def run_methods(
    cfg: ToyConfig, methods: Sequence[str], pareto: np.ndarray, *,
    tick: Callable[[int], None], on_method: Callable[[str, list[dict[str, Any]]], None],
) -> None:
    """Every method from every start; ``on_method`` receives each method's runs as soon as they finish."""
    for method in methods:
        runs = []
        for start in STARTS:
            traj = run_trajectory(method, start, cfg.steps, points=cfg.trajectory_points, seed=0, tick=tick)
            runs.append(summarize(traj, pareto))
        on_method(method, runs)


def total_steps(cfg: ToyConfig, methods: Sequence[str]) -> int:
    return len(methods) * len(STARTS) * cfg.steps


def run_study(cfg: ToyConfig, methods: Sequence[str], report: Report, make_bar: MakeBar) -> None:
    """The toy in this process; each finished method is flushed to the report."""
    data, chosen, pareto = prepare(cfg, methods, report)

    def store(method: str, runs: list[dict[str, Any]]) -> None:
        data["runs"][method] = runs
        report.flush()

    with make_bar(total_steps(cfg, chosen), "toy") as bar:
        run_methods(cfg, chosen, pareto, tick=bar.update, on_method=store)


def draw(data: dict[str, Any], report: Report) -> None:
    """The trajectory figure from whatever runs have finished."""
    if not data.get("runs"):
        return
    X1, X2, L1, L2 = _grid(201)
    name = "toy_trajectories.png"
    figures.toy_trajectories(report.out / name, (X1, X2, (L1 + L2) / 2), np.asarray(data["pareto_set"]),
                             data["runs"], data["steps"], PAPER_STEPS)
    report.add_figure("toy", name, f"Toy trajectories ({data['steps']:,} steps per run) over the contours of "
                      "(L1+L2)/2, Pareto set in gold")
