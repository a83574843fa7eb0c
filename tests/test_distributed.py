"""Distributed training: every method × sync mode against its single-process reference, on 2 and 3 ranks.

Each world size is one group of processes (gloo over loopback, a file store, no fixed port) that runs
every check of ``tests/dist_worker.py`` once; the tests below read what each rank recorded. Process
start-up costs seconds, so the checks are batched into those two groups. Every group runs under a
deadline and its process group under a 60 s collective timeout: nothing can hang the suite.

fp32 tolerances: ``exact`` and ``sharded`` differ from the single-process reference only in summation
order (the all-reduce sums pre-divided per-rank means; the reference takes one mean over the global
batch; sharded sums partial Gram matrices), ~1e-7 relative per gradient, over 3 SGD-momentum steps:
``rtol=1e-5, atol=1e-6`` as in ``test_optim``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradsurgery as gs

from . import dist_worker as W

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"  # gloo binds its sockets to this interface only
DEADLINE_S = 150  # a whole group, start-up included (the whole file: 25–50 s on 2 busy cores)
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


class _Group:
    """One process per rank, started now; :meth:`results` waits (under the deadline) and loads their records."""

    def __init__(self, suite: str, world: int, folder: Path) -> None:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": LOOPBACK, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("TRITON_INTERPRET", None)
        self.world, self.folder, self.started = world, folder, time.monotonic()
        self.logs = [open(folder / f"log{r}.txt", "w") for r in range(world)]
        command = [sys.executable, "-m", "tests.dist_worker", suite]
        self.procs = [
            subprocess.Popen(
                [*command, str(r), str(world), str(folder / "store"), str(folder)],
                cwd=ROOT,
                env=env,
                stdout=self.logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]

    def results(self) -> list[dict]:
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, DEADLINE_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in self.logs:
                f.close()
        failed = [r for r, p in enumerate(self.procs) if p.returncode != 0]
        if failed:
            logs = "\n".join(f"--- rank {r} ---\n" + (self.folder / f"log{r}.txt").read_text()[-3000:] for r in failed)
            pytest.fail(f"{self.world} ranks: rank(s) {failed} failed or passed the {DEADLINE_S} s deadline\n{logs}")
        return [torch.load(self.folder / f"rank{r}.pt", weights_only=False) for r in range(self.world)]


@functools.cache
def _reference(
    method: str, sync: str, world: int, *, micro: int = 1, features: bool = False, pair64: bool = False, granularity: str = "all"
):
    """The single-process reference of a run: ``local``'s own definition, or single-process training on the
    concatenated batch for the others (cached: exact, sharded and sharded-native share it)."""
    kw = {"micro": micro, "features": features, "model_kw": {"pair_dtype": torch.float64} if pair64 else {}}
    if granularity != "all":
        kw["granularity"] = granularity
    if sync == "local":
        return W.reference_local(method, world, **kw)
    return W.reference_exact(method, world, **kw)


REFERENCES = [
    *(
        (method, sync, world, {})
        for world in (2, 3)
        for method in W.METHODS
        for sync in ("exact", "local")
        if not (W.refused(method, sync) and W.refused(method, "sharded"))
        and not (sync == "local" and W.refused(method, "local"))
    ),
    *(("PCGrad", sync, world, {"micro": 2}) for world in (2, 3) for sync in ("exact", "local")),
    *(("MGDA", "exact", world, {"pair64": True}) for world in (2, 3)),
    *(("MGDA", sync, 2, {"features": True}) for sync in ("exact", "local")),
]


SUITES = ((2, "full"), (3, "core"))  # (processes, the checks they run: see dist_worker.suite)


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[int, list[dict]]:
    running = {world: _Group(suite, world, tmp_path_factory.mktemp(f"world{world}")) for world, suite in SUITES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems; a thread pool only fights the ranks for the cores
    try:
        for method, sync, world, kw in REFERENCES:  # while the ranks start up
            _reference(method, sync, world, **kw)
    finally:
        torch.set_num_threads(threads)
        results = {world: group.results() for world, group in running.items()}  # reaps them in any case
    return results


def _records(groups: dict[int, list[dict]], world: int, key: str) -> list:
    records = [rank[key] for rank in groups[world]]
    for r, record in enumerate(records):
        if isinstance(record, dict) and "crashed" in record:
            pytest.fail(f"{key} crashed on rank {r} of {world}:\n{record['crashed']}")
    return records


def _base(sync: str) -> str:
    return "local" if sync == "local" else "exact"


def _assert_params(actual: dict[str, torch.Tensor], expected: torch.nn.Module, what: str) -> None:
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(actual[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, {name}: {m}")


def _assert_same_on_every_rank(values: list[dict[str, torch.Tensor]], what: str) -> None:
    for r, other in enumerate(values[1:], start=1):
        for name in values[0]:
            assert torch.equal(values[0][name], other[name]), f"{what}: {name} differs between rank 0 and rank {r}"


# ---------------------------------------------------------------------- results


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sync", W.SYNCS)
@pytest.mark.parametrize("method", list(W.METHODS))
def test_training_equals_the_single_process_reference(groups, world: int, sync: str, method: str) -> None:
    """exact/sharded: single process on the concatenated batch; local: mean of per-rank surgeries. A
    combination the method cannot serve is refused at construction, on every rank, saying why."""
    records = _records(groups, world, f"train/{method}/{sync}")
    if W.refused(method, sync):
        assert all(r["type"] == "ValueError" and "sync=" in r["message"] for r in records), records
        return
    _assert_same_on_every_rank([r["params"] for r in records], f"{method}/{sync}")
    if sync != "local":  # one Gram matrix, one generator: the same weights everywhere, bit for bit
        for step in range(W.STEPS):
            first = records[0]["weights"][step]
            assert all((first is None and r["weights"][step] is None) or torch.equal(first, r["weights"][step]) for r in records), step
    _assert_params(records[0]["params"], _reference(method, _base(sync), world), f"{method}/{sync} on {world} ranks")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sync", W.SYNCS)
def test_accumulation_all_reduces_the_accumulated_buffer(groups, world: int, sync: str) -> None:
    """Two micro-batches per step. After the first backward the (averaged) buffer is bit-identical on every
    rank, so all-reducing ``B + J_r`` after the second one gives ``B + mean_r J_r``: the result equals the
    reference accumulating the concatenated micro-batches."""
    records = _records(groups, world, f"accumulate/{sync}")
    if sync in ("exact", "sharded"):  # the buffer holds the mean after each backward
        assert all(torch.equal(records[0]["first_buffer"], r["first_buffer"]) for r in records)
    _assert_same_on_every_rank([r["params"] for r in records], f"accumulate/{sync}")
    _assert_params(records[0]["params"], _reference("PCGrad", _base(sync), world, micro=2), f"accumulate/{sync}")


@pytest.mark.parametrize("world", [2, 3])
def test_parameters_of_two_dtypes_in_sharded_mode(groups, world: int) -> None:
    records = _records(groups, world, "mixed-dtype/sharded")
    _assert_params(records[0]["params"], _reference("MGDA", "exact", world, pair64=True), "mixed dtypes")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sync", ["exact", "sharded-native"])
def test_sharing_decided_over_all_ranks_on_every_step(groups, world: int, sync: str) -> None:
    """A routed layer: an expert that one task reads on one rank and another task on another is shared
    on that step; one that a single task reads on every rank gets that task's plain gradient."""
    records = _records(groups, world, f"routed/{sync}")
    _assert_same_on_every_rank([r["params"] for r in records], f"routed/{sync}")
    expected = W.reference_routed("MGDA", world)
    _assert_params(records[0]["params"], expected, f"routed/{sync} on {world} ranks")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sync", ["exact", "local", "sharded-native"])
def test_granularity_per_parameter(groups, world: int, sync: str) -> None:
    """Per-block surgery over ranks: in sharded mode each rank sums its columns' partial Gram matrices
    per block and the (B, T, T) stack is all-reduced as one tensor."""
    records = _records(groups, world, f"granularity/{sync}")
    _assert_same_on_every_rank([r["params"] for r in records], f"granularity/{sync}")
    expected = _reference("MGDA", _base(sync), world, granularity="parameter")
    _assert_params(records[0]["params"], expected, f"granularity/{sync} on {world} ranks")


@pytest.mark.parametrize("sync", ["exact", "local"])
def test_representation_mode(groups, sync: str) -> None:
    """Weights from the Gram of ∂L/∂z: the global one is Σ_r G_r / N² (one T×T all-reduce)."""
    records = _records(groups, 2, f"features/{sync}")
    _assert_same_on_every_rank([r["params"] for r in records], f"features/{sync}")
    _assert_params(records[0]["params"], _reference("MGDA", sync, 2, features=True), f"features/{sync}")


def test_ddp_wrapped_model_trains_like_the_plain_one(groups) -> None:
    """autograd.grad does not fire DDP's reducer hooks: the wrapper's own reduction is the only one."""
    ddp = _records(groups, 2, "ddp/exact")
    plain = _records(groups, 2, "train/PCGrad/exact")
    for d, p in zip(ddp, plain):
        for name in p["params"]:
            assert torch.equal(d["params"][name], p["params"][name]), name
    features = _records(groups, 2, "ddp/features")
    _assert_same_on_every_rank([r["params"] for r in features], "ddp/features")
    _assert_params(features[0]["params"], _reference("MGDA", "exact", 2, features=True), "ddp/features")


# ---------------------------------------------------------------------- communication


@pytest.mark.parametrize("world", [2, 3])
def test_communication_per_step(groups, world: int) -> None:
    stats = {sync: _records(groups, world, f"train/PCGrad/{sync}")[0]["stats"] for sync in W.SYNCS}
    T, P = W.TASKS, sum(p.numel() for p in W.make_model(world).trunk.parameters()) + W.width_for(world)
    ring = 2 * (world - 1) / world
    assert stats["exact"]["payload_bytes"]["all_reduce"] >= T * P * 4
    assert stats["exact"]["sent_bytes"]["all_reduce"] >= ring * T * P * 4
    assert stats["local"]["sent_bytes_total"] < stats["exact"]["sent_bytes_total"] / 2  # T = 3
    assert stats["sharded-native"]["sent_bytes_total"] < stats["exact"]["sent_bytes_total"]
    assert stats["sharded"]["sent_bytes_total"] > stats["exact"]["sent_bytes_total"]  # gloo fallback
    assert all(s["calls"]["descriptor"] == 1 for s in stats.values())


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_sharded_falls_back_to_all_reduce_with_one_warning(groups, world: int) -> None:
    for rank in groups[world]:
        sharded = [record for key, record in rank.items() if key.startswith("train/") and "sharded" in key and "warnings" in record]
        caught = [message for record in sharded for message in record["warnings"]]
        assert len(caught) == 1 and "no communication saved" in caught[0]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("world", [2, 3])
def test_a_nan_on_one_rank_raises_on_every_rank(groups, world: int) -> None:
    records = _records(groups, world, "nonfinite")
    for accumulating in (False, True):
        errors = [r[f"raise-{accumulating}"] for r in records]
        assert all(e["type"] == "NonFiniteGradientError" and e["tasks"] == [1] for e in errors), errors
        assert len({e["message"] for e in errors}) == 1 and "rank(s) [1]" in errors[0]["message"]
        assert all(r[f"unchanged-{accumulating}"] for r in records)
        _assert_same_on_every_rank([r[f"after-{accumulating}"] for r in records], "the step after the error")
    assert all(r["huge-finite"]["type"] is None and r["huge-finite-grads"] for r in records)
    assert all(r["skip-skipped"] == 1 and r["skip-finite-grads"] for r in records)
    assert all(r["propagate-skipped"] == 0 and not r["propagate-finite-grads"] for r in records)


BAD_INPUT = {
    "tasks": "disagree on the number of tasks",
    "shared-set": "disagree on the number of shared parameters",
    "shapes": "disagree on the shared numel",
    "sync-differs": "disagree on the method and options",
    "seed-differs": "disagree on the generator state",
    "zero-grad-differs": "disagree on the accumulation state",
    "unknown-sync": "sync must be one of",
    "outside-optimizer": "every parameter the losses reach must be in the wrapped optimizer",
    "experts": "disagree on the task-specific parameters",
    "sparse-specific": "are not averaged over torch.distributed ranks",
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_raises_the_same_error_on_every_rank(groups, case: str) -> None:
    errors = [r[case] for r in _records(groups, 2, "bad-input")]
    assert all(e["type"] == "ValueError" for e in errors), errors
    assert len({e["message"] for e in errors}) == 1
    assert BAD_INPUT[case] in errors[0]["message"]


def test_a_parameter_outside_the_optimizer_on_one_rank_is_refused_on_every_rank(groups) -> None:
    records = _records(groups, 2, "bad-input")
    own, other = records[1]["outside-one-rank"], records[0]["outside-one-rank"]
    assert own["type"] == "ValueError" and "must be in the wrapped optimizer" in own["message"]
    assert other["type"] == "ValueError" and other["message"].startswith("backward() failed on rank 1")
    _assert_same_on_every_rank([r["outside-one-rank-then"] for r in records], "outside-one-rank-then")


def test_a_wrapper_built_before_torch_distributed_started_refuses_to_run_alone(monkeypatch) -> None:
    model = W.make_model(2)
    opt = W.make_wrapper("MGDA", model)
    monkeypatch.setattr(gs.distributed, "started_since", lambda: True)
    with pytest.raises(ValueError, match="built before torch.distributed.init_process_group"):
        W.backward(opt, model, *W.batch(0, 0), False)
    assert all(p.grad is None for p in model.parameters())


def test_an_error_on_one_rank_is_reported_on_the_others_and_training_goes_on(groups) -> None:
    records = _records(groups, 2, "bad-input")
    own, other = records[1]["local-error"], records[0]["local-error"]
    assert own["type"] == "ValueError" and own["message"].startswith("loss 2 is not a scalar")
    assert other["type"] == "ValueError"
    assert other["message"].startswith("backward() failed on rank 1 with ValueError: loss 2 is not a scalar")
    for key in ("tasks-then", "local-error-then", "seed-none-then"):
        _assert_same_on_every_rank([r[key] for r in records], key)
    assert records[0]["seed-none"] == records[1]["seed-none"]  # rank 0's drawn seed, shared


def test_checkpoint_saved_on_rank_0_resumes_on_every_rank(groups) -> None:
    for r, record in enumerate(_records(groups, 2, "checkpoint")):
        for name, value in record["uninterrupted"].items():
            assert torch.equal(record["resumed"][name], value), f"rank {r}: {name}"


# ---------------------------------------------------------------------- in this process


def test_unknown_sync_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"sync must be one of \('exact', 'local', 'sharded'\), got 'ring'"):
        gs.CAGrad(W.inner(W.make_model(2).parameters()), sync="ring")


def test_process_group_without_torch_distributed_is_refused() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialised"):
        gs.Sum(W.inner(W.make_model(2).parameters()), process_group=object())


@pytest.mark.parametrize("sync", ["exact", "local", "sharded"])
def test_a_group_of_one_is_a_single_process(monkeypatch, sync: str) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", LOOPBACK)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, reference = W.make_model(2), W.make_model(2)
        opt = W.make_wrapper("PCGrad", model, sync)
        ref = W.make_wrapper("PCGrad", reference)
        assert opt._dist is None
        for step in range(2):
            for o, m in ((opt, model), (ref, reference)):
                o.zero_grad()
                W.backward(o, m, *W.batch(0, step), False)
                o.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)
    finally:
        dist.destroy_process_group()
