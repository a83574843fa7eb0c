"""The study's PNG figures (matplotlib ``Figure`` objects, no pyplot: no display, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .methods import known, label, ordered, split_entry

DPI = 130
COLOURS = {"stl": "black", "naive": "grey", "sum": "#1f77b4", "mean": "#17becf", "pcgrad": "#ff7f0e",
           "cagrad": "#2ca02c", "mgda": "#d62728", "mgda-ub": "#9467bd"}
# Loss-weighting methods, in the registry's order: none of the gradient methods' colours.
LOSS_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173", "#7f7f7f")
START_COLOURS = ("#e41a1c", "#ff7f00", "#e7298a")  # red, orange, magenta: visible on viridis


def colour(method: str) -> Any:
    """The default run's colours as they were; a loss-weighting method one of ``LOSS_COLOURS``, any
    other method one of matplotlib's tab20b, by its place; a cheap mode its method's."""
    base = split_entry(method)[0]
    if base in COLOURS:
        return COLOURS[base]
    from matplotlib import colormaps

    from bench.methods import names_of

    losses = names_of("loss")
    if base in losses:
        return LOSS_COLOURS[losses.index(base) % len(LOSS_COLOURS)]
    return colormaps["tab20b"](known().index(base) % 20)


def _figure(rows: int, cols: int, size: tuple[float, float], **kwargs: Any) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, **kwargs)).ravel()
    return fig, axes


def toy_trajectories(
    path: Path, grid: tuple[np.ndarray, np.ndarray, np.ndarray], pareto: np.ndarray, target: np.ndarray,
    runs: dict[str, list[dict[str, Any]]], steps: int, paper_steps: int,
) -> None:
    """One panel per method: trajectories from each start over the contours of ``(L1 + L2) / 2``, with
    a legend for the starts and the marks, and one colour bar for the contours."""
    from matplotlib.lines import Line2D

    X1, X2, mean_loss = grid
    n = len(runs)
    fig, axes = _figure(1, n, (3.0 * n + 1.2, 3.9), sharey=True)
    # Levels at quantiles of the grid's values: the log valleys of the upper half span a few units
    # against the bowl's twenty below, and evenly spaced levels would leave them blank.
    levels = np.unique(np.quantile(mean_loss, np.linspace(0.0, 1.0, 31)))
    filled = None
    for ax, (method, method_runs) in zip(axes, runs.items()):
        filled = ax.contourf(X1, X2, mean_loss, levels=levels, cmap="viridis", alpha=0.9)
        ax.plot(pareto[:, 0], pareto[:, 1], color="gold", lw=3, zorder=2)
        ax.plot(*target, marker="*", color="gold", ms=15, mec="black", mew=0.8, ls="none", zorder=5)
        for k, (start_colour, run) in enumerate(zip(START_COLOURS, method_runs)):
            traj = np.asarray(run["trajectory"])
            ax.plot(traj[:, 0], traj[:, 1], color=start_colour, lw=1.6, zorder=3)
            ax.plot(*traj[0], "o", color=start_colour, ms=7, mec="black", mew=0.6, zorder=4)
            ax.plot(*traj[-1], "X", color=start_colour, ms=8, mec="black", mew=0.6, zorder=6)
            # The end point's distances to the Pareto set and to the star, in the gap between the valleys.
            ax.text(0.0, 8.6 - 1.25 * k, f"{run['distance_to_pareto_set']:.2f} / {run['distance_to_average_loss_minimum']:.2f}",
                    color=start_colour, ha="center", va="center", fontsize=8, fontweight="bold", zorder=7,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_title(label(method))
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    starts = next(iter(runs.values()))
    handles = [Line2D([], [], color=c, marker="o", lw=1.6, label=f"from ({r['start'][0]:g}, {r['start'][1]:g})")
               for c, r in zip(START_COLOURS, starts)]
    handles += [
        Line2D([], [], color="black", marker="X", ls="none", mfc="white", label="end point"),
        Line2D([], [], color="gold", lw=3, label="Pareto set"),
        Line2D([], [], color="gold", marker="*", ms=12, mec="black", ls="none", label="minimum of (L1+L2)/2 (★)"),
        Line2D([], [], ls="none", label="numbers: end point's distance to the Pareto set / to ★"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    bar = fig.colorbar(filled, ax=list(axes), label="(L1 + L2) / 2 (levels at quantiles)", shrink=0.85, pad=0.02,
                       spacing="uniform")
    bar.set_ticks(levels[::5], labels=[f"{v:.1f}" for v in levels[::5]])
    note = "" if steps >= paper_steps else f" (the paper runs {paper_steps:,})"
    fig.suptitle(f"CAGrad toy (Liu et al. 2021, Fig. 1): {steps:,} Adam steps, lr 1e-3, from the paper's three starts{note}")
    fig.savefig(path, dpi=DPI)


def digits_accuracy(path: Path, summary: dict[str, dict[str, Any]], tasks: Sequence[str], headers: Sequence[str]) -> bool:
    """Per joint method: each task's test accuracy minus the single-task model's (points), and Δm%.
    ``False`` (nothing drawn) before the single-task reference has finished."""
    if "stl" not in summary:
        return False
    methods = [m for m in ordered(list(summary)) if m != "stl"]
    if not methods:
        return False
    stl = summary["stl"]
    fig, (ax, dm) = _figure(1, 2, (3.2 + 0.75 * len(methods) * (1 + len(tasks) / 4), 3.8), width_ratios=(2.2, 1))
    positions = np.arange(len(methods))
    width = 0.7 / len(tasks)
    markers = "osD^v"
    for t, (task, header) in enumerate(zip(tasks, headers)):
        offset = (t - (len(tasks) - 1) / 2) * width
        ys = [summary[m][f"test_{task}_mean"] - stl[f"test_{task}_mean"] for m in methods]
        errs = [summary[m][f"test_{task}_std"] for m in methods]
        ax.errorbar(positions + offset, ys, yerr=errs, fmt=markers[t % len(markers)], capsize=2, ms=5,
                    label=f"{header} (single-task {stl[f'test_{task}_mean']:.1f}%)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(positions, [label(m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel("test accuracy − single-task (points)")
    ax.set_title("Per task (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    handles, labels_ = ax.get_legend_handles_labels()
    fig.legend(handles, labels_, loc="outside lower center", ncol=len(tasks), fontsize=8, frameon=False)
    values = [summary[m].get("delta_m_mean") for m in methods]
    errs = [summary[m].get("delta_m_std") or 0.0 for m in methods]
    dm.barh(positions, [v if v is not None else 0.0 for v in values], xerr=errs, color=[colour(m) for m in methods],
            capsize=2, alpha=0.85)
    dm.axvline(0, color="black", lw=0.8)
    dm.set_yticks(positions, [label(m) for m in methods])
    dm.invert_yaxis()
    dm.set_xlabel("Δm% (lower is better)")
    dm.set_title("Δm% vs single-task")
    dm.grid(axis="x", alpha=0.3)
    fig.suptitle(f"MultiDigits, {len(tasks)} tasks: joint training against one network per task")
    fig.savefig(path, dpi=DPI)
    return True


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along the last axis (shorter windows at the ends)."""
    if window <= 1:
        return values
    kernel = np.ones(window)
    pad = window // 2
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(pad, window - 1 - pad)], mode="constant")
    counts = np.convolve(np.ones(values.shape[-1]), kernel, mode="same")
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), -1, padded) / counts


def digits_conflicts(
    path: Path, histories: dict[str, list[dict[str, Any]]], headers: Sequence[str],
) -> tuple[bool, list[str]]:
    """The gradient conflicts over training, every method on shared axes (mean over seeds, smoothed
    over a tenth of the run): the mean cosine between the task gradients and the fraction of task
    pairs in conflict (negative inner product); with more than two tasks, each pair's cosine under Sum.
    Returns (drawn, the methods left out: those whose diagnostics have no cosines, i.e. loss weighting)."""
    usable = {m: runs for m, runs in histories.items()
              if runs and all(run["history"] and "cosine" in run["history"][0] for run in runs)}
    missing = [m for m in histories if m not in usable]
    if not usable:
        return False, missing
    T = len(headers)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    fig, axes = _figure(1, 3 if T > 2 else 2, (13.5 if T > 2 else 9.5, 3.9))
    cos_ax, rate_ax = axes[:2]
    reference = "sum" if "sum" in usable else next(iter(usable))
    drawn_cosines: list[np.ndarray] = []
    for method in ordered(list(usable)):
        runs = usable[method]
        length = min(len(run["history"]) for run in runs)
        steps = np.asarray(runs[0]["steps"][:length])
        cosine = np.array([[h["cosine"] for h in run["history"][:length]] for run in runs])  # (seeds, n, T, T)
        conflicts = np.array([[h["conflicts"] for h in run["history"][:length]] for run in runs], dtype=float)
        window = max(1, length // 10)
        mean_cos = _smooth(np.mean([cosine[:, :, i, j] for i, j in pairs], axis=0).mean(axis=0), window)
        style = {"color": colour(method), "lw": 1.4, "label": label(method)}
        cos_ax.plot(steps, mean_cos, **style)
        rate_ax.plot(steps, _smooth(conflicts.mean(axis=0) / len(pairs), window), **style)
        drawn_cosines.append(mean_cos)
        if T > 2 and method == reference:
            for k, (i, j) in enumerate(pairs):
                pair = _smooth(cosine[:, :, i, j].mean(axis=0), window)
                axes[2].plot(steps, pair, lw=1.4, color=f"C{k % 10}", label=f"{headers[i]} · {headers[j]}")
                drawn_cosines.append(pair)
    low, high = float(min(c.min() for c in drawn_cosines)), float(max(c.max() for c in drawn_cosines))
    margin = 0.08 * max(high - low, 1e-3)
    cos_ax.set_title("Mean cosine between task gradients")
    rate_ax.set_title("Task pairs in conflict (cos < 0)" if T > 2 else "Steps with the two gradients in conflict")
    rate_ax.set_ylim(-0.02, 1.02)
    rate_ax.set_ylabel("fraction of pairs" if T > 2 else "fraction of steps")
    cos_ax.set_ylabel("cosine (mean over seeds, smoothed)")
    cosine_axes = [cos_ax] if T == 2 else [cos_ax, axes[2]]
    for ax in cosine_axes:
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylim(min(low - margin, -margin), high + margin)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    handles, labels_ = cos_ax.get_legend_handles_labels()
    fig.legend(handles, labels_, loc="outside lower left", ncol=min(len(labels_), 8), fontsize=8, frameon=False,
               title="methods" + (" (left and middle)" if T > 2 else ""), title_fontsize=8)
    if T > 2:
        axes[2].set_title(f"Cosine of each pair, {label(reference)}")
        axes[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    note = "; MGDA-UB's: the representation's gradients" if "mgda-ub" in usable else ""
    fig.suptitle(f"MultiDigits, {T} tasks: gradient conflicts over training\n(opt.diagnostics(), mean over seeds{note})",
                 fontsize=10)
    fig.savefig(path, dpi=DPI)
    return True, missing


def tradeoff(path: Path, summary: dict[str, dict[str, Any]], timing: dict[str, Any] | None,
             naive: dict[str, Any] | None) -> bool:
    """Δm% against step time ÷ Sum, one marker per method and mode. ``False`` until both exist."""
    if not timing:
        return False
    timed = timing["entries"]
    entries = [e for e in ordered(list(summary)) if e != "stl" and e in timed and summary[e].get("delta_m_mean") is not None]
    if not entries:
        return False
    from bench.methods import kind

    fig, (ax,) = _figure(1, 1, (7.6, 5.0))
    points: dict[str, tuple[float, float]] = {}
    for entry in entries:
        method, every = split_entry(entry)
        row, t = summary[entry], timed[entry]
        x, y = t["ratio_to_sum"], row["delta_m_mean"]
        points[entry] = (x, y)
        loss_weighting = kind(method) == "loss"
        marker = "s" if loss_weighting else "D" if method == "sum" else "o"
        ax.errorbar(x, y, yerr=row["delta_m_std"], xerr=[[x - t["ratio_q1"]], [t["ratio_q3"] - x]], fmt=marker,
                    color=colour(entry), mfc="white" if every > 1 else colour(entry), ms=8, capsize=3, lw=1.2,
                    label=label(entry))
        if every > 1 and method in points:
            x0, y0 = points[method]
            ax.annotate("", xy=(x, y), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "->", "color": colour(entry), "lw": 1.0, "alpha": 0.6})
    if naive:
        ax.axvline(naive["ratio_to_sum"], color="grey", ls=":", lw=1.2)
        ax.annotate("sum(losses).backward()\n(one backward)", (naive["ratio_to_sum"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -4), textcoords="offset points", va="top", fontsize=7, color="grey")
    ax.axhline(0, color="black", lw=0.8)
    ax.annotate("single-task models", (1.0, 0.0), xycoords=("axes fraction", "data"), xytext=(-4, 4),
                textcoords="offset points", ha="right", fontsize=7)
    ax.set_xlabel("step time ÷ Sum (interleaved; median, quartiles)")
    ax.set_ylabel("Δm% vs single-task (lower is better; mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper", frameon=False)
    ax.set_title("MultiDigits, 4 tasks: cost against benefit\n(filled: weights every step; hollow: every 4 steps; "
                 "squares: loss weighting)", fontsize=9)
    fig.savefig(path, dpi=DPI)
    return True


def conflict_sweep(path: Path, summary: dict[str, dict[str, list[float]]], noise_floor: float) -> None:
    """Final test loss (fraction of variance unexplained) against the angle between the tasks."""
    fig, axes = _figure(1, 3, (12.5, 3.8))
    titles = {"task1": "task 1", "task2": "task 2", "avg": "mean of the two tasks"}
    for ax, (key, title) in zip(axes, titles.items()):
        for method in ordered(list(summary)):
            row = summary[method]
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
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("Conflict sweep: shared-bottom regression (mean ± std over seeds; lower is better)")
    fig.savefig(path, dpi=DPI)
