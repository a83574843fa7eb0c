"""The study's settings: three presets (``--quick``, default, ``--full``) and the command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .conflict import ConflictConfig
from .multidigits import DigitsConfig
from .toy import ToyConfig


@dataclass(frozen=True)
class StudyConfig:
    preset: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path
    device: str
    toy: ToyConfig
    digits: DigitsConfig
    conflict: ConflictConfig


# Sized to each preset's wall-clock budget on 2 CPU cores. The toy's 2-parameter steps cost ~2 ms of
# Python overhead each and run in a second process beside the other two studies, so the default run
# (about 4 minutes on an idle machine; 2.8 minutes with 10,000 toy steps and 9/12 epochs) affords
# 15,000 of the paper's 100,000 steps per trajectory; only --full runs all 100,000.
_PRESETS: dict[str, tuple[int, ToyConfig, DigitsConfig, ConflictConfig]] = {
    "quick": (
        2,
        ToyConfig(steps=300, pareto_weights=21, trajectory_points=100),
        DigitsConfig(n_train=600, n_val=200, n_test=200, epochs=2, batch_size=100, lr=1e-3, log_every=2),
        ConflictConfig(angles=(0.0, 90.0, 180.0), dim=16, hidden=4, n_train=512, n_test=512, epochs=3,
                       batch_size=128, lr=1e-2),
    ),
    "default": (
        3,
        ToyConfig(steps=15_000, pareto_weights=101, trajectory_points=500),
        DigitsConfig(n_train=6000, n_val=2000, n_test=2000, epochs=12, batch_size=64, lr=1e-3, log_every=10),
        ConflictConfig(angles=(0.0, 45.0, 90.0, 135.0, 180.0), dim=16, hidden=4, n_train=2048, n_test=2048,
                       epochs=16, batch_size=128, lr=1e-2),
    ),
    "full": (
        5,
        ToyConfig(steps=100_000, pareto_weights=201, trajectory_points=1000),
        DigitsConfig(n_train=10_000, n_val=2000, n_test=2000, epochs=30, batch_size=64, lr=1e-3, log_every=10),
        ConflictConfig(angles=tuple(float(a) for a in range(0, 181, 15)), dim=16, hidden=4, n_train=2048,
                       n_test=2048, epochs=40, batch_size=128, lr=1e-2),
    ),
}


def make_config(preset: str, *, methods: list[str], seeds: int | None, out: Path, device: str) -> StudyConfig:
    """The preset's settings with the command line's methods, seed count, output folder and device."""
    default_seeds, toy, digits, conflict = _PRESETS[preset]
    n_seeds = default_seeds if seeds is None else seeds
    return StudyConfig(
        preset=preset, methods=tuple(methods), seeds=tuple(range(n_seeds)), out=out, device=device,
        toy=toy, digits=digits, conflict=conflict,
    )
