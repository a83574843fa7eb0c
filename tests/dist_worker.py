"""The distributed side of ``tests/test_distributed.py``: model, data, references and the checks each rank runs.

The tests start one process per rank (``python -m tests.dist_worker SUITE RANK WORLD INIT_FILE OUT_DIR``)
on the gloo backend over loopback; each rank runs every check of its suite (a failing check records
its exception and the next one runs) and saves what it saw to ``OUT_DIR/rank{RANK}.pt``. The tests
compare those records with each other and with the single-process references below, which they
compute in the pytest process — so the assertions, and their messages, live in the test file.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import gradsurgery as gs
from gradsurgery.methods import REGISTRY, Method, by_name

def _factory(method: Method) -> Callable[..., gs.GradSurgery]:
    def make(inner: torch.optim.Optimizer, **kw: Any) -> gs.GradSurgery:
        if method.random:
            kw.setdefault("seed", 3)
        return getattr(gs, method.name)(inner, **kw)

    return make


# Every registered method (Mean is Sum with reduction="mean": nothing of its own to check here).
METHODS: dict[str, Callable[..., gs.GradSurgery]] = {
    m.name: _factory(m) for m in REGISTRY if m.name != "Mean" and m.loss is None  # loss weighting: one process
}


def refused(method: str, sync: str) -> bool:
    """The combinations a method refuses at construction (tested for the refusal instead)."""
    spec = by_name(method)
    return (spec.combine is not None and sync.startswith("sharded")) or (spec.state is not None and sync == "local")
SYNCS = ("exact", "local", "sharded", "sharded-native")  # sharded-native: reduce-scatter forced on gloo
STEPS = 3
TASKS = 3
BATCH = 6  # per rank


class MultiTask(nn.Module):
    """A shared trunk, one head per task, and a parameter that tasks 0 and 1 read (shared, not in the trunk)."""

    def __init__(self, width: int, tasks: int = TASKS, *, pair_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
        self.pair = nn.Parameter(torch.randn(width, dtype=pair_dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        losses = []
        for t, head in enumerate(self.heads):
            h = z + self.pair.to(z.dtype) if t < 2 else z
            losses.append(((head(h).squeeze(-1) - y[:, t]) ** 2).mean())
        return z, losses


def width_for(world: int) -> int:
    """A trunk width whose shared size (trunk + pair) is not a multiple of ``world``: uneven shards."""
    width = 6
    while (5 * width + width + width * width + width + width) % world == 0:
        width += 1
    return width


def make_model(world: int, seed: int = 0, **kw: Any) -> MultiTask:
    torch.manual_seed(seed)
    return MultiTask(width_for(world), **kw)


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, TASKS, generator=gen)


def global_batch(world: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [batch(r, step, micro) for r in range(world)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def inner(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def make_wrapper(method: str, model: nn.Module, sync: str | None = None, **kw: Any) -> gs.GradSurgery:
    """Single process when ``sync`` is None; ``"sharded-native"`` forces the reduce-scatter path."""
    if sync is not None:
        kw["sync"] = "sharded" if sync == "sharded-native" else sync
    opt = METHODS[method](inner(model.parameters()), **kw)
    if sync == "sharded-native":
        opt._dist.native_reduce_scatter = True
    return opt


def backward(opt: gs.GradSurgery, model: nn.Module, x: torch.Tensor, y: torch.Tensor, features: bool) -> None:
    z, losses = model(x, y)
    opt.backward(losses, features=z if features else None)


# ---------------------------------------------------------------------- single-process references


def reference_exact(method: str, world: int, *, steps: int = STEPS, micro: int = 1, features: bool = False, **kw: Any):
    """Single process on the concatenated batch (what ``exact`` and ``sharded`` must equal)."""
    model = make_model(world, **kw.pop("model_kw", {}))
    opt = make_wrapper(method, model, **kw)
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            backward(opt, model, *global_batch(world, step, m), features)
        opt.step()
    return model


def reference_local(method: str, world: int, *, steps: int = STEPS, micro: int = 1, features: bool = False, **kw: Any):
    """``local`` by its definition: each rank's surgery on its own gradients, the results averaged."""
    master = make_model(world, **kw.pop("model_kw", {}))
    step_opt = inner(master.parameters())
    copies = [copy.deepcopy(master) for _ in range(world)]
    wrappers = [make_wrapper(method, c, **kw) for c in copies]
    for step in range(steps):
        for r, (c, opt) in enumerate(zip(copies, wrappers)):
            opt.zero_grad()
            for m in range(micro):
                backward(opt, c, *batch(r, step, m), features)
        for p, *ps in zip(master.parameters(), *(c.parameters() for c in copies)):
            grads = [q.grad for q in ps if q.grad is not None]
            p.grad = sum(g / world for g in grads) if grads else None
        step_opt.step()
        for c in copies:
            c.load_state_dict(master.state_dict())
    return master


# ---------------------------------------------------------------------- checks run on every rank


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finite_grads(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def _error(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        fn()
    except Exception as exc:  # recorded, compared across ranks by the tests
        return {"type": type(exc).__name__, "message": str(exc), "tasks": getattr(exc, "tasks", None)}
    return {"type": None}


def train(rank: int, world: int, method: str, sync: str, *, steps: int = STEPS, micro: int = 1,
          features: bool = False, ddp: bool = False, model_kw: dict | None = None, **kw: Any) -> dict[str, Any]:
    model = make_model(world, **(model_kw or {}))
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = make_wrapper(method, model, sync, **kw)
        weights, first_buffer, stats = [], None, None
        for step in range(steps):
            if step == 1:  # one step in the steady state
                opt._dist.stats.reset()
            opt.zero_grad()
            for m in range(micro):
                backward(opt, net, *batch(rank, step, m), features)
                if step == 0 and m == 0 and opt._buffer is not None:
                    first_buffer = opt._buffer.matrix.clone()
            weights.append(None if opt.last_weights is None else opt.last_weights.clone())
            opt.step()
            if step == 1:
                stats = opt._dist.stats.summary()
    return {
        "params": _params(model),
        "weights": weights,
        "first_buffer": first_buffer,
        "stats": stats,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }


def check_nonfinite(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 produces a NaN for task 1: every rank must raise, change nothing, and stay in step."""
    out: dict[str, Any] = {}
    for accumulating in (False, True):
        model = make_model(world)
        # the loop engine: the batched one's 0·NaN spreads a NaN to every task's row (see test_optim)
        opt = make_wrapper("CAGrad", model, "exact", engine="loop")
        backward(opt, model, *batch(rank, 0), False)
        opt.step()
        opt.zero_grad()
        if accumulating:
            backward(opt, model, *batch(rank, 1), False)
        before = (_params(model), [None if p.grad is None else p.grad.clone() for p in model.parameters()])
        x, y = batch(rank, 2)
        if rank == 1:
            y = y.clone()
            y[0, 1] = float("nan")
        out[f"raise-{accumulating}"] = _error(lambda: backward(opt, model, x, y, False))
        unchanged = all(torch.equal(a, b) for a, b in zip(before[0].values(), _params(model).values())) and all(
            (g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(before[1], model.parameters())
        )
        out[f"unchanged-{accumulating}"] = unchanged
        backward(opt, model, *batch(rank, 3), False)  # the ranks are still in step
        opt.step()
        out[f"after-{accumulating}"] = _params(model)
    model = make_model(world)
    opt = make_wrapper("CAGrad", model, "exact")
    z, losses = model(*batch(rank, 0))
    if rank == 1:  # finite gradients whose squared norm overflows fp32: suspected, cleared, rescued
        losses[0] = losses[0] * 1e25
    out["huge-finite"] = _error(lambda: opt.backward(losses))
    out["huge-finite-grads"] = _finite_grads(model)
    for policy in ("skip", "propagate"):
        model = make_model(world)
        opt = make_wrapper("MGDA", model, "exact", nonfinite=policy)
        x, y = batch(rank, 0)
        if rank == 1:
            y = y.clone()
            y[0, 0] = float("inf")
        backward(opt, model, x, y, False)
        out[f"{policy}-finite-grads"] = _finite_grads(model)
        opt.step()
        out[f"{policy}-skipped"] = opt.skipped_steps
    return out


def check_bad_input(rank: int, world: int) -> dict[str, Any]:
    """Disagreements and errors on one rank: the same clear error everywhere, then a normal step."""
    last = world - 1
    out: dict[str, Any] = {}

    def then_step(opt: gs.GradSurgery, model: nn.Module) -> dict[str, torch.Tensor]:
        opt.zero_grad()
        backward(opt, model, *batch(rank, 5), False)
        opt.step()
        return _params(model)

    model = make_model(world)
    opt = make_wrapper("MGDA", model, "exact")
    x, y = batch(rank, 0)
    out["tasks"] = _error(lambda: opt.backward(model(x, y)[1][: 2 if rank == last else 3]))
    out["tasks-then"] = then_step(opt, model)

    model = make_model(world)
    shared = [*model.trunk.parameters()] + ([model.pair] if rank == last else [])
    opt = make_wrapper("MGDA", model, "sharded", shared=shared)
    out["shared-set"] = _error(lambda: backward(opt, model, x, y, False))

    torch.manual_seed(0)
    other = MultiTask(width_for(world) + (1 if rank == last else 0))
    opt = make_wrapper("PCGrad", other, "exact")
    out["shapes"] = _error(lambda: backward(opt, other, x, y, False))

    model = make_model(world)
    opt = make_wrapper("CAGrad", model, "exact")

    def non_scalar() -> None:
        z, losses = model(x, y)
        if rank == last:
            losses[2] = z.sum(0)
        opt.backward(losses)

    out["local-error"] = _error(non_scalar)
    out["local-error-then"] = then_step(opt, model)

    model = make_model(world)
    opt = make_wrapper("Sum", model, "exact" if rank == 0 else "local")
    out["sync-differs"] = _error(lambda: backward(opt, model, x, y, False))

    model = make_model(world)
    opt = METHODS["MGDA"](inner(p for name, p in model.named_parameters() if name != "pair"), sync="exact")
    out["outside-optimizer"] = _error(lambda: backward(opt, model, x, y, False))

    # Only rank 1's losses reach a parameter outside the optimizer: every rank raises on that call,
    # and the next one pairs up again.
    model = make_model(world)
    outside = nn.Parameter(torch.ones(()))
    opt = make_wrapper("MGDA", model, "exact")

    def outside_on_one_rank() -> None:
        z, losses = model(x, y)
        if rank == last:
            losses[0] = losses[0] * outside
        opt.backward(losses)

    out["outside-one-rank"] = _error(outside_on_one_rank)
    out["outside-one-rank-then"] = then_step(opt, model)

    # An "expert" that a different single task reads on each rank: shared on the global batch.
    model = make_model(world)
    expert = nn.Parameter(torch.ones(model.trunk[0].out_features))
    opt = METHODS["MGDA"](inner([*model.parameters(), expert]), sync="exact")

    def experts() -> None:
        z, losses = model(x, y)
        losses[rank % len(losses)] = losses[rank % len(losses)] + (model.trunk(x) * expert).mean()
        opt.backward(losses)

    out["experts"] = _error(experts)

    model = make_model(world)
    embedding = nn.Embedding(4, 1, sparse=True)
    opt = METHODS["MGDA"](inner([*model.parameters(), *embedding.parameters()]), sync="exact")

    def sparse_head() -> None:
        z, losses = model(x, y)
        losses[2] = losses[2] + embedding(torch.tensor([0, 1])).sum()
        opt.backward(losses)

    out["sparse-specific"] = _error(sparse_head)

    model = make_model(world)
    opt = make_wrapper("PCGrad", model, "exact", seed=rank)
    out["seed-differs"] = _error(lambda: backward(opt, model, x, y, False))

    model = make_model(world)
    torch.manual_seed(100 + rank)  # different global generators: seed=None must still agree
    opt = gs.PCGrad(inner(model.parameters()))
    out["seed-none"] = opt.seed
    out["seed-none-then"] = then_step(opt, model)

    model = make_model(world)
    opt = make_wrapper("CAGrad", model, "exact")
    backward(opt, model, x, y, False)
    out["zero-grad-differs"] = _error(
        lambda: (opt.zero_grad() if rank == 0 else None, backward(opt, model, *batch(rank, 1), False))
    )

    out["unknown-sync"] = _error(lambda: gs.MGDA(inner(make_model(world).parameters()), sync="allreduce"))
    return out


class Routed(nn.Module):
    """A trunk and three experts; each task reads one expert, chosen per rank and step (a routed layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(6)) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(TASKS))

    def losses(self, x: torch.Tensor, y: torch.Tensor, routes: tuple[int, ...]) -> list[torch.Tensor]:
        z = torch.tanh(self.trunk(x))
        return [((head(z + self.experts[e]).squeeze(-1) - y[:, t]) ** 2).mean() for t, (head, e) in enumerate(zip(self.heads, routes))]


def routes(rank: int, step: int) -> tuple[int, ...]:
    """Step 0: expert 0 shared by tasks 0 and 1 everywhere; later steps: which tasks read an expert
    differs between ranks, so only all ranks together say whether it is shared on that step."""
    table = {0: [(0, 0, 1)], 1: [(1, 2, 1), (2, 2, 2)], 2: [(0, 1, 2), (2, 1, 1)]}[step % 3]
    return table[rank % len(table)]


def train_routed(rank: int, world: int, method: str, sync: str) -> dict[str, Any]:
    model = Routed()
    opt = make_wrapper(method, model, sync, shared=[*model.trunk.parameters(), *model.experts])
    for step in range(STEPS):
        opt.zero_grad()
        opt.backward(model.losses(*batch(rank, step), routes(rank, step)))
        opt.step()
    return {"params": _params(model)}


def reference_routed(method: str, world: int) -> nn.Module:
    """Single process: every task's loss is the mean of the ranks' losses, each with its own routes."""
    model = Routed()
    opt = make_wrapper(method, model, shared=[*model.trunk.parameters(), *model.experts])
    for step in range(STEPS):
        opt.zero_grad()
        per_rank = [model.losses(*batch(r, step), routes(r, step)) for r in range(world)]
        opt.backward([sum(column) / world for column in zip(*per_rank)])
        opt.step()
    return model


def check_checkpoint(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Save on rank 0 after 2 steps, load on every rank into fresh objects, train on: as if uninterrupted."""

    def run(model: nn.Module, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            backward(opt, model, *batch(rank, step), False)
            opt.step()

    make = lambda m, seed: gs.PCGrad(torch.optim.Adam(m.parameters(), lr=0.01), seed=seed, sync="exact")  # noqa: E731
    model = make_model(world)
    opt = make(model, 5)
    run(model, opt, range(4))
    uninterrupted = _params(model)

    model = make_model(world)
    opt = make(model, 5)
    run(model, opt, range(2))
    path = os.path.join(out_dir, "checkpoint.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    resumed = make_model(world, seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed, 12345)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, range(2, 4))
    return {"uninterrupted": uninterrupted, "resumed": _params(resumed)}


def suite(rank: int, world: int, out_dir: str, name: str) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def record(key: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            results[key] = fn()
        except Exception:
            results[key] = {"crashed": traceback.format_exc()}
        print(f"{key}: {time.perf_counter() - start:.2f} s", flush=True)

    for method in METHODS:
        for sync in SYNCS:
            if refused(method, sync):
                record(f"train/{method}/{sync}", lambda: _error(lambda: make_wrapper(method, make_model(world), sync)))
            else:
                record(f"train/{method}/{sync}", lambda: train(rank, world, method, sync))
    for sync in ("exact", "local", "sharded", "sharded-native"):
        record(f"accumulate/{sync}", lambda: train(rank, world, "PCGrad", sync, micro=2))
    record("nonfinite", lambda: check_nonfinite(rank, world))
    record("mixed-dtype/sharded", lambda: train(rank, world, "MGDA", "sharded", model_kw={"pair_dtype": torch.float64}))
    for sync in ("exact", "sharded-native"):
        record(f"routed/{sync}", lambda: train_routed(rank, world, "MGDA", sync))
    for sync in ("exact", "local", "sharded-native"):
        record(f"granularity/{sync}", lambda: train(rank, world, "MGDA", sync, granularity="parameter"))
    if name == "full":
        for sync in ("exact", "local"):
            record(f"features/{sync}", lambda: train(rank, world, "MGDA", sync, features=True))
        record("ddp/exact", lambda: train(rank, world, "PCGrad", "exact", ddp=True))
        record("ddp/features", lambda: train(rank, world, "MGDA", "exact", ddp=True, features=True))
        record("bad-input", lambda: check_bad_input(rank, world))
        record("checkpoint", lambda: check_checkpoint(rank, world, out_dir))
    return results


def main() -> None:
    name, rank, world, init_file, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = suite(rank, world, out_dir, name)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # DDP modules must be gone before the group: torch's teardown can abort otherwise
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
