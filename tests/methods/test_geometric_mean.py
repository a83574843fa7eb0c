"""GeometricMean through the wrapper against the paper's geometric loss strategy written plainly
(MultiNet++: (Π_t L_t)^(1/T), as LibMTL's GLS computes it), on the sum scale (× T)."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods.geometric_mean import geometric_mean_objective

from ..test_no_sync import ForbidHostReads
from .loss_training import T, assert_same_training, train_reference, train_wrapper


def gls_reference(losses: torch.Tensor, step: int):
    value = torch.pow(losses.double().prod(), 1.0 / T)
    gm = float(value.detach())
    return T * value, torch.tensor([gm / float(v) for v in losses.detach()], dtype=torch.float64)


def test_geometric_mean_matches_the_paper_over_twenty_steps() -> None:
    assert_same_training(train_wrapper(gs.GeometricMean), train_reference(gls_reference))


def test_geometric_mean_weighted_losses_all_equal_the_geometric_mean() -> None:
    losses = torch.tensor([0.01, 2.0, 50.0, 0.7], requires_grad=True)
    value, _ = geometric_mean_objective(losses, state={}, params={})
    (w,) = torch.autograd.grad(value, losses)
    gm = float(losses.detach().double().log().mean().exp())
    torch.testing.assert_close(value.double(), torch.tensor(4 * gm, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close((w * losses.detach()).double(), torch.full((4,), gm, dtype=torch.float64), rtol=1e-6, atol=0)
    equal = torch.full((5,), 0.3, requires_grad=True)
    (ones,) = torch.autograd.grad(geometric_mean_objective(equal, state={}, params={})[0], equal)
    torch.testing.assert_close(ones, torch.ones(5), rtol=1e-6, atol=0)  # equal losses: naive summation


def test_geometric_mean_refuses_a_loss_that_is_not_positive_naming_the_task() -> None:
    model = torch.nn.Linear(2, 3)
    opt = gs.GeometricMean(torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(torch.ones(1, 2)).squeeze(0)
    with pytest.raises(ValueError, match=r"GeometricMean takes the logarithm .* loss\(es\) \[0, 2\]"):
        opt.backward([-(out[0] ** 2) - 1, out[1] ** 2 + 1, out[2] * 0.0])
    assert all(p.grad is None for p in model.parameters())


def test_geometric_mean_objective_reads_nothing_back() -> None:
    with ForbidHostReads():
        geometric_mean_objective(torch.rand(6) + 0.1, state={}, params={})
