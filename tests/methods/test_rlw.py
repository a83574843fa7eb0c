"""RLW: weights T·softmax(z), z ~ N(0, I), drawn from the caller's generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from gradsurgery.methods.rlw import rlw_weights

from ..helpers import make_J
from ..test_no_sync import ForbidHostReads


def rlw_vector(T: int, seed: int) -> torch.Tensor:
    """Lin et al. 2022: λ = softmax(z) for z ~ N(0, I_T) (the float64 draw of a generator with this seed),
    written plainly, on the sum scale."""
    z = torch.randn(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    e = [math.exp(float(v)) for v in z]
    return torch.tensor([T * v / sum(e) for v in e], dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 32])
def test_rlw_is_t_times_the_softmax_of_a_normal_draw(T: int) -> None:
    w = rlw_weights(torch.eye(T), generator=torch.Generator().manual_seed(T))
    assert torch.allclose(w, rlw_vector(T, T), rtol=1e-15, atol=0)


@given(T=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_rlw_weights_are_positive_and_sum_to_t(T: int, seed: int) -> None:
    w = rlw_weights(torch.zeros(T, T), generator=torch.Generator().manual_seed(seed))
    assert w.dtype == torch.float64 and (w > 0).all()
    assert abs(float(w.sum()) - T) <= 4 * T * torch.finfo(torch.float64).eps * T
    mean = rlw_weights(torch.zeros(T, T), generator=torch.Generator().manual_seed(seed), reduction="mean")
    assert torch.allclose(mean, w / T, rtol=2 * torch.finfo(torch.float64).eps, atol=0)


def test_rlw_same_generator_state_gives_the_same_weights() -> None:
    J = make_J("conflicting", 6, 20)
    a = rlw_weights(J @ J.T, generator=torch.Generator().manual_seed(3))
    # Other gradients (or none: G's values are never read), same state: the same weights.
    b = rlw_weights(torch.full((6, 6), float("nan")), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    generator = torch.Generator().manual_seed(3)
    first, second = rlw_weights(J @ J.T, generator=generator), rlw_weights(J @ J.T, generator=generator)
    assert torch.equal(first, a) and not torch.equal(first, second)
    torch.manual_seed(11)
    c = rlw_weights(J @ J.T)  # the default generator
    torch.manual_seed(11)
    assert torch.equal(c, rlw_weights(J @ J.T))


def test_rlw_draws_are_standard_normal_logits() -> None:
    # log(w_i / w_j) = z_i − z_j ~ N(0, 2) recovers the draw: a fixed seed makes the statistics fixed
    # numbers (no flakiness); the bounds are those a correct sampler passes with probability ≥ 1 − 1e-6.
    generator = torch.Generator().manual_seed(2024)
    T, draws = 4, 5000
    w = torch.stack([rlw_weights(torch.eye(T), generator=generator) for _ in range(draws)])
    logits = (w.log() - w.log().mean(dim=1, keepdim=True)).numpy()  # z − mean(z)
    differences = (logits[:, 0] - logits[:, 1]) / math.sqrt(2.0)
    assert stats.kstest(differences, "norm").pvalue > 1e-6
    # Each centred logit has variance 1 − 1/T; its sample mean and variance sit within 5 standard errors.
    variance = 1 - 1 / T
    assert np.abs(logits.mean(axis=0)).max() <= 5 * math.sqrt(variance / draws)
    assert np.abs(logits.var(axis=0) - variance).max() <= 5 * variance * math.sqrt(2 / (draws - 1))
    # Every task has the same expected weight, 1 on the sum scale.
    assert np.abs(w.mean(dim=0).numpy() - 1).max() <= 5 * float(w.std(dim=0).max()) / math.sqrt(draws)


def test_rlw_single_task_is_one() -> None:
    w = rlw_weights(torch.ones(1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(1, dtype=torch.float64))


def test_rlw_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        rlw_weights(torch.eye(2), reduction="avg")
    with pytest.raises(TypeError, match="generator"):
        rlw_weights(torch.eye(2), generator=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("T", [2, 3, 8, 12])
def test_rlw_does_not_read_values_back(T: int) -> None:
    generator = torch.Generator().manual_seed(0)
    with ForbidHostReads():
        rlw_weights(torch.eye(T), generator=generator)
        rlw_weights(torch.eye(T))
