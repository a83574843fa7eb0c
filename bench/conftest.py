"""Options of the pytest-benchmark speed suites (``bench/speed``); ``pytest_addoption`` must live in a
conftest that ``pytest bench/`` loads first, so they are declared here. See ``bench/speed/__init__.py``."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradsurgery speed suites (bench/speed)")
    group.addoption(
        "--bench-size",
        choices=("tiny", "small", "suite"),
        default="small",
        help="problem sizes: small (default, ~1 min in all), suite (the interleaved suite's MLP and P = 4M), "
        "tiny (a smoke run)",
    )
    group.addoption("--bench-T", default="2,8", help="numbers of tasks, comma-separated (default 2,8)")
    group.addoption(
        "--bench-methods",
        default="pcgrad,cagrad,mgda",
        help="registered methods (bench.methods names), comma-separated, or 'all' (default pcgrad,cagrad,mgda)",
    )
    group.addoption(
        "--bench-modes",
        default="loop",
        help="step variants of the gradient methods, comma-separated: loop, batched, repr, bf16, every<k>, "
        "tps<k>, module, parameter (default loop)",
    )
    group.addoption(
        "--bench-peers", action="store_true", help="also time TorchJD's and pytorch-optimizer's step (if installed)"
    )
    group.addoption("--bench-threads", type=int, default=1, help="torch intra-op threads (default 1)")
