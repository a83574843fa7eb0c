"""The aggregation alone (``J`` given, fp32), grouped by ``(T, P)``: naive summation's (``J.sum(0)``), the
floor of every Gram-space method (its two passes: the Gram matrix, then the combine with fixed weights),
each method on one block and on 64 blocks (``granularity=``'s path), and TorchJD's with ``--bench-peers``."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from bench import methods as bm
from bench.bench_aggregation import BLOCKS, block_variants, make_J, torchjd_aggregators
from bench.speed.conftest import SpeedConfig, speed_config
from gradsurgery import backend


def aggregation_kinds(cfg: SpeedConfig) -> list[str]:
    kinds = ["naive", "floor"]
    gradient = [name for name in cfg.methods if bm.kind(name) != "loss"]
    kinds += [f"ours-{name}" for name in gradient]
    kinds += [f"blocks{BLOCKS}-{name}" for name in gradient if name in bm.ORIGINAL]
    if cfg.peers:
        from bench.peers import torchjd_peer

        kinds += [f"torchjd-{name}" for name in gradient if torchjd_peer(name) is not None]
    return kinds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kind" in metafunc.fixturenames:
        cfg = speed_config(metafunc.config)
        cases = [(T, kind) for T in cfg.Ts for kind in aggregation_kinds(cfg)]
        metafunc.parametrize("T,kind", cases, ids=[f"T={T}-{kind}" for T, kind in cases])


_J: dict[tuple[int, int], torch.Tensor] = {}


def _matrix(T: int, P: int) -> torch.Tensor:
    """One ``J`` per ``(T, P)`` for the whole session (``bench_aggregation.make_J``: rows that conflict)."""
    if (T, P) not in _J:
        _J.clear()
        _J[(T, P)] = make_J(T, P)
    return _J[(T, P)]


def variant(kind: str, J: torch.Tensor) -> Callable[[], object]:
    T, P = J.shape
    if kind == "naive":
        return lambda: J.sum(0)
    if kind == "floor":
        out, w = torch.empty(P), torch.ones(T)

        def two_passes() -> torch.Tensor:
            backend.gram(J)
            return backend.combine(w, J, out)

        return two_passes
    prefix, name = kind.split("-", 1)
    if prefix == "ours":
        return lambda f=bm.aggregate_function(name): f(J)
    if prefix == f"blocks{BLOCKS}":
        return block_variants(J, (name,), blocks=BLOCKS)[f"agg{BLOCKS}-{name}"]
    if prefix == "torchjd":
        found, missing = torchjd_aggregators((name,), T)
        if name not in found:
            pytest.skip(missing[name])
        return lambda agg=found[name]: agg(J)
    raise ValueError(f"unknown aggregation variant {kind!r}")


def test_aggregation(benchmark: Any, request: pytest.FixtureRequest, T: int, kind: str) -> None:
    cfg = speed_config(request.config)
    if kind.startswith("torchjd-"):
        pytest.importorskip("torchjd")
    J = _matrix(T, cfg.P)
    benchmark.group = f"aggregation T={T} P={cfg.P / 1e6:g}M"
    benchmark.extra_info.update(kind=kind, T=T, P=cfg.P, dtype="float32", size=cfg.size)
    benchmark(variant(kind, J))
