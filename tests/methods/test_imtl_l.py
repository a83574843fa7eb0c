"""IMTLL through the wrapper against IMTL-L written plainly (Liu et al. 2021: the scaled loss
e^s·L − s, s learned by the same optimizer), and its equivalence with UW."""

from __future__ import annotations

import torch

import gradsurgery as gs
from gradsurgery.methods.imtl_l import imtl_l_objective

from ..test_no_sync import ForbidHostReads
from .loss_training import T, assert_same_training, train_reference, train_wrapper


def test_imtl_l_matches_the_paper_over_twenty_steps() -> None:
    s = torch.zeros(T, requires_grad=True)

    def objective(losses: torch.Tensor, step: int):
        return (s.exp() * losses - s).sum(), s.detach().exp()

    ours = train_wrapper(lambda inner: gs.IMTLL(inner, num_tasks=T))
    assert_same_training(ours, train_reference(objective, extra=[s]))
    torch.testing.assert_close(ours[2].learned["log_scale"], s.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[1][0], torch.ones(T, dtype=torch.float64))  # s = 0: naive summation


def test_imtl_l_is_uw_with_the_parameter_negated() -> None:
    imtl = train_wrapper(lambda inner: gs.IMTLL(inner, num_tasks=T))
    uw = train_wrapper(lambda inner: gs.UW(inner, num_tasks=T))
    for p, q in zip(imtl[0], uw[0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(imtl[2].learned["log_scale"], -uw[2].learned["log_variance"], rtol=1e-6, atol=1e-7)


def test_imtl_l_scale_settles_where_the_scaled_loss_is_one() -> None:
    s = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    losses = torch.tensor([0.5, 4.0, 0.1])
    value, _ = imtl_l_objective(losses, state={}, params={"log_scale": s})
    (grad,) = torch.autograd.grad(value, s)
    torch.testing.assert_close(grad, s.detach().exp() * losses - 1)
    at_rest = -losses.log()
    value, _ = imtl_l_objective(losses, state={}, params={"log_scale": at_rest.requires_grad_()})
    torch.testing.assert_close(torch.autograd.grad(value, at_rest)[0], torch.zeros(3), rtol=0, atol=1e-6)


def test_imtl_l_objective_reads_nothing_back() -> None:
    with ForbidHostReads():
        imtl_l_objective(torch.rand(4), state={}, params={"log_scale": torch.zeros(4, requires_grad=True)})
