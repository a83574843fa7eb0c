"""Study 2: MultiDigits — joint training of digit tasks on one shared encoder, with 2 and with 4 tasks.

Two variants read the same embedded pairs of overlapping digits (:mod:`bench.study.digits_data`):

- **2 tasks** (``multidigits``): the left digit and the right digit (MultiMNIST-style);
- **4 tasks** (``multidigits4``): the left digit, the right digit, whether their sum is at least 10 and
  whether the left digit is the larger (2 classes each). The last two need both digits, and both are
  linear in the digits' identities (``l + r ≥ 10``, ``l − r > 0``), so a linear head can read them
  from the same features the digit tasks need: the four tasks share every feature and compete for
  the 64-d representation, with different readouts of it. Over ``T = 4`` tasks PCGrad's random order,
  CAGrad's dual and MGDA's min-norm problem are no longer closed forms.

Per seed, every method trains the same network from the same initialisation on the same batch order;
the independent single-task models (one network per task, plain Adam) are the reference of
``Δm% = (1/K) Σ_k (−1)^{δ_k} (M_mtl,k − M_stl,k) / M_stl,k × 100`` (Nash-MTL's convention; accuracy is
higher-better, ``δ_k = 1``, so **lower Δm is better** and a negative Δm beats the single-task models).
The reported test accuracy is the one at the epoch with the best mean validation accuracy.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.methods import CAGRAD_C

from . import figures
from .digits_data import CANVAS, MultiDigits, Split, build_multidigits
from .methods import label, ordered
from .report import Report, Table, num
from .training import RunLog, SharedBottom, train

DATA_SEED = 0


@dataclass(frozen=True)
class Task:
    name: str
    classes: int
    header: str  # the table's column


TASKS: dict[str, Task] = {
    "left": Task("left", 10, "Left"),
    "right": Task("right", 10, "Right"),
    "carry": Task("carry", 2, "Sum ≥ 10"),
    "greater": Task("greater", 2, "Left > right"),
}


def task_targets(labels: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
    """``(N, T)`` class indices of ``tasks`` from the ``(N, 2)`` digit labels (left, right)."""
    left, right = labels[:, 0], labels[:, 1]
    columns = {"left": left, "right": right, "carry": (left + right >= 10).long(), "greater": (left > right).long()}
    return torch.stack([columns[t] for t in tasks], dim=1)


@dataclass(frozen=True)
class Variant:
    key: str  # the study's key in results.json
    tasks: tuple[str, ...]
    title: str


TWO = Variant("multidigits", ("left", "right"), "MultiDigits, 2 tasks (two overlapping 8×8 digits, one shared encoder)")
FOUR = Variant("multidigits4", ("left", "right", "carry", "greater"),
               "MultiDigits, 4 tasks (left digit, right digit, sum ≥ 10, left > right; one shared encoder)")
VARIANTS: dict[str, Variant] = {v.key: v for v in (TWO, FOUR)}


@dataclass(frozen=True)
class DigitsConfig:
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    batch_size: int
    lr: float
    log_every: int


def make_net(heads: int | Sequence[int]) -> SharedBottom:
    """Conv(16, 3×3) → max-pool → 64-d representation ``z``; a linear head per task (``heads``: the
    classes of each, or a number of 10-way heads)."""
    classes = [10] * heads if isinstance(heads, int) else list(heads)
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (CANVAS // 2) ** 2, 64),
        nn.ReLU(),
    )
    return SharedBottom(encoder, [nn.Linear(64, k) for k in classes])


def task_losses(columns: Sequence[int]) -> Callable[[Sequence[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """Cross-entropy of each head against its column of the ``(N, T)`` targets."""
    def losses(outputs: Sequence[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        return [nn.functional.cross_entropy(out, y[:, t]) for out, t in zip(outputs, columns)]

    return losses


@functools.lru_cache(maxsize=2)
def dataset(n_train: int, n_val: int, n_test: int) -> MultiDigits:
    """The study's data (seed ``DATA_SEED``), built once per process."""
    return build_multidigits(seed=DATA_SEED, n_train=n_train, n_val=n_val, n_test=n_test)


def _accuracy(net: SharedBottom, split: Split, targets: torch.Tensor, columns: Sequence[int], device: torch.device) -> list[float]:
    _, outputs = net(split.images.to(device))
    return [float((out.argmax(1) == targets[:, t]).float().mean()) for out, t in zip(outputs, columns)]


def _fit(
    method: str | None, tasks: Sequence[str], columns: Sequence[int], data: MultiDigits, cfg: DigitsConfig,
    seed: int, device: torch.device, tick: Callable[[int], None],
) -> tuple[RunLog, dict[str, Any]]:
    """Train one network with a head for each of ``columns`` (indices into ``tasks``)."""
    torch.manual_seed(seed)
    net = make_net([TASKS[tasks[c]].classes for c in columns]).to(device)
    val_y = task_targets(data.val.labels, tasks).to(device)
    test_y = task_targets(data.test.labels, tasks).to(device)
    names = [tasks[c] for c in columns]

    def evaluate(model: SharedBottom) -> dict[str, float]:
        val = _accuracy(model, data.val, val_y, columns, device)
        test = _accuracy(model, data.test, test_y, columns, device)
        return {**{f"val_{n}": v for n, v in zip(names, val)}, **{f"test_{n}": v for n, v in zip(names, test)}}

    log = train(
        net, method, data.train.images.to(device), task_targets(data.train.labels, tasks).to(device),
        task_losses(columns), epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
        evaluate=evaluate, log_every=cfg.log_every, tick=tick,
    )
    best = max(range(len(log.evals)), key=lambda e: sum(log.evals[e][f"val_{n}"] for n in names))
    return log, {"best_epoch": best + 1, **{f"test_{n}": log.evals[best][f"test_{n}"] for n in names}}


def run_method(
    method: str, data: MultiDigits, cfg: DigitsConfig, seed: int, device: torch.device,
    tick: Callable[[int], None] = lambda n: None, *, tasks: Sequence[str] = TWO.tasks,
) -> dict[str, Any]:
    """One seed of ``method`` (``"stl"``: one single-task network per task; ``"pcgrad@4"``: a cheap
    mode) on ``tasks`` as a JSON-ready dict."""
    if method == "stl":
        runs = [_fit(None, tasks, [t], data, cfg, seed, device, tick) for t in range(len(tasks))]
        result: dict[str, Any] = {"best_epoch": [r[1]["best_epoch"] for r in runs]}
        for _, summary in runs:
            result.update({k: v for k, v in summary.items() if k.startswith("test_")})
        result["test_acc"] = [result[f"test_{n}"] for n in tasks]
        result["median_step_ms"] = statistics.median(log.median_step_ms for log, _ in runs)
        result["evals"] = [log.evals for log, _ in runs]
        return result
    log, summary = _fit(method, tasks, list(range(len(tasks))), data, cfg, seed, device, tick)
    return {
        "best_epoch": summary["best_epoch"],
        "test_acc": [summary[f"test_{n}"] for n in tasks],
        "median_step_ms": log.median_step_ms,
        "evals": log.evals,
        "diagnostics": {"steps": log.history_steps, "history": log.history},
    }


def run_unit(variant: str, cfg: DigitsConfig, method: str, seed: int, device: str) -> dict[str, Any]:
    """One unit of work (in a worker process): one seed of one method on one variant."""
    data = dataset(cfg.n_train, cfg.n_val, cfg.n_test)
    return run_method(method, data, cfg, seed, torch.device(device), tasks=VARIANTS[variant].tasks)


def delta_m(mtl: Sequence[float], stl: Sequence[float]) -> float:
    """Δm% for higher-is-better metrics (lower Δm is better)."""
    return 100.0 * sum(-(m - s) / s for m, s in zip(mtl, stl)) / len(stl)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(
    runs: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[str] = TWO.tasks,
    timing: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean ± std over seeds per method; Δm against the seed-mean single-task accuracies; the step
    time ÷ Sum from the interleaved timing (:mod:`bench.study.timing`) where there is one."""
    stl_runs = runs.get("stl", {})
    stl_ref = [statistics.fmean(r["test_acc"][t] for r in stl_runs.values()) for t in range(len(tasks))] if stl_runs else None
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in runs.items():
        accs = [r["test_acc"] for r in seeds.values()]
        row: dict[str, Any] = {"seeds": len(accs)}
        for t, name in enumerate(tasks):
            row[f"test_{name}_mean"], row[f"test_{name}_std"] = _mean_std([100 * a[t] for a in accs])
        if stl_ref is not None:
            deltas = [delta_m(a, stl_ref) for a in accs]
            row["delta_m_mean"], row["delta_m_std"] = _mean_std(deltas)
            row["delta_m_per_seed"] = deltas
        timed = (timing or {}).get(method) or {}
        row["step_ms"] = timed.get("median_ms")
        row["step_ratio_to_sum"] = timed.get("ratio_to_sum")
        row["step_ratio_quartiles"] = [timed["ratio_q1"], timed["ratio_q3"]] if "ratio_q1" in timed else None
        out[method] = row
    return out


def table_rows(
    summary: dict[str, dict[str, Any]], tasks: Sequence[str] = TWO.tasks, entries: Sequence[str] | None = None,
) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """Rows of a results table (``entries`` in table order, default: every summarised one) and the
    cells to bold (best mean per column among the joint methods)."""
    order = ordered([m for m in (entries or summary) if m in summary])
    rows: list[list[str]] = []
    for method in order:
        row = summary[method]
        cells = [label(method)]
        cells += [f"{row[f'test_{n}_mean']:.2f} ± {row[f'test_{n}_std']:.2f}" for n in tasks]
        if method == "stl":
            cells.append("0 (ref.)")
        elif "delta_m_mean" in row:
            cells.append(f"{num(row['delta_m_mean'], '+.2f')} ± {row['delta_m_std']:.2f}")
        else:
            cells.append("—")
        cells.append(_ratio_cell(row))
        rows.append(cells)
    bold: set[tuple[int, int]] = set()
    joint = [i for i, m in enumerate(order) if m != "stl"]
    keys = [(f"test_{n}_mean", max) for n in tasks] + [("delta_m_mean", min)]
    if joint:
        for col, (key, better) in enumerate(keys, start=1):
            values: dict[int, float] = {i: summary[order[i]][key] for i in joint if summary[order[i]].get(key) is not None}
            if values:
                bold.add((better(values, key=values.__getitem__), col))
    return rows, bold


def _ratio_cell(row: dict[str, Any]) -> str:
    """``1.07× (1.02–1.15)``: the median per-round ratio to Sum and its quartiles."""
    ratio, quartiles = row.get("step_ratio_to_sum"), row.get("step_ratio_quartiles")
    if ratio is None:
        return "—"
    return f"{ratio:.2f}×" + (f" ({quartiles[0]:.2f}–{quartiles[1]:.2f})" if quartiles else "")


def columns(tasks: Sequence[str]) -> list[str]:
    return ["Method", *(f"{TASKS[t].header} ↑" for t in tasks), "Δm% ↓", "Step time ÷ Sum (quartiles)"]


def timing_note(timing: dict[str, Any] | None) -> str:
    if not timing:
        return "Step time: not measured yet."
    naive = timing["entries"].get("naive")
    plain = (f" A plain `sum(losses).backward()` step (one backward, no per-task gradients) takes "
             f"{naive['ratio_to_sum']:.2f}× Sum's, which computes the T task gradients." if naive else "")
    return (f"Step time ÷ Sum: {timing['rounds']} interleaved rounds, each running {timing['steps_per_round']} training "
            "steps of every method on the same batches, in a fresh order each round, in one process "
            "(`bench.harness.interleave`); the median of the per-round ratios to Sum, and its quartiles. "
            "Single-task: the T networks' steps together." + plain)


def describe_variant(variant: Variant) -> Callable[[dict[str, Any]], tuple[list[str], list[Table]]]:
    """Notes and the headline table of a variant for ``results.md`` / ``results.tex``."""

    def describe(data: dict[str, Any]) -> tuple[list[str], list[Table]]:
        summary = data.get("summary")
        if not summary:
            return [], []
        cfg = data["config"]
        seeds = max(row["seeds"] for row in summary.values())
        tasks = variant.tasks
        what = ", ".join(f"{TASKS[t].header.lower()} ({TASKS[t].classes} classes)" for t in tasks)
        notes = [
            f"Tasks: {what}. {cfg['n_train']:,}/{cfg['n_val']:,}/{cfg['n_test']:,} train/val/test pairs on a "
            f"{CANVAS}×{CANVAS} canvas (data seed {data['data_seed']}); {cfg['epochs']} epochs of Adam (lr {cfg['lr']:g}, "
            f"batch {cfg['batch_size']}); test accuracy at the best-validation epoch, mean ± std over {seeds} seed(s). "
            f"CAGrad c = {CAGRAD_C}; MGDA-UB = MGDA in representation mode (`opt.backward(losses, features=z)`).",
            "**Δm% is relative to the single-task models (Nash-MTL convention): lower is better**, negative beats them. "
            + timing_note(data.get("timing")),
        ]
        rows, bold = table_rows(summary, tasks, data.get("methods"))
        table = Table(
            label=f"gradsurgery-{variant.key}",
            caption=f"MultiDigits, {len(tasks)} tasks: test accuracy (%, mean ± std over {seeds} seed(s)) and Δm% "
            "against single-task models (lower is better); step time relative to Sum, interleaved.",
            columns=columns(tasks), rows=rows, align="l" + "r" * (len(tasks) + 2), bold=frozenset(bold),
        )
        return notes, [table]

    return describe


def prepare(variant: Variant, cfg: DigitsConfig, methods: Sequence[str], extra: Sequence[str], seeds: Sequence[int],
            device: torch.device, report: Report) -> dict[str, Any]:
    """Register the variant's study; ``methods`` go in its table, ``extra`` entries (cheap modes, loss
    weighting for the trade-off) are run and summarised beside them."""
    data = report.study(variant.key, variant.title, describe_variant(variant))
    data.update({"variant": variant.key, "config": asdict(cfg), "data_seed": DATA_SEED, "seeds": list(seeds), "cagrad_c": CAGRAD_C,
                 "tasks": list(variant.tasks), "task_classes": [TASKS[t].classes for t in variant.tasks],
                 "methods": ["stl", *methods], "entries": ordered(list(dict.fromkeys(["stl", *methods, *extra]))),
                 "device": str(device), "runs": {}})
    return data


def store(data: dict[str, Any], method: str, seed: int, result: dict[str, Any]) -> None:
    """A finished run into the variant's data; the summary recomputed."""
    data["runs"].setdefault(method, {})[str(seed)] = result
    data["summary"] = summarize(data["runs"], data["tasks"], (data.get("timing") or {}).get("entries"))


def store_timing(data: dict[str, Any], timing: dict[str, Any]) -> None:
    data["timing"] = timing
    data["summary"] = summarize(data["runs"], data["tasks"], timing["entries"])


def headline(data: dict[str, Any], method: str, result: dict[str, Any]) -> str:
    """A finished run's one-line result for the log."""
    accs = ", ".join(f"{t} {100 * a:.1f}" for t, a in zip(data["tasks"], result["test_acc"]))
    return f"test accuracy {accs}"


def draw(data: dict[str, Any], report: Report) -> None:
    """A variant's figures from whatever runs have finished: accuracy against the single-task models,
    and the gradient conflicts over training."""
    if not data.get("summary"):
        return
    variant = VARIANTS[data["variant"]]
    headers = [TASKS[t].header for t in variant.tasks]
    shown = {m: row for m, row in data["summary"].items() if m in data["methods"]}
    name = f"{variant.key}_accuracy.png"
    if figures.digits_accuracy(report.out / name, shown, variant.tasks, headers):
        report.add_figure(variant.key, name, "Test accuracy per task minus the single-task model's (points), and Δm%; "
                          "mean ± std over seeds")
    histories = {m: [r["diagnostics"] for r in runs.values()] for m, runs in data["runs"].items()
                 if m in data["methods"] and m != "stl"}
    name = f"{variant.key}_conflicts.png"
    drawn, missing = figures.digits_conflicts(report.out / name, histories, headers)
    if drawn:
        note = f"; {', '.join(label(m) for m in missing)}: no per-task gradients, not shown" if missing else ""
        report.add_figure(variant.key, name, "Task-gradient cosines and conflict rate over training, from "
                          f"`opt.diagnostics()` every {data['config']['log_every']} steps, mean over seeds{note}")
