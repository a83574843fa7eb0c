"""The study's PNG figures (matplotlib ``Figure`` objects, no pyplot: no display, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .methods import known, label

DPI = 130
COLOURS = {"stl": "black", "sum": "#1f77b4", "mean": "#17becf", "pcgrad": "#ff7f0e", "cagrad": "#2ca02c",
           "mgda": "#d62728", "mgda-ub": "#9467bd"}


def colour(method: str) -> Any:
    """The default run's colours as they were; any other method one of matplotlib's tab20, by its place."""
    if method in COLOURS:
        return COLOURS[method]
    from matplotlib import colormaps

    return colormaps["tab20"](known().index(method) % 20)


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    return fig, axes


def _panels(n: int, panel: tuple[float, float]) -> tuple[Any, np.ndarray]:
    """A grid of ``n`` panels, at most three per row; unused cells are hidden."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = _figure(rows, cols, (panel[0] * cols, panel[1] * rows))
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def toy_trajectories(
    path: Path, grid: tuple[np.ndarray, np.ndarray, np.ndarray], pareto: np.ndarray,
    runs: dict[str, list[dict[str, Any]]], steps: int, paper_steps: int,
) -> None:
    """One panel per method: trajectories from each start over the contours of ``(L1 + L2) / 2``."""
    X1, X2, mean_loss = grid
    fig, axes = _figure(1, len(runs), (3.2 * len(runs), 3.4))
    start_colours = ["#e41a1c", "#377eb8", "#4daf4a"]
    for ax, (method, method_runs) in zip(axes, runs.items()):
        ax.contourf(X1, X2, mean_loss, levels=30, cmap="Greys_r", alpha=0.85)
        ax.plot(pareto[:, 0], pareto[:, 1], color="gold", lw=3, label="Pareto set", zorder=2)
        for colour, run in zip(start_colours, method_runs):
            traj = np.asarray(run["trajectory"])
            ax.plot(traj[:, 0], traj[:, 1], color=colour, lw=1.6, zorder=3)
            ax.plot(*traj[0], "o", color=colour, ms=5, zorder=4)
            ax.plot(*traj[-1], "*", color=colour, ms=11, mec="black", mew=0.5, zorder=4)
        ax.set_title(label(method))
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    axes[0].legend(loc="upper center", fontsize=7)
    note = "" if steps >= paper_steps else f" (the paper runs {paper_steps:,})"
    fig.suptitle(f"CAGrad toy, contours of (L1+L2)/2: {steps:,} Adam steps per run, lr 1e-3{note}; ● start, ★ end")
    fig.savefig(path, dpi=DPI)


def digits_accuracy(path: Path, summary: dict[str, dict[str, Any]]) -> None:
    """Left- vs right-digit test accuracy per method, mean ± std over seeds."""
    fig, (ax,) = _figure(1, 1, (4.8, 4.2))
    for method, row in summary.items():
        ax.errorbar(
            row["test_left_mean"], row["test_right_mean"], xerr=row["test_left_std"], yerr=row["test_right_std"],
            fmt="s" if method == "stl" else "o", color=colour(method), capsize=3, label=label(method),
        )
    ax.set_xlabel("left digit: test accuracy (%)")
    ax.set_ylabel("right digit: test accuracy (%)")
    ax.set_title("MultiDigits (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)


def digits_conflicts(path: Path, histories: dict[str, dict[str, Any]]) -> None:
    """Conflict rate and weights over training, one panel per joint method (first seed)."""
    from gradsurgery.plot import plot_conflict_history

    fig, axes = _panels(len(histories), (4.2, 2.9))
    for ax, (method, diag) in zip(axes, histories.items()):
        plot_conflict_history(diag["history"], ax, steps=diag["steps"])
        ax.set_title(label(method))
    fig.savefig(path, dpi=DPI)


def digits_cosines(path: Path, histories: dict[str, dict[str, Any]], task_names: Sequence[str]) -> None:
    """Mean gradient cosine matrix over training, one heatmap per joint method (first seed)."""
    from gradsurgery.plot import plot_cosine_heatmap

    fig, axes = _panels(len(histories), (3.0, 2.6))
    for ax, (method, diag) in zip(axes, histories.items()):
        plot_cosine_heatmap(np.mean([h["cosine"] for h in diag["history"]], axis=0), ax, task_names)
        ax.set_title(label(method), fontsize=9)
    fig.savefig(path, dpi=DPI)


def conflict_sweep(path: Path, summary: dict[str, dict[str, list[float]]], noise_floor: float) -> None:
    """Final test loss (fraction of variance unexplained) against the angle between the tasks."""
    fig, axes = _figure(1, 3, (11.5, 3.4))
    titles = {"task1": "task 1", "task2": "task 2", "avg": "mean of the two tasks"}
    for ax, (key, title) in zip(axes, titles.items()):
        for method, row in summary.items():
            mean, std = np.asarray(row[f"{key}_mean"]), np.asarray(row[f"{key}_std"])
            style = "--" if method == "stl" else "-"
            ax.plot(row["angles"], mean, style, marker="o", ms=3, color=colour(method), label=label(method))
            ax.fill_between(row["angles"], mean - std, mean + std, color=colour(method), alpha=0.12)
        ax.axhline(noise_floor, color="grey", ls=":", lw=1, label="noise floor")
        ax.set_title(title)
        ax.set_xlabel("angle between the tasks' directions (°)")
        ax.set_xticks(summary[next(iter(summary))]["angles"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test MSE / Var(y)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Conflict sweep: shared-bottom regression (mean ± std over seeds; lower is better)")
    fig.savefig(path, dpi=DPI)
