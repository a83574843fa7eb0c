"""Study 2: MultiDigits — joint training of two digit classifiers on one shared encoder.

Per seed, every method trains the same network from the same initialisation on the same batch order;
the independent single-task models (one network per task, plain Adam) are the reference of
``Δm% = (1/K) Σ_k (−1)^{δ_k} (M_mtl,k − M_stl,k) / M_stl,k × 100`` (Nash-MTL's convention; accuracy is
higher-better, ``δ_k = 1``, so **lower Δm is better** and a negative Δm beats the single-task models).
The reported test accuracy is the one at the epoch with the best mean validation accuracy.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.methods import CAGRAD_C

from . import figures
from .digits_data import CANVAS, MultiDigits, Split, build_multidigits
from .methods import known, label
from .report import MakeBar, Report, Table, num
from .training import RunLog, SharedBottom, train

TASKS = ("left", "right")


@dataclass(frozen=True)
class DigitsConfig:
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    lr: float
    log_every: int


def make_net(n_heads: int) -> SharedBottom:
    """Conv(16, 3×3) → max-pool → 64-d representation ``z``; a linear 10-way head per task."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (CANVAS // 2) ** 2, 64),
        nn.ReLU(),
    )
    return SharedBottom(encoder, [nn.Linear(64, 10) for _ in range(n_heads)])


def _task_losses(tasks: Sequence[int]) -> Callable[[Sequence[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    def losses(outputs: Sequence[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.cross_entropy(out, y[:, t]) for out, t in zip(outputs, tasks)]

    return losses


def _accuracy(net: SharedBottom, split: Split, tasks: Sequence[int], device: torch.device) -> list[float]:
    _, outputs = net(split.images.to(device))
    labels = split.labels.to(device)
    return [float((out.argmax(1) == labels[:, t]).float().mean()) for out, t in zip(outputs, tasks)]


def _fit(
    method: str | None, tasks: Sequence[int], data: MultiDigits, cfg: DigitsConfig, seed: int,
    device: torch.device, tick: Callable[[int], None],
) -> tuple[RunLog, dict[str, Any]]:
    torch.manual_seed(seed)
    net = make_net(len(tasks)).to(device)

    def evaluate(model: SharedBottom) -> dict[str, float]:
        val = _accuracy(model, data.val, tasks, device)
        test = _accuracy(model, data.test, tasks, device)
        return {**{f"val_{TASKS[t]}": v for t, v in zip(tasks, val)}, **{f"test_{TASKS[t]}": v for t, v in zip(tasks, test)}}

    log = train(
        net, method, data.train.images.to(device), data.train.labels.to(device), _task_losses(tasks),
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
        evaluate=evaluate, log_every=cfg.log_every, tick=tick,
    )
    names = [TASKS[t] for t in tasks]
    best = max(range(len(log.evals)), key=lambda e: sum(log.evals[e][f"val_{n}"] for n in names))
    return log, {"best_epoch": best + 1, **{f"test_{n}": log.evals[best][f"test_{n}"] for n in names}}


def run_method(
    method: str, data: MultiDigits, cfg: DigitsConfig, seed: int, device: torch.device, tick: Callable[[int], None]
) -> dict[str, Any]:
    """One seed of ``method`` (``"stl"``: one single-task network per task) as a JSON-ready dict."""
    if method == "stl":
        runs = [_fit(None, [t], data, cfg, seed, device, tick) for t in range(len(TASKS))]
        result: dict[str, Any] = {"best_epoch": [r[1]["best_epoch"] for r in runs]}
        for log, summary in runs:
            result.update({k: v for k, v in summary.items() if k.startswith("test_")})
        result["test_acc"] = [result[f"test_{n}"] for n in TASKS]
        result["median_step_ms"] = statistics.median(log.median_step_ms for log, _ in runs)
        result["evals"] = [log.evals for log, _ in runs]
        return result
    log, summary = _fit(method, list(range(len(TASKS))), data, cfg, seed, device, tick)
    return {
        "best_epoch": summary["best_epoch"],
        "test_acc": [summary[f"test_{n}"] for n in TASKS],
        "median_step_ms": log.median_step_ms,
        "evals": log.evals,
        "diagnostics": {"steps": log.history_steps, "history": log.history},
    }


def delta_m(mtl: Sequence[float], stl: Sequence[float]) -> float:
    """Δm% for higher-is-better metrics (lower Δm is better)."""
    return 100.0 * sum(-(m - s) / s for m, s in zip(mtl, stl)) / len(stl)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± std over seeds per method; Δm against the seed-mean single-task accuracies."""
    stl_runs = runs.get("stl", {})
    stl_ref = [statistics.fmean(r["test_acc"][t] for r in stl_runs.values()) for t in range(len(TASKS))] if stl_runs else None
    sum_ms = statistics.median(r["median_step_ms"] for r in runs["sum"].values()) if runs.get("sum") else None
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in runs.items():
        accs = [r["test_acc"] for r in seeds.values()]
        row: dict[str, Any] = {"seeds": len(accs)}
        for t, name in enumerate(TASKS):
            row[f"test_{name}_mean"], row[f"test_{name}_std"] = _mean_std([100 * a[t] for a in accs])
        if stl_ref is not None:
            row["delta_m_mean"], row["delta_m_std"] = _mean_std([delta_m(a, stl_ref) for a in accs])
        row["median_step_ms"] = statistics.median(r["median_step_ms"] for r in seeds.values())
        row["step_ratio_to_sum"] = None if sum_ms is None or method == "stl" else row["median_step_ms"] / sum_ms
        out[method] = row
    return out


def table_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """Rows of the results table and the cells to bold (best mean per column among joint methods)."""
    rows: list[list[str]] = []
    order = [m for m in ("stl", *known()) if m in summary]
    for method in order:
        row = summary[method]
        cells = [label(method)]
        cells += [f"{row[f'test_{n}_mean']:.2f} ± {row[f'test_{n}_std']:.2f}" for n in TASKS]
        if method == "stl":
            cells.append("0 (ref.)")
        elif "delta_m_mean" in row:
            cells.append(f"{num(row['delta_m_mean'], '+.2f')} ± {row['delta_m_std']:.2f}")
        else:
            cells.append("—")
        ratio = row["step_ratio_to_sum"]
        cells.append(f"{ratio:.2f}×" if ratio is not None else "—")
        cells.append(f"{row['median_step_ms']:.2f}")
        rows.append(cells)
    bold: set[tuple[int, int]] = set()
    joint = [i for i, m in enumerate(order) if m != "stl"]
    if joint:
        for col, (key, better) in enumerate(
            [(f"test_{TASKS[0]}_mean", max), (f"test_{TASKS[1]}_mean", max), ("delta_m_mean", min)], start=1
        ):
            values = {i: summary[order[i]].get(key) for i in joint if summary[order[i]].get(key) is not None}
            if values:
                bold.add((better(values, key=values.__getitem__), col))
    return rows, bold


TITLE = "2. MultiDigits (two overlapping 8×8 digits, one shared encoder)"


def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
    """Notes and the headline table for ``results.md`` / ``results.tex``."""
    summary = data.get("summary")
    if not summary:
        return [], []
    cfg = data["config"]
    seeds = max(row["seeds"] for row in summary.values())
    notes = [
        f"{cfg['n_train']:,}/{cfg['n_val']:,}/{cfg['n_test']:,} train/val/test pairs on a {CANVAS}×{CANVAS} canvas "
        f"(data seed {data['data_seed']}); {cfg['epochs']} epochs of Adam (lr {cfg['lr']:g}, batch {cfg['batch_size']}); "
        f"test accuracy at the best-validation epoch, mean ± std over {seeds} seed(s). CAGrad c = {CAGRAD_C}; "
        "MGDA-UB = MGDA in representation mode (`opt.backward(losses, features=z)`).",
        "**Δm% is relative to the single-task models (Nash-MTL convention): lower is better**, negative beats them. "
        "Step time: median wall-clock of one training step (zero_grad → step), ratio to Sum measured in the same run.",
    ]
    rows, bold = table_rows(summary)
    table = Table(
        label="gradsurgery-multidigits",
        caption=f"MultiDigits test accuracy (%, mean ± std over {seeds} seed(s)) and Δm% against single-task "
        "models (lower is better); step time relative to Sum.",
        columns=["Method", "Left acc. ↑", "Right acc. ↑", "Δm% ↓", "Step time ×Sum", "Step (ms)"],
        rows=rows, align="lrrrrr", bold=frozenset(bold),
    )
    return notes, [table]


def run_study(
    cfg: DigitsConfig, methods: Sequence[str], seeds: Sequence[int], device: torch.device, report: Report,
    make_bar: MakeBar,
) -> None:
    """Single-task models and every method for every seed; each finished (seed, method) is flushed."""
    data = report.study("multidigits", TITLE, describe)
    data_seed = 0
    dataset = build_multidigits(seed=data_seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
    data.update({"config": asdict(cfg), "data_seed": data_seed, "seeds": list(seeds), "cagrad_c": CAGRAD_C,
                 "tasks": list(TASKS), "device": str(device), "runs": {}})
    report.flush()
    all_methods = ["stl", *methods]
    steps_per_run = cfg.epochs * -(-cfg.n_train // cfg.batch_size)
    total = len(seeds) * steps_per_run * (len(all_methods) + len(TASKS) - 1)
    with make_bar(total, "multidigits") as bar:
        for seed in seeds:
            for method in all_methods:
                bar.set_postfix_str(f"seed {seed}, {method}")
                result = run_method(method, dataset, cfg, seed, device, bar.update)
                data["runs"].setdefault(method, {})[str(seed)] = result
                data["summary"] = summarize(data["runs"])
                report.flush()


def draw(data: dict[str, Any], report: Report) -> None:
    """Accuracy, conflict-history and cosine figures from whatever runs have finished."""
    if not data.get("summary"):
        return
    figures.digits_accuracy(report.out / "multidigits_accuracy.png", data["summary"])
    report.add_figure("multidigits", "multidigits_accuracy.png", "MultiDigits test accuracy per task, mean ± std over seeds")
    first = str(data["seeds"][0])
    histories = {m: runs[first]["diagnostics"] for m, runs in data["runs"].items()
                 if m != "stl" and first in runs and runs[first]["diagnostics"]["history"]}
    # gradsurgery.plot.plot_conflict_history draws conflicts and weights: an elementwise method's
    # diagnostics have no weights (GradDrop), a loss-weighting method's no conflicts or cosines (no
    # per-task gradients). Such a method gets no panel in the figure it lacks the data for.
    for name, keys, draw, caption in (
        ("multidigits_conflicts.png", ("conflicts", "weights"), figures.digits_conflicts,
         "Conflict rate and task weights over training"),
        ("multidigits_cosine.png", ("cosine",), lambda path, h: figures.digits_cosines(path, h, TASKS),
         "Mean gradient cosine over training"),
    ):
        drawable = {m: d for m, d in histories.items() if all(k in h for h in d["history"] for k in keys)}
        if not drawable:
            continue
        draw(report.out / name, drawable)
        skipped = [m for m in histories if m not in drawable]
        note = f"; no panel for {', '.join(label(m) for m in skipped)} (no {' or '.join(keys)})" if skipped else ""
        report.add_figure("multidigits", name, f"{caption} (seed {first}, `opt.diagnostics()`{note})")
