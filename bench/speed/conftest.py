"""The speed suites' configuration from the command line (``bench/conftest.py``'s options), torch's
thread count, and the provenance added to pytest-benchmark's JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import pytest
import torch

from bench import methods as bm
from bench.suite.variants import Spec

# Per size: the MLP of the step benchmarks (T filled in) and the columns of J for the aggregation.
SIZES: dict[str, tuple[Spec, int]] = {
    "tiny": (Spec("mlp", 0, 8, width=16, inputs=8), 20_000),
    "small": (Spec("mlp", 0, 64, width=256, inputs=256), 1_000_000),
    "suite": (Spec("mlp", 0, 256), 4_000_000),  # bench.bench_suite's MLP; bench_aggregation's middle P
}


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    size: str
    Ts: tuple[int, ...]
    methods: tuple[str, ...]
    modes: tuple[str, ...]
    peers: bool
    threads: int

    def spec(self, T: int) -> Spec:
        return dataclasses.replace(SIZES[self.size][0], T=T)

    @property
    def P(self) -> int:
        return SIZES[self.size][1]


def speed_config(config: pytest.Config) -> SpeedConfig:
    methods = config.getoption("bench_methods")
    names = bm.names() if methods == "all" else tuple(bm.key(bm.lookup(m.strip())) for m in methods.split(","))
    Ts = tuple(int(T) for T in config.getoption("bench_T").split(","))
    if any(T < 2 for T in Ts):
        raise pytest.UsageError(f"--bench-T needs at least 2 tasks, got {config.getoption('bench_T')}")
    return SpeedConfig(
        size=config.getoption("bench_size"),
        Ts=Ts,
        methods=names,
        modes=tuple(m.strip() for m in config.getoption("bench_modes").split(",") if m.strip()),
        peers=config.getoption("bench_peers"),
        threads=config.getoption("bench_threads"),
    )


@pytest.fixture(scope="session", autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(request.config.getoption("bench_threads"))
    yield
    torch.set_num_threads(saved)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """The interleaved suites' provenance beside pytest-benchmark's own (machine_info, commit_info): the
    library's digest (pins uncommitted changes), versions, torch's threads, the sizes asked for."""
    from bench import harness

    output_json["gradsurgery"] = {
        **harness.context(),
        "torch_threads": config.getoption("bench_threads"),  # what the benchmarks ran with (restored since)
        "options": dataclasses.asdict(speed_config(config)),
    }
