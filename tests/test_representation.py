"""Representation mode: weights from the Gram of ∂L_t/∂z, one backward through the encoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F

from .test_optim import REFERENCE_WEIGHTS, WRAPPERS


class EncoderHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [((head(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(self.heads)]


@pytest.mark.parametrize("name", WRAPPERS)
def test_representation_mode_matches_the_explicit_computation(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 3, generator=gen)
    model, reference = EncoderHeads(), EncoderHeads()
    opt = WRAPPERS[name](torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(x, y)
    opt.backward(losses, features=z)

    z, losses = reference(x, y)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    w = REFERENCE_WEIGHTS[name](rows.double() @ rows.double().T).float()
    encoder_grads = torch.autograd.grad(z, list(reference.encoder.parameters()), grad_outputs=(w @ rows).view_as(z), retain_graph=True)
    for p, g in zip(model.encoder.parameters(), encoder_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for t, head in enumerate(model.heads):
        expected = torch.autograd.grad(losses[t], list(reference.heads[t].parameters()), retain_graph=True)
        for p, g in zip(head.parameters(), expected):
            torch.testing.assert_close(p.grad, g)


def test_mgda_with_features_is_mgda_ub() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 3, generator=gen)
    model = EncoderHeads()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(x, y)
    opt.backward(losses, features=z)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    torch.testing.assert_close(opt.last_weights, F.mgda_weights((rows @ rows.T).double()), rtol=1e-6, atol=1e-9)


def test_features_that_lead_to_no_parameter_or_no_loss_are_refused() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 3, generator=gen)
    model = EncoderHeads()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    z, losses = model(x, y)
    with pytest.raises(ValueError, match="does not lead to any parameter"):
        opt.backward(losses, features=torch.ones(3, requires_grad=True))
    unrelated = model.encoder(x) * 1.0
    with pytest.raises(ValueError, match="loss 0 does not depend on features"):
        opt.backward(losses, features=unrelated)
    assert all(p.grad is None for p in model.parameters())


def test_representation_mode_applies_the_nonfinite_policy() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 3, generator=gen)
    model = EncoderHeads()
    opt = gs.CAGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(x, y)
    losses[2] = losses[2] * float("nan")
    with pytest.raises(gs.NonFiniteGradientError, match=r"\[2\]"):
        opt.backward(losses, features=z)
    assert all(p.grad is None for p in model.parameters())
    skipping = gs.CAGrad(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    z, losses = model(x, y)
    losses[0] = losses[0] * float("inf")
    before = [p.clone() for p in model.parameters()]
    skipping.backward(losses, features=z)
    skipping.step()
    assert skipping.skipped_steps == 1 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class TiedEmbedding(nn.Module):
    """Tied input/output embeddings: each head reads the embedding table directly as well as through
    the features, and a skip connection carries the embedded input around the encoder."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 6) for _ in range(tasks))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        e = self.embed(tokens)
        z = self.encoder(e)
        losses = []
        for t, head in enumerate(self.heads):
            logits = (head(z) + e) @ self.embed.weight.T  # skip connection + tied output embedding
            losses.append(nn.functional.cross_entropy(logits, targets[:, t]))
        return z, losses


def _tied_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (9,), generator=gen), torch.randint(0, 11, (9, 3), generator=gen)


def test_sum_with_paths_around_the_features_equals_summed_losses_backward() -> None:
    tokens, targets = _tied_data()
    model, reference = TiedEmbedding(), TiedEmbedding()
    opt = gs.Sum(torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(tokens, targets)
    opt.backward(losses, features=z)
    sum(reference(tokens, targets)[1]).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", WRAPPERS)
def test_paths_around_the_features_get_their_plain_gradient(name: str) -> None:
    tokens, targets = _tied_data()
    model, reference = TiedEmbedding(), TiedEmbedding()
    opt = WRAPPERS[name](torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(tokens, targets)
    opt.backward(losses, features=z)

    z, losses = reference(tokens, targets)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
    w = REFERENCE_WEIGHTS[name](rows.double() @ rows.double().T).float()
    encoder = [reference.embed.weight, *reference.encoder.parameters()]
    through = torch.autograd.grad(z, encoder, grad_outputs=(w @ rows).view_as(z), retain_graph=True)
    # The paths that bypass z: every loss's full gradient minus its part through z.
    total = torch.autograd.grad(sum(losses), encoder, retain_graph=True)
    via_z = torch.autograd.grad(z, encoder, grad_outputs=rows.sum(0).view_as(z), retain_graph=True)
    expected = [a + (b - c) for a, b, c in zip(through, total, via_z)]
    for p, g in zip([model.embed.weight, *model.encoder.parameters()], expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    for t, head in enumerate(model.heads):
        plain = torch.autograd.grad(losses[t], list(reference.heads[t].parameters()), retain_graph=True)
        for p, g in zip(head.parameters(), plain):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


def test_a_nan_only_in_a_head_is_raised() -> None:
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 3, generator=gen)
    model = EncoderHeads()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    z, losses = model(x, y)
    losses[1] = losses[1] + model.heads[1](z.detach()).sum() * float("nan")  # reaches head 1, not z
    with pytest.raises(gs.NonFiniteGradientError, match=r"\[1\]") as error:
        opt.backward(losses, features=z)
    assert error.value.tasks == [1]
    assert all(p.grad is None for p in model.parameters())
