"""MultiDigits: a MultiMNIST-style two-task data set from scikit-learn's bundled 8×8 digits.

Each example overlays two digits on one ``12 × 12`` canvas, MultiMNIST-style (Sabour et al., 2017;
Sener & Koltun, 2018): the left digit near the top-left corner, the right digit near the bottom-right,
each jittered, combined by a pixel-wise maximum so the strokes overlap. Task 1 reads the left digit,
task 2 the right one. The 1797 source images are split into disjoint train/validation/test pools
first (stratified by class), and pairs are drawn within a pool, so no source digit is shared between
splits. Everything comes from ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no
download) and one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CANVAS = 12
DIGIT = 8
# Top-left corner offsets (row, col), each drawn uniformly from its range: the digits overlap by
# 4–6 pixels in each direction (out of 8).
LEFT_OFFSETS = (0, 1)
RIGHT_OFFSETS = (3, 4)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 1, CANVAS, CANVAS) float32 in [0, 1]
    labels: torch.Tensor  # (N, 2) int64: (left digit, right digit)
    sources: torch.Tensor  # (N, 2) int64: indices of the two digits in load_digits()
    offsets: torch.Tensor  # (N, 2, 2) int64: (row, col) of each digit's top-left corner


@dataclass(frozen=True)
class MultiDigits:
    train: Split
    val: Split
    test: Split
    seed: int


def _pool_split(targets: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Class-stratified disjoint pools of source indices, in SPLIT_FRACTIONS proportions."""
    pools: list[list[int]] = [[], [], []]
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(targets == digit))
        cut1 = round(len(members) * SPLIT_FRACTIONS[0])
        cut2 = cut1 + round(len(members) * SPLIT_FRACTIONS[1])
        for pool, part in zip(pools, (members[:cut1], members[cut1:cut2], members[cut2:])):
            pool.extend(part.tolist())
    return [np.sort(np.array(pool, dtype=np.int64)) for pool in pools]


def _compose(digits: np.ndarray, targets: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> Split:
    left = rng.choice(pool, size=n)
    right = rng.choice(pool, size=n)
    # Two copies of one image would make the tasks trivially identical for that example.
    clash = left == right
    while clash.any():
        right[clash] = rng.choice(pool, size=int(clash.sum()))
        clash = left == right
    offsets_left = rng.integers(LEFT_OFFSETS[0], LEFT_OFFSETS[1] + 1, size=(n, 2))
    offsets_right = rng.integers(RIGHT_OFFSETS[0], RIGHT_OFFSETS[1] + 1, size=(n, 2))
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    layer = np.zeros_like(canvas)
    for k in range(n):
        r, c = offsets_left[k]
        canvas[k, r : r + DIGIT, c : c + DIGIT] = digits[left[k]]
        r, c = offsets_right[k]
        layer[k, r : r + DIGIT, c : c + DIGIT] = digits[right[k]]
    images = np.maximum(canvas, layer)
    return Split(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(np.stack([targets[left], targets[right]], axis=1)),
        sources=torch.from_numpy(np.stack([left, right], axis=1)),
        offsets=torch.from_numpy(np.stack([offsets_left, offsets_right], axis=1)).long(),
    )


def build_multidigits(*, seed: int, n_train: int, n_val: int, n_test: int) -> MultiDigits:
    """The MultiDigits splits for ``seed`` (same seed, same tensors)."""
    from sklearn.datasets import load_digits

    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs at least one example, got {(n_train, n_val, n_test)}")
    bunch = load_digits()
    digits = (bunch.images / 16.0).astype(np.float32)
    targets = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    pools = _pool_split(targets, rng)
    train, val, test = (
        _compose(digits, targets, pool, n, rng) for pool, n in zip(pools, (n_train, n_val, n_test))
    )
    return MultiDigits(train=train, val=val, test=test, seed=seed)
