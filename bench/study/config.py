"""The study's settings: three presets (``--quick``, default, ``--full``), ``--tradeoff`` and the
command-line overrides, and the results folder each configuration writes to.

The presets are sized to their wall-clock budgets on 2 CPU cores (the default: at most 4 minutes);
the default run's measured time is stated once, in the README ("The joint-training study"), and every
run records its own in ``results.json`` (``meta.elapsed_s``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bench.methods import names_of

from .conflict import ConflictConfig
from .methods import METHODS, entry
from .multidigits import DigitsConfig
from .toy import ToyConfig


@dataclass(frozen=True)
class TimingConfig:
    rounds: int
    budget_s: float  # per MultiDigits variant, once 5 rounds are in


@dataclass(frozen=True)
class StudyConfig:
    preset: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path  # the results folder of this configuration (see results_folder)
    device: str
    toy: ToyConfig
    digits: DigitsConfig  # both MultiDigits variants (2 and 4 tasks)
    conflict: ConflictConfig
    timing: TimingConfig
    tradeoff: bool  # the cheap-mode and loss-weighting comparison on MultiDigits with 4 tasks


# The cheap-mode and loss-weighting comparison: PCGrad, CAGrad and MGDA refreshed every step and every
# 4 steps, and every registered loss-weighting method (one backward per step).
CHEAP_METHODS: tuple[str, ...] = ("pcgrad", "cagrad", "mgda")
CHEAP_EVERY = 4


def tradeoff_entries() -> tuple[str, ...]:
    """The trade-off comparison's entries (Sum, the reference point of its time axis, first)."""
    cheap = [entry(m, every) for m in CHEAP_METHODS for every in (1, CHEAP_EVERY)]
    return ("sum", *cheap, *names_of("loss"))


_PRESETS: dict[str, tuple[int, ToyConfig, DigitsConfig, ConflictConfig, TimingConfig, bool]] = {
    "quick": (
        2,
        ToyConfig(steps=300, pareto_weights=21, trajectory_points=100),
        DigitsConfig(n_train=600, n_val=200, n_test=200, epochs=2, batch_size=100, lr=1e-3, log_every=2),
        ConflictConfig(angles=(0.0, 90.0, 180.0), dim=16, hidden=4, n_train=512, n_test=512, epochs=3,
                       batch_size=128, lr=1e-2),
        TimingConfig(rounds=5, budget_s=1.0),
        False,
    ),
    "default": (
        3,
        ToyConfig(steps=100_000, pareto_weights=101, trajectory_points=500),
        DigitsConfig(n_train=6000, n_val=2000, n_test=2000, epochs=12, batch_size=64, lr=1e-3, log_every=10),
        ConflictConfig(angles=(0.0, 45.0, 90.0, 135.0, 180.0), dim=16, hidden=4, n_train=2048, n_test=2048,
                       epochs=16, batch_size=128, lr=1e-2),
        TimingConfig(rounds=40, budget_s=15.0),
        False,
    ),
    "full": (
        5,
        ToyConfig(steps=100_000, pareto_weights=201, trajectory_points=1000),
        DigitsConfig(n_train=10_000, n_val=2000, n_test=2000, epochs=30, batch_size=64, lr=1e-3, log_every=10),
        ConflictConfig(angles=tuple(float(a) for a in range(0, 181, 15)), dim=16, hidden=4, n_train=2048,
                       n_test=2048, epochs=40, batch_size=128, lr=1e-2),
        TimingConfig(rounds=100, budget_s=60.0),
        True,
    ),
}


def default_seeds(preset: str) -> int:
    return _PRESETS[preset][0]


def configuration_name(preset: str, *, methods: tuple[str, ...], seeds: int, tradeoff: bool, device: str) -> str:
    """The results folder's name: the preset, then whatever differs from it (``quick``,
    ``default-sum+pcgrad``, ``default-5seeds-tradeoff``, ``full-cuda``)."""
    parts = [preset]
    if methods != METHODS:
        listed = "+".join(methods)
        parts.append(listed if len(listed) <= 48 else f"{len(methods)}methods-{hashlib.sha1(listed.encode()).hexdigest()[:8]}")
    if seeds != default_seeds(preset):
        parts.append(f"{seeds}seeds")
    if tradeoff and not _PRESETS[preset][5]:
        parts.append("tradeoff")
    if device != "cpu":
        parts.append(device.replace(":", ""))
    return "-".join(parts)


def make_config(
    preset: str, *, methods: list[str], seeds: int | None, out: Path, device: str, tradeoff: bool = False,
) -> StudyConfig:
    """The preset's settings with the command line's methods, seed count, device and ``--tradeoff``;
    ``out`` is the base folder, the results go to its subfolder named by :func:`configuration_name`."""
    n_default, toy, digits, conflict, timing, preset_tradeoff = _PRESETS[preset]
    n_seeds = n_default if seeds is None else seeds
    chosen = tuple(methods)
    with_tradeoff = tradeoff or preset_tradeoff
    name = configuration_name(preset, methods=chosen, seeds=n_seeds, tradeoff=with_tradeoff, device=device)
    return StudyConfig(
        preset=preset, methods=chosen, seeds=tuple(range(n_seeds)), out=out / name, device=device,
        toy=toy, digits=digits, conflict=conflict, timing=timing, tradeoff=with_tradeoff,
    )
