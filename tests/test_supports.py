"""The exact small-T solver (every face of the simplex at once) against the interior point and SciPy,
and the exact finish of the interior point beyond it."""

from __future__ import annotations

import pytest
import torch

import gradsurgery.functional as F
from gradsurgery.methods import _supports, cagrad, mgda
from gradsurgery.methods._common import normalized
from gradsurgery.methods._simplex import frank_wolfe_gap

from .helpers import KINDS, make_J
from .reference import cagrad_min_scipy, min_norm_scipy

SIZES = [3, 4, 7, _supports.MAX_TASKS]


def _problem(kind: str, T: int, P: int = 40, seed: int = 0) -> torch.Tensor:
    J = make_J(kind, T, P, seed=seed)
    return normalized(J @ J.T)


def _cagrad_terms(G: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    T = G.shape[0]
    return G.sum(dim=1) / T, c * G.sum().clamp_min(0).sqrt() / T


def _cagrad_value(w: torch.Tensor, G: torch.Tensor, b: torch.Tensor, phi: torch.Tensor) -> float:
    return (w @ b + phi * (w @ G @ w).clamp_min(0).sqrt()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", SIZES)
def test_min_norm_is_exact(T: int, kind: str) -> None:
    G = _problem(kind, T, seed=T)
    w = _supports.min_norm(G)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-14
    # An exact solve: the KKT residual (Frank–Wolfe gap) is rounding, on a problem normalised to O(1).
    assert frank_wolfe_gap(w, 2 * G @ w) <= 1e-12
    interior = mgda._min_norm(G, 48)
    scipy = torch.as_tensor(min_norm_scipy(G.numpy()))
    assert w @ G @ w <= min(interior @ G @ interior, scipy @ G @ scipy) + 1e-15


@pytest.mark.parametrize("c", [0.1, 0.4, 2.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", SIZES)
def test_cagrad_dual_is_exact(T: int, kind: str, c: float) -> None:
    G = _problem(kind, T, seed=T)
    b, phi = _cagrad_terms(G, c)
    w = _supports.cagrad_dual(G, b, phi)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-14
    ours = _cagrad_value(w, G, b, phi)
    interior = _cagrad_value(cagrad._solve(G, b, phi, 48), G, b, phi)
    scipy = cagrad_min_scipy(G.numpy(), c)
    # Near the kink g_w = 0 an objective value is only as good as φ·sqrt(rounding of wᵀGw ≈ 1e-16)
    # (SciPy reports values below the true minimum there); elsewhere, rounding.
    assert ours <= min(interior, scipy) + 1e-12 * max(1.0, abs(scipy)) + 2e-8 * phi.item()
    norm = (w @ G @ w).sqrt()
    if norm > 1e-6:  # away from the kink the objective is smooth: its Frank–Wolfe gap certifies w
        assert frank_wolfe_gap(w, b + phi * (G @ w) / norm) <= 1e-11


def test_duplicate_and_more_tasks_than_parameters() -> None:
    J = make_J("conflicting", 6, 3, seed=5)  # rank 3: four of every five faces are singular
    J = torch.cat((J, J[:2]))  # and two tasks repeated
    G = normalized(J @ J.T)
    w = _supports.min_norm(G)
    assert frank_wolfe_gap(w, 2 * G @ w) <= 1e-12
    b, phi = _cagrad_terms(G, 0.4)
    w = _supports.cagrad_dual(G, b, phi)
    assert _cagrad_value(w, G, b, phi) <= cagrad_min_scipy(G.numpy(), 0.4) + 1e-12


def test_a_non_finite_gram_gives_nan_weights() -> None:
    G = _problem("conflicting", 4)
    G[1, 2] = G[2, 1] = float("nan")
    assert _supports.min_norm(G).isnan().all()
    b, phi = _cagrad_terms(G, 0.4)
    assert _supports.cagrad_dual(G, b, phi).isnan().all()


@pytest.mark.parametrize("T", [3, _supports.MAX_TASKS])
def test_methods_use_the_exact_solver_up_to_its_size(T: int) -> None:
    J = make_J("conflicting", T, 50, seed=1)
    G = normalized(J @ J.T)
    # To rounding (the methods symmetrise and rescale G again); the interior point differs by ~1e-11.
    torch.testing.assert_close(F.mgda_weights(G, reduction="mean"), _supports.min_norm(G), rtol=0, atol=1e-14)
    b, phi = _cagrad_terms(G, 0.4)
    w = _supports.cagrad_dual(G, b, phi)
    norm = (w @ G @ w).sqrt()
    expected = (1 + T * (phi / norm) * w) / 1.16
    torch.testing.assert_close(F.cagrad_weights(G), expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------- finishing the interior point (T > MAX_TASKS)


def test_polish_finishes_a_slow_interior_point() -> None:
    # Agreeing gradients at T = 64 where the 48-iteration barrier path lags: one weight shrinks like 1/t
    # from 1e-4 while the Frank–Wolfe gap stalls at ~2e-7. The support is clear from the weights.
    G = _problem("agreeing", 64, P=200, seed=1)
    raw = mgda._min_norm(G, 48)
    w = F.mgda_weights(G, reduction="mean")
    assert frank_wolfe_gap(w, 2 * G @ w) <= 1e-12 < frank_wolfe_gap(raw, 2 * G @ raw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [_supports.MAX_TASKS + 1, 32])
def test_methods_beyond_the_exact_solver_reach_rounding(T: int, kind: str) -> None:
    G = _problem(kind, T, P=100, seed=T)
    raw = mgda._min_norm(G, 48)
    w = F.mgda_weights(G, reduction="mean")
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-13
    # Rank-deficient gradients give the polish singular faces; the interior point's ~1e-9 then stands.
    assert frank_wolfe_gap(w, 2 * G @ w) <= (1e-9 if kind == "rank_deficient" else 1e-12)
    assert w @ G @ w <= raw @ G @ raw + 1e-15  # the objectives are compared in another summation order
    b, phi = _cagrad_terms(G, 0.4)
    w = _supports.polish_cagrad_dual(G, b, phi, cagrad._solve(G, b, phi, 48))
    assert _cagrad_value(w, G, b, phi) <= _cagrad_value(cagrad._solve(G, b, phi, 48), G, b, phi) + 1e-15
    norm = (w @ G @ w).sqrt()
    if norm > 1e-6 and kind != "rank_deficient":
        assert frank_wolfe_gap(w, b + phi * (G @ w) / norm) <= 1e-11


@pytest.mark.parametrize("start", ["uniform", "vertex", "random"])
def test_polish_never_loses_to_its_starting_point(start: str) -> None:
    T = 20
    G = _problem("conflicting", T, seed=3)
    w0 = {
        "uniform": torch.full((T,), 1.0 / T, dtype=torch.float64),
        "vertex": torch.eye(T, dtype=torch.float64)[4],
        "random": torch.rand(T, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 8,
    }[start]
    w0 = w0 / w0.sum()
    w = _supports.polish_min_norm(G, w0)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-13
    assert w @ G @ w <= w0 @ G @ w0 + 1e-15
    b, phi = _cagrad_terms(G, 0.4)
    w = _supports.polish_cagrad_dual(G, b, phi, w0)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-13
    assert _cagrad_value(w, G, b, phi) <= _cagrad_value(w0, G, b, phi) + 1e-15


def test_polish_of_a_non_finite_gram_is_nan() -> None:
    G = _problem("conflicting", 12)
    w0 = torch.full((12,), 1.0 / 12, dtype=torch.float64)
    G[1, 2] = G[2, 1] = float("nan")
    assert _supports.polish_min_norm(G, w0).isnan().all()
    b, phi = _cagrad_terms(G, 0.4)
    assert _supports.polish_cagrad_dual(G, b, phi, w0).isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_solves_on_cuda_match_the_cpu_without_a_host_sync() -> None:
    G = _problem("conflicting", 6)
    b, phi = _cagrad_terms(G, 0.4)
    G_cuda, b_cuda, phi_cuda = G.cuda(), b.cuda(), phi.cuda()
    _supports.min_norm(G_cuda)  # the first call copies the face tables to the device
    start = torch.full((6,), 1.0 / 6, dtype=torch.float64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = _supports.min_norm(G_cuda)
        w_dual = _supports.cagrad_dual(G_cuda, b_cuda, phi_cuda)
        _supports.polish_min_norm(G_cuda, start)
        _supports.polish_cagrad_dual(G_cuda, b_cuda, phi_cuda, start)
        mgda._min_norm(G_cuda, 3)  # the interior point, whose constants are built on the device too
        cagrad._solve(G_cuda, b_cuda, phi_cuda, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(w.cpu(), _supports.min_norm(G), rtol=0, atol=1e-12)
    torch.testing.assert_close(w_dual.cpu(), _supports.cagrad_dual(G, b, phi), rtol=0, atol=1e-12)
