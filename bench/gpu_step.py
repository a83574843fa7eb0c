"""One training step on the GPU: ours ÷ naive summation and ÷ the T-backward floor on the speed suite's
MLP, the loop engine against the batched one, and whether the whole step captures in a CUDA graph.

    python -m bench.gpu_step --out DIR            # on a CUDA device: T ∈ {2, 8, 32}, fp32 and bf16
    python -m bench.gpu_step --out DIR --smoke    # toy sizes; without CUDA under Triton's interpreter

The problem is the speed suite's MLP (``bench.suite.variants``: ``Spec("mlp", T, 256)``, trunk
256→1024→1024→1024, one head per task, MSE), built by its ``build``/``forward`` and moved to the
device, parameters and data in the dtype (``bf16``: the whole step in bf16, so J is too). Variants, each on its own copy of the same
initial model, SGD(lr=1e-4), timed interleaved by ``bench.harness`` with a device sync after every step:

- ``naive``, ``floor`` (T × ``autograd.grad``), ``floor-batched`` (one vmapped backward): as in the suite;
- ``gs-{pcgrad,cagrad,mgda}-{loop,batched}``: our wrappers (``bench.methods.make_wrapper``) and that engine
  (``nonfinite="raise"``: one read of T flags per step, what a user gets out of the box);
- ``graph-naive`` and ``graph-gs-{method}-{engine}`` (CUDA only): the same step with
  ``nonfinite="propagate"``, warmed up on a side stream (``gradsurgery.kernels`` says why), captured
  whole — forward, ``backward(losses)``, ``step()`` — in one CUDA graph and timed as ``graph.replay()``
  against the eager variants above. Each capture records whether it worked (the error if not) and how
  far 3 replays end from 3 eager steps.

TorchJD and pytorch-optimizer are not timed here (the H200 image has neither): each row says so under
``peers``; the suite compares with them on the CPU.

Two JSON lines per (T, dtype), appended to DIR/step.jsonl (DIR/step_smoke.jsonl for ``--smoke``) as
soon as each is measured, with the machine, versions and revision (``bench.harness.record``): ``kind:
"eager"`` (every ratio above, loop ÷ batched, the engines) and, on a GPU, ``kind: "graph"`` (captures,
replay ÷ eager, ÷ naive, ÷ floor). The eager line is written first, so a capture that breaks the CUDA
context costs only its own line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.methods import ORIGINAL as METHODS
from bench.methods import make_wrapper

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINES = ("loop", "batched")
CHECK_STEPS = 3  # replays compared with as many eager steps
SMOKE = {"tasks": "2,3", "budget": 0.2}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON lines")
    parser.add_argument("--tasks", default="2,8,32", help="comma list of T (default 2,8,32)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list from {','.join(DTYPES)}")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per (T, dtype)")
    parser.add_argument("--backend", default="auto", help="our wrappers' backend (--smoke without CUDA: triton)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, two rounds: prove the code paths")
    return parser


class Problem:
    """The suite's model and batch for ``spec``, on ``device`` in ``dtype``; a fresh copy per variant."""

    def __init__(self, spec: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.device, self.dtype = spec, device, dtype

    def new(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        from bench.suite.variants import build

        model, x, y = build(self.spec)
        return model.to(self.device, self.dtype), x.to(self.device, self.dtype), y.to(self.device, self.dtype)

    def losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        from bench.suite.variants import forward

        return forward(self.spec, model, x, y)[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_variant(problem: Problem, kind: str, *, backend: str, nonfinite: str = "raise") -> Callable[[], None]:
    """One step of ``kind`` on its own model; returns after the device finished it."""
    from bench.suite.variants import LR

    model, x, y = problem.new()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    T, device = problem.spec.T, problem.device
    if kind == "naive":

        def body() -> None:
            opt.zero_grad(set_to_none=True)
            sum(problem.losses(model, x, y)).backward()
            opt.step()

    elif kind == "floor":

        def body() -> None:
            losses = problem.losses(model, x, y)
            for t, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=t < T - 1, allow_unused=True)

    elif kind == "floor-batched":
        eye = torch.eye(T, device=device, dtype=problem.dtype)

        def body() -> None:
            losses = torch.stack(problem.losses(model, x, y))
            torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)

    else:
        _, method, engine = kind.split("-")
        wrapper = make_wrapper(method, opt, engine=engine, backend=backend, nonfinite=nonfinite)

        def body() -> None:
            wrapper.zero_grad(set_to_none=True)
            wrapper.backward(problem.losses(model, x, y))
            wrapper.step()

        body.wrapper = wrapper  # type: ignore[attr-defined]

    def step() -> None:
        body()
        _sync(device)

    step.wrapper = getattr(body, "wrapper", None)  # type: ignore[attr-defined]
    step.model = model  # type: ignore[attr-defined]
    return step


def graph_variant(problem: Problem, kind: str, *, backend: str) -> tuple[Callable[[], None] | None, dict[str, Any]]:
    """``kind``'s step (``nonfinite="propagate"``) captured whole in a CUDA graph: (replay, what happened)."""
    from bench.suite.variants import LR

    model, x, y = problem.new()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if kind == "naive":
        wrapper = None

        def body() -> None:
            sum(problem.losses(model, x, y)).backward()
            opt.step()

        def clear() -> None:
            opt.zero_grad(set_to_none=True)

    else:
        _, method, engine = kind.split("-")
        wrapper = make_wrapper(method, opt, engine=engine, backend=backend, nonfinite="propagate")

        def body() -> None:
            wrapper.backward(problem.losses(model, x, y))
            wrapper.step()

        def clear() -> None:
            wrapper.zero_grad(set_to_none=True)

    eager = eager_variant(problem, kind, backend=backend, nonfinite="propagate")
    info: dict[str, Any] = {"captured": False}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and autotune every kernel outside the capture
            for _ in range(CHECK_STEPS):
                clear()
                body()
        torch.cuda.current_stream().wait_stream(side)
        for _ in range(CHECK_STEPS):
            eager()
        graph = torch.cuda.CUDAGraph()
        if wrapper is not None and hasattr(wrapper, "generator"):
            graph.register_generator_state(wrapper.generator)  # PCGrad: new visiting orders every replay
        clear()
        with torch.cuda.graph(graph):
            body()
        for _ in range(CHECK_STEPS):
            graph.replay()
            eager()
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 — a step that does not capture is a result, not a crash
        info["error"] = f"{type(error).__name__}: {error}"[:400]
        try:
            torch.cuda.synchronize()
        except Exception as after:  # noqa: BLE001
            info["error_after"] = f"{type(after).__name__}: {after}"[:200]
        return None, info
    reference = [p.detach() for p in eager.model.parameters()]  # type: ignore[attr-defined]
    scale = max(p.abs().max().item() for p in reference)
    gap = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), reference))
    info.update(captured=True, max_abs_diff_vs_eager=gap, relative_diff_vs_eager=gap / scale)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay, info


def _spec_fields(problem: Problem) -> dict[str, Any]:
    spec = problem.spec
    return {"model": spec.model, "T": spec.T, "batch": spec.batch, "width": spec.width, "inputs": spec.inputs}


def _timed(variants: dict[str, Callable[[], None]], args: argparse.Namespace) -> tuple[dict[str, list[float]], float]:
    from bench import harness

    warmup, min_rounds = (1, 2) if args.smoke else (3, 5)
    started = time.perf_counter()
    times = harness.interleave(variants, warmup=warmup, rounds=200, min_rounds=min_rounds, budget_s=args.budget)
    return times, time.perf_counter() - started


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    from bench import harness

    summary = harness.summarize(times)
    for entry in summary.values():
        entry.pop("samples_s", None)
    return summary


def measure_eager(problem: Problem, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Callable[[], None]]]:
    """The eager variants timed against each other: (the row's fields, the variants for the graph run)."""
    from bench import harness

    kinds = ["naive", "floor", "floor-batched", *(f"gs-{m}-{e}" for m in METHODS for e in ENGINES)]
    variants = {kind: eager_variant(problem, kind, backend=args.backend) for kind in kinds}
    times, wall = _timed(variants, args)
    ratios: dict[str, dict[str, Any]] = {}
    for kind in times:
        entry = {"over_naive": harness.ratio(times, kind, "naive"), "over_floor": harness.ratio(times, kind, "floor")}
        if kind.endswith("-batched"):
            entry["over_floor_batched"] = harness.ratio(times, kind, "floor-batched")
        ratios[kind] = entry
    # Asked for explicitly, an engine never falls back (batched raises where vmap cannot run the graph),
    # so the one each wrapper was given is the one that ran.
    engines = {kind: step.wrapper.engine for kind, step in variants.items() if getattr(step, "wrapper", None) is not None}
    fields = {
        "kind": "eager",
        "spec": _spec_fields(problem),
        "wall_s": wall,
        "ratios": ratios,
        "loop_over_batched": {m: harness.ratio(times, f"gs-{m}-loop", f"gs-{m}-batched") for m in METHODS},
        "engines": engines,
        "variants": _summary(times),
    }
    return fields, variants


def measure_graphs(problem: Problem, args: argparse.Namespace, eager: dict[str, Callable[[], None]]) -> dict[str, Any]:
    """Every step captured whole, then its replays timed against the eager steps (run after the eager
    row is recorded: a capture that breaks the CUDA context loses only this row)."""
    from bench import harness

    captures: dict[str, dict[str, Any]] = {}
    variants = dict(eager)
    for kind in ["naive", *(f"gs-{m}-{e}" for m in METHODS for e in ENGINES)]:
        replay, info = graph_variant(problem, kind, backend=args.backend)
        captures[kind] = info
        if replay is not None:
            variants[f"graph-{kind}"] = replay
    times, wall = _timed(variants, args)
    ratios = {
        kind: {
            "over_eager": harness.ratio(times, kind, kind.removeprefix("graph-")),
            "over_naive": harness.ratio(times, kind, "naive"),
            "over_floor": harness.ratio(times, kind, "floor"),
        }
        for kind in times
        if kind.startswith("graph-")
    }
    return {"kind": "graph", "spec": _spec_fields(problem), "wall_s": wall, "captures": captures, "ratios": ratios,
            "variants": _summary(times)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        print(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module loads
        print("no CUDA device: smoke run (toy sizes; Triton's interpreter where the backend is triton)", file=sys.stderr)
        args.smoke = True
        if args.backend == "auto":
            args.backend = "triton"  # the path a GPU takes, not the torch one "auto" picks on a CPU
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
        torch.set_num_threads(1)  # toy tensors: more intra-op threads only spin against each other
    from bench import harness
    from bench.suite.variants import LR, Spec, shared_numel
    from bench.gpu_environment import PEERS, _version

    device = torch.device("cuda" if cuda else "cpu")
    path = args.out / ("step_smoke.jsonl" if args.smoke else "step.jsonl")
    peers = {module: _version(distribution) for module, distribution in PEERS.items()}
    peers_line = "not timed here: " + ", ".join(
        f"{name} {'absent' if version is None else version}" for name, version in peers.items()
    )
    print(f"peers (TorchJD, pytorch-optimizer) {peers_line}", flush=True)
    for T in [int(part) for part in args.tasks.split(",") if part.strip()]:
        spec = Spec("mlp", T, 8, width=32, inputs=8) if args.smoke else Spec("mlp", T, 256)
        for name in args.dtypes.split(","):
            problem = Problem(spec, device, DTYPES[name])
            common = {
                "bench": "gpu_step",
                "smoke": args.smoke,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "revision": os.environ.get("GPU_CHECK_REVISION"),
                "T": T,
                "dtype": name,
                "description": spec.describe(),
                "shared_params": shared_numel(spec),
                "optimizer": f"SGD(lr={LR})",
                "backend": args.backend,
                "peers": peers_line,
            }
            fields, eager = measure_eager(problem, args)
            if not cuda:
                fields["cuda_graphs"] = "not attempted: no CUDA device"
            row = harness.record(path, {**common, **fields})
            naive_ms = row["variants"]["naive"]["median_s"] * 1e3
            cells = "  ".join(f"{k} {v['over_naive']['of_medians']:.2f}" for k, v in row["ratios"].items() if k != "naive")
            print(f"T={T} {name}: naive {naive_ms:.3f} ms; ÷ naive: {cells}", flush=True)
            if cuda:
                row = harness.record(path, {**common, **measure_graphs(problem, args, eager)})
                cells = "  ".join(f"{k} {v['over_eager']['of_medians']:.2f}" for k, v in row["ratios"].items())
                failed = [k for k, info in row["captures"].items() if not info["captured"]]
                print(f"T={T} {name}: replay ÷ eager: {cells}; not captured: {failed or 'none'}", flush=True)
            del eager
            if cuda:
                torch.cuda.empty_cache()
    print(f"recorded to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
