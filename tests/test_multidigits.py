"""The MultiDigits data set and study pieces (bench/study/digits_data.py, bench/study/multidigits.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from bench.study.digits_data import CANVAS, DIGIT, MultiDigits, build_multidigits  # noqa: E402
from bench.study.multidigits import (  # noqa: E402
    FOUR,
    TASKS,
    DigitsConfig,
    delta_m,
    make_net,
    run_method,
    summarize,
    table_rows,
    task_targets,
)

SIZES = {"n_train": 300, "n_val": 120, "n_test": 100}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> MultiDigits:
    return build_multidigits(seed=3, **SIZES)


def _layers(split_images: torch.Tensor, sources: torch.Tensor, offsets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0
    n = len(split_images)
    layers = np.zeros((2, n, CANVAS, CANVAS))
    for k in range(n):
        for side in range(2):
            r, c = offsets[k, side].tolist()
            layers[side, k, r : r + DIGIT, c : c + DIGIT] = digits[sources[k, side]]
    return layers[0], layers[1]


def test_shapes_and_dtypes(data: MultiDigits) -> None:
    for split, n in ((data.train, SIZES["n_train"]), (data.val, SIZES["n_val"]), (data.test, SIZES["n_test"])):
        assert split.images.shape == (n, 1, CANVAS, CANVAS)
        assert split.images.dtype == torch.float32
        assert split.labels.shape == (n, 2) and split.labels.dtype == torch.int64
        assert split.sources.shape == (n, 2)
        assert split.offsets.shape == (n, 2, 2)
        assert split.images.min() >= 0 and split.images.max() <= 1


def test_labels_are_digits_and_match_the_sources(data: MultiDigits) -> None:
    from sklearn.datasets import load_digits

    targets = torch.from_numpy(load_digits().target)
    for split in (data.train, data.val, data.test):
        assert split.labels.min() >= 0 and split.labels.max() <= 9
        assert torch.equal(split.labels, targets[split.sources])
    assert set(data.train.labels[:, 0].tolist()) == set(range(10))
    assert set(data.train.labels[:, 1].tolist()) == set(range(10))


def test_image_is_the_pixelwise_max_of_the_two_digits(data: MultiDigits) -> None:
    left, right = _layers(data.val.images, data.val.sources, data.val.offsets)
    assert np.allclose(data.val.images[:, 0].numpy(), np.maximum(left, right), atol=1e-7)


def test_the_digits_overlap(data: MultiDigits) -> None:
    offsets = data.train.offsets
    # Bounding boxes: the right digit starts 2-4 pixels after the left one in both directions.
    shift = offsets[:, 1] - offsets[:, 0]
    assert shift.min() >= 2 and shift.max() <= 4
    # And the ink: most examples have pixels where both digits have strokes.
    left, right = _layers(data.train.images, data.train.sources, data.train.offsets)
    shared_ink = ((left > 0.25) & (right > 0.25)).sum(axis=(1, 2))
    assert (shared_ink > 0).mean() > 0.5


def test_same_seed_same_data_other_seed_other_data(data: MultiDigits) -> None:
    again = build_multidigits(seed=3, **SIZES)
    for a, b in ((data.train, again.train), (data.val, again.val), (data.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = build_multidigits(seed=4, **SIZES)
    assert not torch.equal(data.train.sources, other.train.sources)


def test_splits_share_no_source_digit(data: MultiDigits) -> None:
    pools = [set(split.sources.flatten().tolist()) for split in (data.train, data.val, data.test)]
    assert not pools[0] & pools[1]
    assert not pools[0] & pools[2]
    assert not pools[1] & pools[2]


def test_an_example_never_pairs_a_digit_with_itself(data: MultiDigits) -> None:
    for split in (data.train, data.val, data.test):
        assert (split.sources[:, 0] != split.sources[:, 1]).all()


@pytest.mark.parametrize("sizes", [(0, 10, 10), (10, 0, 10), (10, 10, -1)])
def test_empty_split_is_rejected(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_multidigits(seed=0, n_train=sizes[0], n_val=sizes[1], n_test=sizes[2])


def test_net_shapes() -> None:
    z, outputs = make_net(2)(torch.zeros(5, 1, CANVAS, CANVAS))
    assert z.shape == (5, 64)
    assert [o.shape for o in outputs] == [(5, 10), (5, 10)]


def test_delta_m_sign_convention() -> None:
    assert delta_m([0.9, 0.8], [0.9, 0.8]) == 0.0
    # Better than single-task on accuracy (higher is better) gives a negative Δm.
    assert delta_m([0.99, 0.88], [0.9, 0.8]) == pytest.approx(-10.0)
    assert delta_m([0.81, 0.8], [0.9, 0.8]) == pytest.approx(5.0)


@pytest.mark.parametrize("method", ["stl", "pcgrad", "mgda-ub"])
def test_one_epoch_of_a_method(data: MultiDigits, method: str) -> None:
    cfg = DigitsConfig(n_train=300, n_val=120, n_test=100, epochs=1, batch_size=100, lr=1e-3, log_every=1)
    ticks: list[int] = []
    result = run_method(method, data, cfg, seed=0, device=torch.device("cpu"), tick=ticks.append)
    assert sum(ticks) == (2 if method == "stl" else 1) * 3
    assert len(result["test_acc"]) == 2 and all(0 <= a <= 1 for a in result["test_acc"])
    assert result["median_step_ms"] > 0
    if method != "stl":
        history = result["diagnostics"]["history"]
        assert len(history) == 3 and {"norms", "cosine", "conflicts", "weights"} <= set(history[0])


def test_summary_means_and_delta_m() -> None:
    runs = {
        "stl": {"0": {"test_acc": [0.8, 0.6]}, "1": {"test_acc": [0.8, 0.6]}},
        "sum": {"0": {"test_acc": [0.88, 0.6]}, "1": {"test_acc": [0.72, 0.6]}},
        "mgda": {"0": {"test_acc": [0.8, 0.66]}, "1": {"test_acc": [0.8, 0.66]}},
    }
    timing = {"sum": {"median_ms": 2.0, "ratio_to_sum": 1.0}, "mgda": {"median_ms": 3.0, "ratio_to_sum": 1.5}}
    summary = summarize(runs, ("left", "right"), timing)
    assert summary["sum"]["test_left_mean"] == pytest.approx(80.0)
    assert summary["sum"]["test_left_std"] == pytest.approx(np.std([88.0, 72.0], ddof=1))
    assert summary["sum"]["delta_m_mean"] == pytest.approx(0.0, abs=1e-12)
    assert summary["mgda"]["delta_m_mean"] == pytest.approx(-5.0)
    assert summary["mgda"]["delta_m_per_seed"] == pytest.approx([-5.0, -5.0])
    # The ratio comes from the interleaved timing, not from the training runs.
    assert summary["mgda"]["step_ratio_to_sum"] == 1.5 and summary["mgda"]["step_ms"] == 3.0
    assert summary["stl"]["step_ratio_to_sum"] is None
    assert summarize(runs, ("left", "right"))["mgda"]["step_ratio_to_sum"] is None


def test_four_task_targets() -> None:
    labels = torch.tensor([[3, 7], [9, 2], [4, 4], [0, 9], [5, 5]])
    y = task_targets(labels, FOUR.tasks)
    assert FOUR.tasks == ("left", "right", "carry", "greater")
    assert y.tolist() == [[3, 7, 1, 0], [9, 2, 1, 1], [4, 4, 0, 0], [0, 9, 0, 0], [5, 5, 1, 0]]
    assert [TASKS[t].classes for t in FOUR.tasks] == [10, 10, 2, 2]
    assert task_targets(labels, ("right", "left")).tolist() == labels.flip(1).tolist()


def test_four_task_targets_on_the_data_are_balanced(data: MultiDigits) -> None:
    y = task_targets(data.train.labels, FOUR.tasks)
    # P(l + r ≥ 10) = 0.55 and P(l > r) = 0.45 for independent uniform digits: neither task is
    # solved by predicting one class.
    for column in (2, 3):
        assert 0.3 < y[:, column].float().mean().item() < 0.7
    assert torch.equal(y[:, 2], (data.train.labels.sum(1) >= 10).long())


def test_net_heads_follow_the_tasks_classes() -> None:
    z, outputs = make_net([TASKS[t].classes for t in FOUR.tasks])(torch.zeros(3, 1, CANVAS, CANVAS))
    assert [o.shape for o in outputs] == [(3, 10), (3, 10), (3, 2), (3, 2)]


@pytest.mark.parametrize("method", ["stl", "mgda", "pcgrad@2", "uw"])
def test_one_epoch_with_four_tasks(data: MultiDigits, method: str) -> None:
    cfg = DigitsConfig(n_train=300, n_val=120, n_test=100, epochs=1, batch_size=100, lr=1e-3, log_every=1)
    result = run_method(method, data, cfg, seed=0, device=torch.device("cpu"), tasks=FOUR.tasks)
    assert len(result["test_acc"]) == 4 and all(0 <= a <= 1 for a in result["test_acc"])
    if method not in ("stl", "uw"):
        history = result["diagnostics"]["history"]
        assert len(history) == 3 and np.asarray(history[0]["cosine"]).shape == (4, 4)


def test_table_rows_for_four_tasks() -> None:
    row = {f"test_{t}_{s}": 50.0 for t in FOUR.tasks for s in ("mean", "std")}
    summary = {
        "stl": {**row, "step_ratio_to_sum": None, "step_ms": None},
        "sum": {**row, "delta_m_mean": 1.0, "delta_m_std": 0.5, "step_ratio_to_sum": 1.0, "step_ms": 2.0},
        "mgda@4": {**row, "test_carry_mean": 60.0, "delta_m_mean": -2.0, "delta_m_std": 0.5, "step_ratio_to_sum": 0.8,
                   "step_ratio_quartiles": [0.75, 0.9], "step_ms": 1.6},
    }
    rows, bold = table_rows(summary, FOUR.tasks)
    assert [r[0] for r in rows] == ["Single-task", "Sum", "MGDA (every 4)"]
    assert rows[2][5] == "−2.00 ± 0.50" and rows[2][6] == "0.80× (0.75–0.90)" and rows[1][6] == "1.00×"
    assert (2, 3) in bold and (2, 5) in bold
