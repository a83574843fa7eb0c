"""Step time ÷ Sum, measured the way the benchmarks measure it: interleaved, medians, same-run ratios.

The training runs happen one after another (and two at a time, in two processes), so their own step
times drift with the machine's load: they are kept in ``results.json`` but no ratio is taken from them.
The ratios come from one timing unit per MultiDigits variant instead: every entry (method, cheap mode,
the single-task networks) gets its own network, built from the same initialisation, and each round
runs ``STEPS_PER_ROUND`` training steps of every entry on the same batches, in a fresh order every round
(:func:`bench.harness.interleave`). A round of several steps is what a cheap mode costs on average:
``every=4`` is one full step and three weighted backward passes. Reported: the median round time per
step, and the median over rounds of the per-round ratio to Sum (less sensitive to slow drifts of the
load than the ratio of the medians), with its quartiles.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch

from .multidigits import TASKS, VARIANTS, DigitsConfig, dataset, make_net, task_losses, task_targets
from .training import make_stepper

STEPS_PER_ROUND = 4  # a multiple of every cheap mode's `every`, so each round holds whole cycles
BASELINE = "sum"
# Always timed beside the entries: the cost of the plain PyTorch step the wrappers replace.
NAIVE = "naive"


def _stepper(entry: str, tasks: Sequence[str], lr: float, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step of ``entry`` (``"stl"``: a step of each single-task network; ``"naive"``: the
    joint network trained by ``sum(losses).backward()``, one backward, no wrapper)."""
    torch.manual_seed(0)
    if entry == "naive":
        net = make_net([TASKS[t].classes for t in tasks]).to(device)
        return make_stepper(net, None, task_losses(range(len(tasks))), lr=lr, seed=0)[1]
    if entry != "stl":
        net = make_net([TASKS[t].classes for t in tasks]).to(device)
        return make_stepper(net, entry, task_losses(range(len(tasks))), lr=lr, seed=0)[1]
    steps = []
    for t, task in enumerate(tasks):
        torch.manual_seed(0)
        net = make_net([TASKS[task].classes]).to(device)
        steps.append(make_stepper(net, None, task_losses([t]), lr=lr, seed=0)[1])

    def all_tasks(x: torch.Tensor, y: torch.Tensor) -> None:
        for step in steps:
            step(x, y)

    return all_tasks


def measure(
    variant: str, cfg: DigitsConfig, entries: Sequence[str], *, rounds: int, budget_s: float, device: str = "cpu",
) -> dict[str, Any]:
    """Interleaved step times of ``entries`` (Sum always among them) on ``variant``'s tasks."""
    from bench.harness import interleave

    tasks = VARIANTS[variant].tasks
    data = dataset(cfg.n_train, cfg.n_val, cfg.n_test)
    order = torch.randperm(cfg.n_train, generator=torch.Generator().manual_seed(0))[: STEPS_PER_ROUND * cfg.batch_size]
    x_all = data.train.images[order]
    y_all = task_targets(data.train.labels[order], tasks)
    where = torch.device(device)
    batches = [(x_all[i : i + cfg.batch_size].to(where), y_all[i : i + cfg.batch_size].to(where))
               for i in range(0, len(order), cfg.batch_size)]
    names = list(dict.fromkeys([BASELINE, NAIVE, *entries]))
    steppers = {name: _stepper(name, tasks, cfg.lr, where) for name in names}

    def round_of(step: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
        def run() -> None:
            for x, y in batches:
                step(x, y)
            if where.type == "cuda":
                torch.cuda.synchronize(where)

        return run

    times = interleave({name: round_of(steppers[name]) for name in names}, warmup=2, rounds=rounds, min_rounds=5,
                       budget_s=budget_s)
    base = times[BASELINE]
    out: dict[str, Any] = {}
    for name in names:
        paired = sorted(a / b for a, b in zip(times[name], base))
        quartiles = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else [paired[0]] * 3
        out[name] = {
            "median_ms": 1e3 * statistics.median(times[name]) / STEPS_PER_ROUND,
            "ratio_to_sum": statistics.median(paired),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
        }
    return {"entries": out, "rounds": len(base), "steps_per_round": STEPS_PER_ROUND, "batch_size": cfg.batch_size,
            "device": device, "torch_threads": torch.get_num_threads()}


def run_unit(variant: str, cfg: DigitsConfig, entries: Sequence[str], rounds: int, budget_s: float, device: str) -> dict[str, Any]:
    """One unit of work (in a worker process): the variant's timing."""
    return measure(variant, cfg, entries, rounds=rounds, budget_s=budget_s, device=device)


def headline(timing: dict[str, Any]) -> str:
    from .methods import label

    ratios = ", ".join(f"{label(name)} {row['ratio_to_sum']:.2f}×" for name, row in timing["entries"].items() if name != BASELINE)
    return f"step time ÷ Sum over {timing['rounds']} rounds: {ratios}"
