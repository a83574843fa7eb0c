"""RLWLoss through the wrapper against RLW's Algorithm 1 written plainly (Lin et al. 2022: λ = softmax(z),
z ~ N(0, I) each step), and its agreement with the gradient-space RLW."""

from __future__ import annotations

import math

import torch

import gradsurgery as gs
from gradsurgery.methods.rlw_loss import rlw_loss_objective

from ..test_no_sync import ForbidHostReads
from .loss_training import LR, T, Net, assert_same_training, batch, train_reference, train_wrapper

SEED = 7


def test_rlw_loss_matches_the_paper_over_twenty_steps() -> None:
    generator = torch.Generator().manual_seed(SEED)  # the wrapper's generator for seed=SEED

    def objective(losses: torch.Tensor, step: int):
        z = torch.randn(T, generator=generator, dtype=torch.float64)
        e = [math.exp(float(v)) for v in z]
        weights = torch.tensor([T * v / sum(e) for v in e], dtype=torch.float64)
        return (weights.float() * losses).sum(), weights

    assert_same_training(train_wrapper(lambda inner: gs.RLWLoss(inner, seed=SEED)), train_reference(objective))


def test_rlw_loss_is_rlw_on_the_shared_parameters_and_weights_the_heads() -> None:
    """Same seed, same draws, step after step; on the trunk the same update, Σ_t w_t ∇L_t; a head,
    which one task alone reaches, gets its task's gradient times w_t here and plain from gs.RLW."""
    ours = train_wrapper(lambda inner: gs.RLWLoss(inner, seed=SEED))
    gradient_space = train_wrapper(lambda inner: gs.RLW(inner, seed=SEED))
    for step, (w, v) in enumerate(zip(ours[1], gradient_space[1])):
        torch.testing.assert_close(w, v, rtol=1e-6, atol=0, msg=lambda m: f"step {step}: {m}")
    model, twin = Net(), Net()
    loss_form = gs.RLWLoss(torch.optim.SGD(model.parameters(), lr=LR), seed=SEED)
    gradient_form = gs.RLW(torch.optim.SGD(twin.parameters(), lr=LR), seed=SEED)
    loss_form.backward(model.losses(*batch(0)))
    gradient_form.backward(twin.losses(*batch(0)))
    for p, q in zip(model.trunk.parameters(), twin.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    w = loss_form.last_weights
    for t, (head, plain) in enumerate(zip(model.heads, twin.heads)):
        for p, q in zip(head.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, float(w[t]) * q.grad, rtol=1e-5, atol=1e-7)


def test_rlw_loss_weights_are_positive_and_sum_to_t() -> None:
    _, weights, _ = train_wrapper(lambda inner: gs.RLWLoss(inner, seed=SEED))
    assert len({tuple(w.tolist()) for w in weights}) == len(weights)  # a fresh draw every step
    for w in weights:
        assert (w > 0).all() and abs(float(w.sum()) - T) <= 1e-6


def test_rlw_loss_objective_reads_nothing_back() -> None:
    with ForbidHostReads():
        rlw_loss_objective(torch.rand(5), state={}, params={}, generator=torch.Generator().manual_seed(0))
