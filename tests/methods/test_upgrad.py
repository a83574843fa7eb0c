"""UPGrad against the projections written on the gradients (SciPy), and its defining properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.methods import _cone
from gradsurgery.methods.upgrad import check_upgrad_options, upgrad_weights

from ..helpers import KINDS, make_J
from ..test_no_sync import ForbidHostReads
from .oracle_cone import face_condition, project, project_slsqp, upgrad_vector

EPS = float(np.finfo(np.float64).eps)
# Sizes on both sides of the exact solve's limit, up to where only the interior point runs.
SIZES = [1, 2, 3, 5, 8, _cone.MAX_TASKS, _cone.MAX_TASKS + 1, 12, 20]


def update(J: torch.Tensor, **options) -> torch.Tensor:
    return upgrad_weights(J @ J.T, **options) @ J.double()


def tolerance(J: torch.Tensor, d: torch.Tensor, *, degenerate: bool = False) -> float:
    """How far rounding can move the update. The weights come from the Gram matrix, where the condition
    number of the active gradients is squared (a least-squares problem through its normal equations):
    ``ε·κ²`` per unit of the update's scale ``T·max‖g_t‖``, times ``T²`` for the operations that
    accumulate it (forming ``G``, the solve, the combination). Degenerate problems (more tasks than
    dimensions: an unbounded set of ``v``, where the exact finish may not apply) are held to the interior
    point's own accuracy instead, ``√ε`` relative."""
    T = J.shape[0]
    scale = T * float(J.double().norm(dim=1).max())
    if degenerate:
        return np.sqrt(EPS) * scale
    return T * T * EPS * face_condition(J, d) ** 2 * scale + 1e-300


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_matches_the_projections_of_the_gradients(T: int, kind: str) -> None:
    J = make_J(kind, T, 3 * T + 7, seed=T)
    expected = upgrad_vector(J)
    assert (update(J) - expected).norm() <= tolerance(J, expected)


@pytest.mark.parametrize("T", [3, 5, 8, 12, 20])
@pytest.mark.parametrize("P", [1, 2, "T/2"])
@pytest.mark.parametrize("kind", ["conflicting", "zero_row"])
def test_more_tasks_than_dimensions(T: int, P: int | str, kind: str) -> None:
    P = T // 2 if P == "T/2" else P
    J = make_J(kind, T, P, seed=P)
    expected = upgrad_vector(J)
    d = update(J)
    degenerate = T > _cone.MAX_TASKS
    assert (d - expected).norm() <= tolerance(J, expected, degenerate=degenerate)


def test_the_oracle_agrees_with_the_definition() -> None:
    # NNLS through Moreau's decomposition vs. the projection's definition solved directly.
    J = make_J("conflicting", 6, 9, seed=3)
    for i in range(6):
        assert torch.allclose(project(J, J[i]), project_slsqp(J, J[i]), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(T=st.integers(1, 14), kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000))
def test_the_update_conflicts_with_no_task(dtype: torch.dtype, T: int, kind: str, seed: int) -> None:
    J = make_J(kind, T, 40, dtype=dtype, seed=seed)
    w = upgrad_weights(J @ J.T)
    J = J.double()
    norms = J.norm(dim=1)
    d = w @ J
    # g_tᵀd ≥ 0 up to rounding in J's dtype: the weights are exact for the Gram matrix rounded in that
    # dtype, and d = Σ w_s g_s cancels terms as large as |w_s|·|g_s| (d ≈ 0 when the cone is a line).
    slack = 10 * T * torch.finfo(dtype).eps * norms * (w.abs() @ norms)
    assert ((J @ d) >= -slack).all()


@given(T=st.integers(1, 14), seed=st.integers(0, 10_000))
def test_gradients_that_conflict_with_no_task_are_summed_exactly(T: int, seed: int) -> None:
    # Non-negative coordinates: every inner product is ≥ 0, so every gradient is its own projection.
    J = torch.rand(T, 17, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    J[seed % T] = 0  # and a zero gradient conflicts with nothing either
    assert torch.equal(upgrad_weights(J @ J.T), torch.ones(T, dtype=torch.float64))


@given(T=st.integers(2, 14), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-30, 1e-8, 3.0, 1e8, 1e30]))
def test_weights_are_invariant_to_the_scale_of_the_gradients(T: int, seed: int, scale: float) -> None:
    J = make_J("conflicting", T, 3 * T, seed=seed)
    G = J @ J.T
    w = upgrad_weights(G)
    # s²G differs from G by one rounding per entry; the weights follow to within the face's conditioning.
    assert torch.allclose(upgrad_weights(G * scale**2), w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


@given(T=st.integers(2, 14), seed=st.integers(0, 10_000), kind=st.sampled_from(["conflicting", "agreeing"]))
def test_weights_permute_with_the_tasks(T: int, seed: int, kind: str) -> None:
    # Linearly independent gradients: v* is unique, so the weights (not only the update) permute.
    J = make_J(kind, T, 3 * T, seed=seed)
    G = J @ J.T
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = upgrad_weights(G)
    assert torch.allclose(upgrad_weights(G[perm][:, perm]), w[perm], rtol=1e-9, atol=1e-9 * float(w.abs().max()))


def test_one_task_is_its_gradient_and_two_tasks_match_the_general_solver() -> None:
    J = make_J("conflicting", 1, 5)
    assert torch.equal(upgrad_weights(J @ J.T), torch.ones(1, dtype=torch.float64))
    for kind in KINDS:
        J = make_J(kind, 2, 11, seed=7)
        G = (J @ J.T) / (J @ J.T).diagonal().max()
        general = 2 * _cone.project(G, torch.eye(2, dtype=torch.float64)).mean(dim=0)
        assert torch.allclose(upgrad_weights(J @ J.T), general, rtol=1e-12, atol=1e-12)


def test_the_preference_weights_the_projections() -> None:
    J = make_J("conflicting", 6, 20, seed=1)
    pref = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.25, 0.0], dtype=torch.float64)
    expected = upgrad_vector(J, pref)
    d = update(J, pref_vector=pref)
    assert (d - expected).norm() <= tolerance(J, expected)
    # The uniform preference is the default, and "mean" gives TorchJD's scale.
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    assert torch.allclose(upgrad_weights(J @ J.T, pref_vector=uniform), upgrad_weights(J @ J.T), rtol=1e-15)
    assert torch.allclose(upgrad_weights(J @ J.T, reduction="mean"), upgrad_weights(J @ J.T) / 6, rtol=1e-15)
    # A sequence works like a tensor.
    assert torch.equal(upgrad_weights(J @ J.T, pref_vector=pref.tolist()), upgrad_weights(J @ J.T, pref_vector=pref))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pref_vector": [1.0, -1.0]}, "pref_vector"),
        ({"pref_vector": [1.0, float("nan")]}, "pref_vector"),
        ({"pref_vector": [[1.0, 1.0]]}, "pref_vector"),
        ({"pref_vector": []}, "pref_vector"),
        ({"pref_vector": "ab"}, "pref_vector"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
    ],
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_upgrad_options(**options)
    G = torch.eye(2, dtype=torch.float64)
    if "pref_vector" in options and isinstance(options["pref_vector"], list) and len(options["pref_vector"]) == 2:
        with pytest.raises(ValueError, match=match):
            upgrad_weights(G, **options)


def test_a_preference_of_the_wrong_length_or_a_bad_reduction_raises() -> None:
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(3,\)"):
        upgrad_weights(G, pref_vector=torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        upgrad_weights(G, reduction="avg")


def test_a_bad_preference_tensor_gives_nan_weights_without_reading_it() -> None:
    G = torch.eye(3, dtype=torch.float64)
    pref = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    with ForbidHostReads():
        w = upgrad_weights(G, pref_vector=pref)
    assert w.isnan().all()


def test_non_finite_gram_gives_nan_weights() -> None:
    for T in (2, 3, _cone.MAX_TASKS + 2):
        G = torch.eye(T, dtype=torch.float64)
        G[0, 1] = G[1, 0] = float("nan")
        assert upgrad_weights(G).isnan().all()


@pytest.mark.parametrize("T", [1, 2, 5, 12])
def test_all_zero_gradients_give_naive_summation(T: int) -> None:
    assert torch.equal(upgrad_weights(torch.zeros(T, T)), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_weights_do_not_read_values_back(T: int) -> None:
    J = make_J("conflicting", T, 20)
    G = J @ J.T
    pref = torch.rand(T, dtype=torch.float64)
    with ForbidHostReads():
        upgrad_weights(G)
        upgrad_weights(G, pref_vector=pref, max_iter=3)


@pytest.mark.parametrize("T", [12, 24, 40, 64])
@pytest.mark.parametrize("kind", ["conflicting", "agreeing", "zero_row", "rank_deficient", "antiparallel"])
def test_the_interior_point_is_finished_to_rounding(T: int, kind: str) -> None:
    # Certificate of each projection: the natural residual ‖min(μ, g)‖ of v* (0 exactly at the
    # minimiser), at rounding: T units of it times the conditioning of the scaled Gram on the face.
    J = make_J(kind, T, 2 * T + 11, seed=T)
    G = J @ J.T
    Gn = G / G.diagonal().max()
    U = torch.eye(T, dtype=torch.float64)
    V = _cone.project(Gn, U)
    residual = _cone.natural_residual(Gn, U, V)
    d = V @ J
    kappa = max(face_condition(J, d[i]) for i in range(T))
    assert residual.max() <= T * EPS * kappa**2 * 10
    # The objective vᵀGv = ‖π(g_i)‖² is never worse than SciPy's projection.
    ours = (d * d).sum(dim=1)
    for i in range(0, T, max(1, T // 6)):
        reference = project(J, J[i]).pow(2).sum()
        assert ours[i] <= reference + 10 * T * EPS * kappa**2 * J[i].pow(2).sum()
