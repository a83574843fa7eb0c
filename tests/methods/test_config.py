"""ConFIG against the paper's formula written on the gradients (NumPy pseudo-inverse of the unit
gradients), its two-task form, and its conflict-free guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery.functional as F
from gradsurgery.methods.config import LENGTHS, config_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads

EPS = float(np.finfo(np.float64).eps)


def config_vector(J: torch.Tensor, length: str = "projection") -> np.ndarray:
    """Liu et al. 2025 on the rows of ``J`` (fp64): ``x = pinv(Û)·1`` with the unit gradients as the rows
    of ``Û`` (a zero gradient gives a zero row, as the official code's ``nan_to_num``), ``x̂ = x/‖x‖`` and
    ``d = (Σ_t g_tᵀx̂)·x̂``, or ``τ·(Σ_t u_tᵀx̂)·x̂`` for the official ``Track*`` length models. ``d = 0``
    when ``Ûx`` (the projection of ``1`` onto the row space's image) is negligible: no direction has
    positive projections."""
    J = J.double().numpy()
    norms = np.linalg.norm(J, axis=1)
    present = norms > 0
    units = np.where(present[:, None], J / np.where(present, norms, 1.0)[:, None], 0.0)
    x = np.linalg.pinv(units) @ np.ones(J.shape[0])
    if np.linalg.norm(units @ x) <= 1e-6:
        return np.zeros(J.shape[1])
    unit_x = x / np.linalg.norm(x)
    if length == "projection":
        return (J @ unit_x).sum() * unit_x
    kept = norms[present]
    tau = {
        "min": kept.min(),
        "max": kept.max(),
        "arithmetic_mean": kept.mean(),
        "harmonic_mean": len(kept) / (1 / kept).sum(),
        "geometric_mean": np.exp(np.log(kept).mean()),
    }[length]
    return tau * (units @ unit_x).sum() * unit_x


def config_two_vector(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """The paper's two-gradient form (no pseudo-inverse): ``g_v = U[U(O(g_1, g_2)) + U(O(g_2, g_1))]``
    with ``O(a, b) = b − (aᵀb/‖a‖²)a``, ``d = (g_1ᵀg_v + g_2ᵀg_v)·g_v``."""

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    def orthogonal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return b - (a @ b) / (a @ a) * a

    v = unit(unit(orthogonal(g1, g2)) + unit(orthogonal(g2, g1)))
    return (g1 @ v + g2 @ v) * v


def _close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    scale = max(1.0, float(expected_t.abs().max()))
    assert float((actual.double() - expected_t).abs().max()) <= rtol * scale


def _kept_condition(J: torch.Tensor) -> float:
    """cond of the unit-gradient matrix on the directions the pseudo-inverse keeps, squared (the Gram's)."""
    units = J / J.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    S = torch.linalg.svdvals(units)
    kept = S[S > max(units.shape) * EPS * S[0]]
    return float((kept[0] / kept[-1]) ** 2) if len(kept) else 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("T", "P"), [(1, 17), (2, 17), (3, 17), (5, 17), (8, 17), (16, 40), (8, 5), (12, 4)])
def test_config_matches_the_paper_formula(kind: str, T: int, P: int) -> None:
    J = make_J(kind, T, P, seed=T)
    d = F.aggregate(J, config_weights, backend="torch")
    # Gram space solves with cond(C) = cond(Û)² where the pseudo-inverse of Û sees cond(Û).
    _close(d, config_vector(J), 64 * T * EPS * _kept_condition(J))


@pytest.mark.parametrize("length", LENGTHS[1:])
@pytest.mark.parametrize("kind", KINDS)
def test_config_track_lengths_match_the_official_models(length: str, kind: str) -> None:
    J = make_J(kind, 6, 17, seed=2) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)[:, None]
    d = F.aggregate(J, lambda G: config_weights(G, length=length), backend="torch")
    _close(d, config_vector(J, length), 64 * 6 * EPS * _kept_condition(J))


@pytest.mark.parametrize("seed", range(5))
def test_config_two_tasks_match_the_paper_two_gradient_form(seed: int) -> None:
    J = make_J("conflicting", 2, 9, seed=seed)
    d = F.aggregate(J, config_weights, backend="torch")
    _close(d, config_two_vector(J[0].numpy(), J[1].numpy()), 1e-12)


@given(T=st.integers(1, 8), seed=st.integers(0, 10_000), kind=st.sampled_from(["conflicting", "agreeing"]))
def test_config_is_conflict_free_with_equal_angles(T: int, seed: int, kind: str) -> None:
    # Linearly independent gradients: Ûx = 1, so d makes the same positive angle with every gradient.
    J = make_J(kind, T, 2 * T + 3, seed=seed)
    d = F.aggregate(J, config_weights, backend="torch")
    cosines = (J / J.norm(dim=1, keepdim=True)) @ d / d.norm()
    assert (cosines > 0).all()
    assert cosines.max() - cosines.min() <= 64 * T * EPS * _kept_condition(J) * cosines.max()


def test_config_can_conflict_when_gradients_are_dependent() -> None:
    # The guarantee needs linearly independent gradients: with more tasks than directions Ûx is only
    # the projection of 1 onto C's range, and a gradient can be left behind. Documented, not a bug.
    found = False
    for seed in range(20):
        J = make_J("conflicting", 6, 3, seed=seed)
        d = F.aggregate(J, config_weights, backend="torch")
        found |= bool(((J @ d) < -1e-9 * J.norm(dim=1) * d.norm()).any())
    assert found


def test_config_identical_gradients_give_the_sum() -> None:
    g = make_J("conflicting", 1, 13, seed=1)
    J = g.repeat(4, 1)
    _close(F.aggregate(J, config_weights, backend="torch"), (4 * g[0]).numpy(), 1e-14)


def test_config_opposite_gradients_give_a_zero_update() -> None:
    J = make_J("antiparallel", 4, 13, seed=1)  # two up, two down: no direction gains on all four
    assert torch.equal(config_weights(J @ J.T), torch.zeros(4, dtype=torch.float64))


def test_config_zero_gradients_do_not_count() -> None:
    J = make_J("conflicting", 5, 17, seed=2)
    J[[1, 3]] = 0
    w = config_weights(J @ J.T)
    assert torch.equal(w[[1, 3]], torch.zeros(2, dtype=torch.float64))
    _close(w[[0, 2, 4]], config_weights(J[[0, 2, 4]] @ J[[0, 2, 4]].T).numpy(), 1e-12)
    for length in LENGTHS:
        assert torch.equal(config_weights(torch.zeros(3, 3), length=length), torch.zeros(3, dtype=torch.float64))


@given(kind=st.sampled_from(KINDS), T=st.integers(1, 8), seed=st.integers(0, 1000), log_scale=st.floats(-20, 20))
def test_config_weights_are_invariant_to_the_scale_of_g(kind: str, T: int, seed: int, log_scale: float) -> None:
    # w(s·G) = w(G): the update is positively homogeneous.
    J = make_J(kind, T, 13, seed=seed)
    G = J @ J.T
    w = config_weights(G)
    scaled = config_weights(G * 10.0**log_scale)
    assert (scaled - w).abs().max() <= 1e-9 * max(1.0, float(w.abs().max()))


@given(kind=st.sampled_from(KINDS), T=st.integers(2, 8), seed=st.integers(0, 1000), length=st.sampled_from(LENGTHS))
def test_config_weights_follow_a_permutation_of_the_tasks(kind: str, T: int, seed: int, length: str) -> None:
    J = make_J(kind, T, 13, seed=seed)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = config_weights(J @ J.T, length=length)
    permuted = config_weights(J[order] @ J[order].T, length=length)
    assert (permuted - w[order]).abs().max() <= 1e-9 * max(1.0, float(w.abs().max()))


def test_config_mean_reduction_divides_by_t() -> None:
    J = make_J("conflicting", 5, 17)
    G = J @ J.T
    assert torch.equal(config_weights(G, reduction="mean"), config_weights(G) / 5)


def test_config_nan_gram_gives_nan_weights() -> None:
    G = torch.eye(3)
    G[2, 1] = float("nan")
    assert torch.isnan(config_weights(G)).all()


def test_config_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="length.*'sum'"):
        config_weights(torch.eye(2), length="sum")
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        config_weights(torch.eye(2), reduction="avg")


@pytest.mark.parametrize("T", [2, 3, 8, 12])
@pytest.mark.parametrize("length", ["projection", "geometric_mean"])
def test_config_does_not_read_values_back(T: int, length: str) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    with ForbidHostReads():
        config_weights(G, length=length)
