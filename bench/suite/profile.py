"""Where one variant's step time goes: cProfile grouped by phase, then torch.profiler's op table
(``python -m bench.bench_suite --profile KIND``; nothing recorded)."""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from bench import harness
from bench.suite.variants import Spec, make_step

def profile(spec: Spec, kind: str) -> None:
    """cProfile of one variant's step, grouped by phase, and torch.profiler's op table (nothing recorded)."""
    # label: (file name, function name) in the library as it is laid out today; cumulative time per step.
    # A phase whose function moved shows no row (nothing breaks).
    phases = {
        "forward (model, heads included)": ("module.py", "_wrapped_call_impl"),
        "torch.autograd.grad (all backward passes)": ("autograd/__init__.py", "grad"),
        "tensor.backward": ("_tensor.py", "backward"),
        "task_gradients": ("taskgrads.py", "task_gradients"),
        "SharedBuffer.write (grads → J rows)": ("taskgrads.py", "write"),
        "gram (G = J Jᵀ)": ("backend.py", "gram"),
        "per-block Gram (granularity=)": ("backend.py", "gram_blocks"),
        "weights (the method on G)": ("optim.py", "weights"),
        "combine (wᵀJ → .grad)": ("backend.py", "combine"),
        "per-block combine (granularity=)": ("backend.py", "combine_blocks"),
        "every=: the refresh step (full step, owners)": ("optim.py", "_backward_refresh"),
        "every=: the heads' owners (graph reach)": ("optim.py", "_owners"),
        "every=: the weighted backward between refreshes": ("optim.py", "_backward_weighted"),
        "loss weighting: objective, weights, backward": ("lossweighting.py", "_backward_objective"),
        "loss weighting: the loss values read back": ("lossweighting.py", "_check_values"),
        "elementwise combine (GradDrop's torch reference)": ("graddrop.py", "graddrop_reference"),
        "nonfinite_tasks (the non-finite check)": ("prepare.py", "nonfinite_tasks"),
        "accumulate_plain (heads)": ("grads.py", "accumulate_plain"),
        "inner optimizer step": ("sgd.py", "step"),
    }
    step = make_step(spec, kind)
    step()
    step()
    n = 3
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(n):
        step()
    profiler.disable()
    total = (time.perf_counter() - start) / n
    stats = pstats.Stats(profiler)
    print(f"== {kind}, {spec.label}: {total * 1e3:.1f} ms/step under cProfile")
    rows = []
    for label, (file, function) in phases.items():
        cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith("/" + file) and k[2] == function)
        if cum:
            rows.append([label, cum / n * 1e3, cum / n / total])
    print(harness.format_table(["phase (cumulative)", "ms/step", "share"], rows))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n):
            step()
    print(f"\n== torch.profiler, {kind}, {spec.label}, {n} steps, top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))

