"""gradsurgery.diagnostics (Gram → norms, cosines, conflicts) and the plots drawn from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradsurgery.diagnostics import gram_diagnostics, to_floats

# float64 Gram matrices of exactly representable vectors: cosines are exact up to one sqrt rounding.
TOL = 1e-12


def _diag_of(rows: list[list[float]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    J = torch.tensor(rows, dtype=torch.float64)
    w = torch.ones(len(rows), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return gram_diagnostics(J @ J.T, w)


@pytest.mark.parametrize(
    ("rows", "expected_cos", "expected_conflicts"),
    [
        pytest.param([[1.0, 2.0, 2.0], [2.0, 4.0, 4.0]], 1.0, 0, id="parallel"),
        pytest.param([[1.0, 2.0, 2.0], [-3.0, -6.0, -6.0]], -1.0, 1, id="antiparallel"),
        pytest.param([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]], 0.0, 0, id="orthogonal"),
        pytest.param([[3.0, 4.0, 0.0], [4.0, 3.0, 0.0]], 24.0 / 25.0, 0, id="acute"),
        pytest.param([[3.0, 4.0, 0.0], [-4.0, -3.0, 0.0]], -24.0 / 25.0, 1, id="obtuse"),
    ],
)
def test_cosine_and_conflicts_of_two_gradients(rows: list[list[float]], expected_cos: float, expected_conflicts: int) -> None:
    diag = _diag_of(rows)
    assert diag["cosine"][0, 1].item() == pytest.approx(expected_cos, abs=TOL)
    assert diag["cosine"][1, 0].item() == pytest.approx(expected_cos, abs=TOL)
    assert torch.allclose(diag["cosine"].diagonal(), torch.ones(2, dtype=torch.float64), atol=TOL)
    assert int(diag["conflicts"]) == expected_conflicts


def test_norms_are_the_gradient_norms() -> None:
    rows = [[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 2.0, 2.0]]
    diag = _diag_of(rows)
    assert torch.allclose(diag["norms"], torch.tensor([5.0, 2.0, 3.0], dtype=torch.float64), atol=TOL)


def test_zero_gradient_has_zero_cosine_and_no_conflict() -> None:
    diag = _diag_of([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 2.0, -0.5]])
    cos = diag["cosine"]
    assert torch.isfinite(cos).all()
    assert torch.equal(cos[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(cos[:, 1], torch.zeros(3, dtype=torch.float64))
    assert diag["norms"][1].item() == 0.0
    assert int(diag["conflicts"]) == 1  # only the (0, 2) pair


def test_all_zero_gradients() -> None:
    diag = gram_diagnostics(torch.zeros(3, 3), torch.zeros(3))
    assert torch.equal(diag["cosine"], torch.zeros(3, 3))
    assert torch.equal(diag["norms"], torch.zeros(3))
    assert int(diag["conflicts"]) == 0


@pytest.mark.parametrize("T", [2, 3, 5, 7])
def test_conflict_count_matches_brute_force(T: int) -> None:
    J = torch.randn(T, 11, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    G = J @ J.T
    expected = sum(1 for i in range(T) for j in range(i + 1, T) if G[i, j] < 0)
    diag = gram_diagnostics(G, torch.ones(T, dtype=torch.float64))
    assert int(diag["conflicts"]) == expected
    expected_cos = torch.nn.functional.cosine_similarity(J[:, None, :], J[None, :, :], dim=-1)
    assert torch.allclose(diag["cosine"], expected_cos, atol=1e-12)
    assert torch.allclose(diag["cosine"], diag["cosine"].T)


def test_weights_pass_through_detached() -> None:
    w = torch.tensor([0.25, 1.75], requires_grad=True)
    diag = gram_diagnostics(torch.eye(2), w)
    assert not diag["weights"].requires_grad
    assert torch.equal(diag["weights"], w.detach())


def test_half_precision_gram_is_handled_in_float32() -> None:
    G = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float16)
    diag = gram_diagnostics(G, torch.ones(2, dtype=torch.float16))
    assert diag["cosine"].dtype == torch.float32
    assert diag["cosine"][0, 1].item() == pytest.approx(-1.0, abs=1e-6)


def test_outputs_stay_tensors_on_the_gram_device() -> None:
    diag = _diag_of([[1.0, 0.0], [-1.0, 1.0]])
    assert set(diag) == {"norms", "cosine", "conflicts", "weights"}
    for value in diag.values():
        assert isinstance(value, torch.Tensor)
        assert value.device.type == "cpu"
    assert diag["conflicts"].dtype == torch.int64
    assert diag["conflicts"].dim() == 0


@pytest.mark.parametrize(
    ("G", "w"),
    [
        pytest.param(torch.ones(2, 3), torch.ones(2), id="non-square"),
        pytest.param(torch.ones(4), torch.ones(2), id="1-d"),
        pytest.param(torch.eye(3), torch.ones(2), id="weights-length"),
    ],
)
def test_bad_shapes_raise(G: torch.Tensor, w: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="shape"):
        gram_diagnostics(G, w)


def test_to_floats_gives_plain_python_values() -> None:
    floats = to_floats(_diag_of([[3.0, 4.0], [-3.0, -4.0]], weights=[0.5, 1.5]))
    assert floats["norms"] == [5.0, 5.0]
    assert floats["conflicts"] == 1 and isinstance(floats["conflicts"], int)
    assert floats["weights"] == [0.5, 1.5]
    cos = floats["cosine"]
    assert isinstance(cos, list) and all(isinstance(v, float) for row in cos for v in row)
    assert cos[0][1] == pytest.approx(-1.0, abs=TOL)
    assert all(isinstance(v, float) for v in floats["norms"])


def test_to_floats_of_empty_dict() -> None:
    assert to_floats({}) == {}


def test_plots_draw_on_given_axes() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gradsurgery.plot import plot_conflict_history, plot_cosine_heatmap

    diag = _diag_of([[1.0, 0.5, 0.0], [-1.0, 0.2, 0.3], [0.0, 1.0, -1.0]])
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert plot_cosine_heatmap(diag["cosine"], ax1, task_names=["a", "b", "c"]) is ax1
    assert [t.get_text() for t in ax1.get_yticklabels()] == ["a", "b", "c"]
    history = [to_floats(_diag_of([[1.0, 0.0], [math.cos(a), math.sin(a)]])) for a in (0.1, 2.0, 3.0, 0.5)]
    assert plot_conflict_history(history, ax2, window=2) is ax2
    rate = ax2.get_lines()[0].get_ydata()
    assert list(rate) == pytest.approx([0.0, 0.5, 1.0, 0.5])


def test_plot_rejects_mismatched_names() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gradsurgery.plot import plot_cosine_heatmap

    with pytest.raises(ValueError, match="task_names"):
        plot_cosine_heatmap(torch.eye(2), Figure().subplots(), task_names=["only one"])


@settings(max_examples=60, deadline=None)
@given(
    # Zero or |x| >= 1e-3, so that no product underflows when the gradients are rescaled.
    J=arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 9)),
             elements=st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))),
    scale=st.floats(1e-3, 1e3),
)
def test_diagnostics_properties(J: np.ndarray, scale: float) -> None:
    G = torch.from_numpy(J @ J.T)
    T = G.shape[0]
    diag = gram_diagnostics(G, torch.ones(T, dtype=torch.float64))
    cos = diag["cosine"]
    assert torch.isfinite(cos).all()
    assert (cos.abs() <= 1).all()
    assert torch.equal(cos, cos.T)
    assert int(diag["conflicts"]) == sum(1 for i in range(T) for j in range(i + 1, T) if G[i, j] < 0)
    # Scaling every gradient by s > 0 scales the norms and leaves cosines and conflicts alone.
    scaled = gram_diagnostics(G * scale**2, torch.ones(T, dtype=torch.float64))
    assert torch.allclose(scaled["norms"], diag["norms"] * scale, rtol=1e-9, atol=0.0)
    assert torch.allclose(scaled["cosine"], cos, rtol=1e-9, atol=1e-9)
    assert int(scaled["conflicts"]) == int(diag["conflicts"])


def test_flat_diagnostics_have_stable_names_and_log_through_tensorboard_style_dicts() -> None:
    import gradsurgery as gs

    torch.manual_seed(0)
    trunk = torch.nn.Parameter(torch.randn(4))
    targets = torch.randn(3, 4)
    opt = gs.MGDA(torch.optim.SGD([trunk], lr=0.1))
    opt.backward([((trunk - t) ** 2).sum() for t in targets])
    flat = opt.diagnostics(flat=True)
    nested = opt.diagnostics()
    assert set(flat) == {"norm/0", "norm/1", "norm/2", "cos/0-1", "cos/0-2", "cos/1-2", "weight/0", "weight/1", "weight/2", "conflicts"}
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["cos/1-2"] == nested["cosine"][1][2] and flat["weight/2"] == nested["weights"][2]
    assert flat["conflicts"] == nested["conflicts"]


def test_pc_backward_is_backward() -> None:
    import gradsurgery as gs

    trunk = torch.nn.Parameter(torch.randn(4))
    opt = gs.PCGrad(torch.optim.SGD([trunk], lr=0.1), seed=0)
    opt.pc_backward([(trunk**2).sum(), (trunk - 1).sum()])
    assert trunk.grad is not None and gs.PCGrad.pc_backward is gs.GradSurgery.backward


def test_conflict_history_of_a_method_without_weights() -> None:
    """GradDrop's diagnostics have no weights: the conflict rate alone is drawn."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gradsurgery.plot import plot_conflict_history

    history = []
    for a in (0.1, 2.0):
        entry = to_floats(_diag_of([[1.0, 0.0], [math.cos(a), math.sin(a)]]))
        entry.pop("weights")
        history.append(entry)
    ax = Figure().subplots()
    assert plot_conflict_history(history, ax, window=1) is ax
    assert list(ax.get_lines()[0].get_ydata()) == [0.0, 1.0] and len(ax.get_lines()) == 1


def test_block_conflicts_plot_has_a_row_per_block_and_a_cell_per_step() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    import gradsurgery as gs
    from gradsurgery.plot import plot_block_conflicts

    # A two-layer model whose tasks agree on the first layer and conflict on the second.
    torch.manual_seed(0)
    first, second = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = gs.Sum(torch.optim.SGD([first, second], lr=0.0), granularity="parameter")
    history = []
    for _ in range(4):
        opt.zero_grad()
        opt.backward([first.sum() + second.sum(), first.sum() - second.sum()])
        history.append(opt.diagnostics())
    ax = Figure().subplots()
    assert plot_block_conflicts(history, ax, block_names=["first", "second"], window=2) is ax
    rates = ax.collections[0].get_array().reshape(2, 4)
    assert rates.tolist() == [[0.0] * 4, [1.0] * 4]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second"]


@pytest.mark.parametrize(
    ("history", "kwargs", "match"),
    [
        pytest.param([], {}, "empty", id="empty"),
        pytest.param([{"conflicts": 0, "norms": [1.0, 1.0]}], {}, "granularity=", id="no-blocks"),
        pytest.param([{"blocks": [{"conflicts": 0, "norms": [1.0]}]}] * 2, {"block_names": ["a", "b"]}, "block_names", id="names"),
        pytest.param(
            [{"blocks": [{"conflicts": 0, "norms": [1.0]}]}, {"blocks": []}], {}, "different numbers of blocks", id="ragged"
        ),
        pytest.param([{"blocks": [{"conflicts": 0, "norms": [1.0]}]}], {"window": 0}, "window", id="window"),
    ],
)
def test_block_conflicts_plot_refuses_bad_history(history: list, kwargs: dict, match: str) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from gradsurgery.plot import plot_block_conflicts

    with pytest.raises(ValueError, match=match):
        plot_block_conflicts(history, Figure().subplots(), **kwargs)
