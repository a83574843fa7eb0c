"""DualProj against the projection written on the gradients (SciPy), and its defining properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.methods import _cone
from gradsurgery.methods.dualproj import check_dualproj_options, dualproj_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads
from .oracle_cone import dualproj_vector, project
from .test_upgrad import EPS, SIZES, tolerance


def update(J: torch.Tensor, **options) -> torch.Tensor:
    return dualproj_weights(J @ J.T, **options) @ J.double()


@pytest.mark.parametrize("T", SIZES + [32])
@pytest.mark.parametrize("kind", KINDS)
def test_dualproj_matches_the_projection_of_the_mean(T: int, kind: str) -> None:
    J = make_J(kind, T, 3 * T + 7, seed=T)
    expected = dualproj_vector(J)
    assert (update(J) - expected).norm() <= tolerance(J, expected)


@pytest.mark.parametrize("T", [3, 5, 8, 12, 20])
@pytest.mark.parametrize("P", [1, 2, "T/2"])
@pytest.mark.parametrize("kind", ["conflicting", "zero_row"])
def test_more_tasks_than_dimensions(T: int, P: int | str, kind: str) -> None:
    P = T // 2 if P == "T/2" else P
    J = make_J(kind, T, P, seed=P)
    expected = dualproj_vector(J)
    assert (update(J) - expected).norm() <= tolerance(J, expected, degenerate=T > _cone.MAX_TASKS)


def test_the_preference_weights_the_mean() -> None:
    J = make_J("conflicting", 7, 30, seed=2)
    pref = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.25, 0.0, 3.0], dtype=torch.float64)
    expected = dualproj_vector(J, pref)
    assert (update(J, pref_vector=pref) - expected).norm() <= tolerance(J, expected)
    assert torch.allclose(dualproj_weights(J @ J.T, reduction="mean"), dualproj_weights(J @ J.T) / 7, rtol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(T=st.integers(1, 14), kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000))
def test_the_update_conflicts_with_no_task(dtype: torch.dtype, T: int, kind: str, seed: int) -> None:
    J = make_J(kind, T, 40, dtype=dtype, seed=seed)
    w = dualproj_weights(J @ J.T)
    J = J.double()
    norms = J.norm(dim=1)
    slack = 10 * T * torch.finfo(dtype).eps * norms * (w.abs() @ norms)
    assert ((J @ (w @ J)) >= -slack).all()


@given(T=st.integers(1, 14), seed=st.integers(0, 10_000))
def test_a_mean_that_conflicts_with_no_task_is_summed_exactly(T: int, seed: int) -> None:
    J = torch.rand(T, 17, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(dualproj_weights(J @ J.T), torch.ones(T, dtype=torch.float64))


@given(T=st.integers(2, 14), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-30, 1e-8, 3.0, 1e8, 1e30]))
def test_weights_are_invariant_to_the_scale_of_the_gradients(T: int, seed: int, scale: float) -> None:
    J = make_J("conflicting", T, 3 * T, seed=seed)
    G = J @ J.T
    w = dualproj_weights(G)
    assert torch.allclose(dualproj_weights(G * scale**2), w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


@given(T=st.integers(2, 14), seed=st.integers(0, 10_000))
def test_weights_permute_with_the_tasks(T: int, seed: int) -> None:
    J = make_J("conflicting", T, 3 * T, seed=seed)
    G = J @ J.T
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = dualproj_weights(G)
    assert torch.allclose(dualproj_weights(G[perm][:, perm]), w[perm], rtol=1e-9, atol=1e-9 * float(w.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_two_tasks_match_the_general_solver(kind: str) -> None:
    J = make_J(kind, 2, 11, seed=7)
    G = J @ J.T
    for pref in (None, torch.tensor([0.3, 1.7], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)):
        p = torch.full((2,), 0.5, dtype=torch.float64) if pref is None else pref
        general = 2 * _cone.project(G, p[None])[0]
        assert torch.allclose(dualproj_weights(G, pref_vector=pref), general, rtol=1e-12, atol=1e-12)
        # and with a ridge (CAGrad's degenerate case uses it)
        ridged = _cone.project(G, p[None], ridge=1e-6)[0]
        assert torch.allclose(_cone.project_two(G, p, ridge=1e-6), ridged, rtol=1e-12, atol=1e-12)


def test_exactly_opposite_gradients_give_a_zero_update() -> None:
    g = make_J("conflicting", 1, 21)[0]
    for J in (torch.stack((g, -g)), torch.stack((g, -2 * g, 3 * g))):
        assert update(J).abs().max() <= 10 * EPS * g.abs().max() * len(J)


@pytest.mark.parametrize(
    ("options", "match"), [({"pref_vector": [1.0, -2.0]}, "pref_vector"), ({"max_iter": 0}, "max_iter")]
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_dualproj_options(**options)
    with pytest.raises(ValueError, match=match):
        dualproj_weights(torch.eye(2, dtype=torch.float64), **options)


def test_non_finite_gram_and_bad_preference_give_nan_weights() -> None:
    for T in (2, _cone.MAX_TASKS + 2):
        G = torch.eye(T, dtype=torch.float64)
        G[0, 0] = float("inf")
        assert dualproj_weights(G).isnan().all()
        pref = torch.ones(T, dtype=torch.float64)
        pref[1] = -1.0
        assert dualproj_weights(torch.eye(T), pref_vector=pref).isnan().all()


@pytest.mark.parametrize("T", [1, 2, 5, 12])
def test_all_zero_gradients_give_naive_summation(T: int) -> None:
    assert torch.equal(dualproj_weights(torch.zeros(T, T)), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_weights_do_not_read_values_back(T: int) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    pref = torch.rand(T, dtype=torch.float64)
    with ForbidHostReads():
        dualproj_weights(G)
        dualproj_weights(G, pref_vector=pref, max_iter=3)


@pytest.mark.parametrize("T", [12, 24, 40, 64])
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "zero_row", "rank_deficient", "antiparallel"])
def test_the_interior_point_is_finished_to_rounding(T: int, kind: str) -> None:
    from .oracle_cone import face_condition

    J = make_J(kind, T, 2 * T + 11, seed=T)
    G = J @ J.T
    Gn = G / G.diagonal().max()
    u = torch.ones(1, T, dtype=torch.float64)
    v = _cone.project(Gn, u)
    d = (v @ J)[0]
    kappa = face_condition(J, d)
    assert _cone.natural_residual(Gn, u, v).max() <= T * EPS * kappa**2 * 10
    reference = project(J, J.sum(dim=0))
    assert d.pow(2).sum() <= reference.pow(2).sum() + 10 * T * EPS * kappa**2 * J.sum(dim=0).pow(2).sum()
