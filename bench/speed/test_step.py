"""One training step per variant (``bench.suite.variants``), grouped by problem and ``T``: naive summation,
the ``T``-backward floor and each method's wrapper side by side."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bench import methods as bm
from bench.speed.conftest import SpeedConfig, speed_config
from bench.suite.variants import make_step, period_of, shared_numel

WRAPPER_MODES = ("loop", "batched", "repr")  # the engine part of gs-{name}-{mode}; the rest are options


def step_kinds(cfg: SpeedConfig) -> list[str]:
    """The variants of one problem: naive, floor (and ``floor-tasks{k}`` for a ``tps{k}`` mode), each
    method in each mode (a loss-weighting method as its one backward), then, with ``--bench-peers``,
    the peers of the methods that have one."""
    kinds = ["naive", "floor"]
    kinds += [f"floor-tasks{mode.removeprefix('tps')}" for mode in cfg.modes if mode.startswith("tps")]
    for name in cfg.methods:
        if bm.kind(name) == "loss":
            kinds.append(f"gs-{name}")
            continue
        for mode in cfg.modes:
            kinds.append(f"gs-{name}-{mode}" if mode in WRAPPER_MODES else f"gs-{name}-loop-{mode}")
    if cfg.peers:
        from bench.peers import torchjd_peer, torchjd_scalarizer_peer

        for name in cfg.methods:
            loss = bm.kind(name) == "loss"
            if (torchjd_scalarizer_peer(name) if loss else torchjd_peer(name)) is not None:
                kinds.append(f"torchjd-{name}")
                if not loss:
                    kinds.append(f"autogram-{name}")
        if "pcgrad" in cfg.methods:
            kinds.append("pyo-pcgrad")
    return kinds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kind" in metafunc.fixturenames:
        cfg = speed_config(metafunc.config)
        cases = [(T, kind) for T in cfg.Ts for kind in step_kinds(cfg)]
        metafunc.parametrize("T,kind", cases, ids=[f"T={T}-{kind}" for T, kind in cases])


def _rounds(benchmark: Any, config: pytest.Config, seconds: float) -> int:
    """As many rounds as ``--benchmark-max-time`` allows for a round of ``seconds``, at least
    ``--benchmark-min-rounds``: pytest-benchmark's own rule, for a ``pedantic`` run."""
    max_time = float(config.getoption("benchmark_max_time"))
    return max(int(config.getoption("benchmark_min_rounds")), int(max_time / max(seconds, 1e-9)))


def test_step(benchmark: Any, request: pytest.FixtureRequest, T: int, kind: str) -> None:
    cfg = speed_config(request.config)
    spec = cfg.spec(T)
    if kind.startswith(("torchjd-", "autogram-")):
        pytest.importorskip("torchjd")
    if kind.startswith("pyo-"):
        pytest.importorskip("pytorch_optimizer")
    step = make_step(spec, kind)
    period = period_of(step)  # every=k: a round is k steps, one refresh and k − 1 weighted backward passes
    benchmark.group = f"step {spec.model} T={T} {cfg.size}"
    benchmark.extra_info.update(
        kind=kind,
        T=T,
        model=spec.model,
        size=cfg.size,
        description=spec.describe(),
        shared_params=shared_numel(spec),
        steps_per_round=period,
    )
    if benchmark.disabled:
        benchmark(step)
        return
    start = time.perf_counter()
    for _ in range(period):  # warm-up: one whole period, so that every timed round starts with a refresh
        step()
    seconds = time.perf_counter() - start
    benchmark.pedantic(step, iterations=period, rounds=_rounds(benchmark, request.config, seconds))
