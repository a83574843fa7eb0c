"""The cheap modes, accumulation and mixed precision, each against plain PyTorch or the method's math:
cases found by probing the less-travelled combinations (each failed before its fix).

- ``every=k`` with an explicit ``shared=``, and in representation mode across accumulation and
  clearing through the model;
- ``tasks_per_step`` with methods that read the loss values, and with losses given as one tensor;
- random and stateful methods over accumulated ``backward`` calls;
- a GradScaler: ``scaler=`` keeps the losses separate, an overflowing refresh of ``every=k``, FAMO's
  state across a NaN loss, an overflowing Gram matrix, fp16 storage, ``nonfinite="skip"``;
- finite gradients near fp32's range are not called non-finite.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F


class Model(nn.Module):
    def __init__(self, tasks: int = 3, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def losses(self, step: int, *, scale: float = 1.0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 5, generator=generator), torch.randn(len(self.heads), 12, generator=generator)
        z = self.trunk(x)
        return [scale * ((head(z).squeeze(-1) - y[t]) ** 2).mean() for t, head in enumerate(self.heads)]


def _flat_grads(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]).double()


@pytest.mark.parametrize("fused", [False, True])
def test_every_with_explicit_shared_gives_the_heads_their_plain_gradient(fused: bool) -> None:
    """Including head 0, which tasks 0 and 1 read but shared= leaves out: the plain sum."""
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.0), every=3, shared=model.trunk)
    for step in range(3):
        opt.zero_grad()
        losses = model.losses(step)
        losses[1] = losses[1] + 0.1 * model.heads[0](model.trunk(torch.ones(2, 5))).pow(2).mean()
        heads = [p for head in model.heads for p in head.parameters()]
        plain = [g.clone() for g in torch.autograd.grad(sum(losses), heads, retain_graph=True)]
        opt.backward(torch.stack(losses) if fused else losses)
        assert opt.refreshed == (step == 0)
        for p, g in zip(heads, plain):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_every_in_representation_mode_counts_steps_not_calls() -> None:
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.0), every=2)

    def backward(step: int) -> None:
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 5, generator=generator), torch.randn(3, 12, generator=generator)
        z = model.trunk(x)
        opt.backward([((head(z).squeeze(-1) - y[t]) ** 2).mean() for t, head in enumerate(model.heads)], features=z)

    refreshed = []
    for step in range(4):  # two micro-batches per step
        opt.zero_grad()
        for micro in range(2):
            backward(10 * step + micro)
            refreshed.append(opt.refreshed)
    assert refreshed == [True, True, False, False, True, True, False, False]

    refreshed = []
    for step in range(4):  # cleared through the model
        model.zero_grad()
        backward(step)
        refreshed.append(opt.refreshed)
    assert refreshed == [True, False, True, False]


def test_tasks_per_step_gives_the_pseudo_task_the_mean_loss() -> None:
    model = Model(tasks=4)
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.0), normalization="loss", tasks_per_step=2)
    losses = model.losses(0)
    trunk = list(model.trunk.parameters())
    rows = torch.stack([_flat_grads(trunk, loss) for loss in losses])
    values = torch.stack([loss.detach() for loss in losses]).double()
    opt.backward(losses)
    chosen, rest = opt._cheap.draw.chosen, opt._cheap.draw.rest  # noqa: SLF001 (the step's draw)
    slots = torch.stack([rows[chosen[0]], rows[rest].mean(0)])
    slot_values = torch.stack([values[chosen[0]], values[rest].mean()])
    expected = F.mgda_weights(slots @ slots.T, normalization="loss", losses=slot_values)
    torch.testing.assert_close(opt.last_weights, expected, rtol=1e-6, atol=1e-9)  # the slots: the drawn task, the rest


def test_tasks_per_step_with_losses_as_one_tensor_is_refused_before_the_first_step() -> None:
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), tasks_per_step=2)
    with pytest.raises(ValueError, match="fused into one tensor"):
        opt.backward(torch.stack(model.losses(0)))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["PCGrad", "GradVac", "RLW", "GradDrop"])
def test_accumulated_calls_give_the_surgery_of_one_call_on_the_whole_batch(method: str) -> None:
    """Random and stateful methods draw and update once per step, whatever the number of micro-batches."""

    def run(micro_batches: int) -> list[torch.Tensor]:
        model = Model()
        opt = getattr(gs, method)(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
        for step in range(3):
            opt.zero_grad()
            for micro in range(micro_batches):
                opt.backward([loss / micro_batches for loss in model.losses(step)])
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(1), run(2)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_the_scaler_keyword_keeps_the_losses_separate() -> None:
    """A layer only one task reads on the first step and both later: surgery, as with scaler.scale(losses)."""
    torch.manual_seed(0)
    trunk, branch = nn.Linear(8, 16), nn.Linear(16, 16)
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    params = [*trunk.parameters(), *branch.parameters(), *heads.parameters()]
    opt = gs.MGDA(torch.optim.SGD(params, lr=0.0), nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 2, generator=generator)
        y[:, 1] = -3 * y[:, 0]
        z = torch.tanh(trunk(x))
        routed = torch.tanh(branch(z))
        losses = [((heads[0](routed).squeeze(-1) - y[:, 0]) ** 2).mean(), ((heads[1](routed if step else z).squeeze(-1) - y[:, 1]) ** 2).mean()]
        shared = [*trunk.parameters(), *branch.parameters()]
        J = torch.stack([_flat_grads(shared, loss) for loss in losses])
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is read off values: the losses are separate
            opt.backward(losses, scaler=scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    offset = trunk.weight.numel() + trunk.bias.numel()
    expected = F.mgda(J)[offset : offset + branch.weight.numel()].view_as(branch.weight)
    torch.testing.assert_close(branch.weight.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_an_overflowing_refresh_is_refreshed_again_under_propagate() -> None:
    """Plain AMP skips the overflowing step only; every=k must not keep its NaN weights for k steps."""
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.01), every=3, nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    taken = []
    for step in range(5):
        opt.zero_grad()
        losses = model.losses(step)
        if step == 3:
            losses[1] = losses[1] * float("inf")
        opt.backward(scaler.scale(losses))
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        taken.append(scaler.get_scale() == scale)
        if step == 4:
            assert opt.refreshed  # the step after the overflowing refresh refreshes again
    assert taken == [True, True, True, False, True]
    assert opt._cheap.weights is not None and bool(opt._cheap.weights.isfinite().all())  # noqa: SLF001


def test_famo_state_skips_a_nan_loss_under_propagate() -> None:
    model = Model()
    opt = gs.FAMO(torch.optim.SGD(model.parameters(), lr=0.01), num_tasks=3, nonfinite="propagate")
    for step in range(2):
        opt.zero_grad()
        opt.backward(model.losses(step))
        opt.step()
    before = {k: v.clone() for k, v in opt._outcome.method_state.items()}  # noqa: SLF001
    opt.zero_grad()
    losses = model.losses(2)
    losses[0] = losses[0] * float("nan")
    opt.backward(losses)
    for name, value in opt._outcome.method_state.items():  # noqa: SLF001
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("method", ["Sum", "PCGrad", "MGDA"])
def test_an_overflowing_gram_under_propagate_makes_the_step_nan(method: str) -> None:
    """Finite gradients whose squared norms overflow fp32 (a GradScaler's scale grown too far): the
    Gram matrix is not recomputed without a host read, so the update is NaN and the scaler skips the
    step, instead of PCGrad's conflict tests silently failing (the plain sum)."""
    model = Model()
    opt = getattr(gs, method)(torch.optim.SGD(model.parameters(), lr=0.0), nonfinite="propagate")
    opt.backward(model.losses(0, scale=2.0**66))
    assert all(g is not None and not bool(g.isfinite().all()) for g in (p.grad for p in model.trunk.parameters()))


def test_fp16_storage_for_fp32_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="use torch.bfloat16"):
        gs.MGDA(torch.optim.SGD(Model().parameters(), lr=0.1), storage_dtype=torch.float16)
    half = Model().half()
    gs.MGDA(torch.optim.SGD(half.parameters(), lr=0.1), storage_dtype=torch.float16)  # its own dtype: fine


def test_skip_with_a_scaler_is_refused_before_anything_changes() -> None:
    model = Model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite='propagate'"):
        opt.backward(model.losses(0), scaler=torch.amp.GradScaler("cpu"))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_finite_gradients_near_fp32s_range_are_not_refused(nonfinite: str) -> None:
    """Heads' gradients of 1e20 have a 2-norm beyond fp32: they are finite all the same."""
    model = Model()
    losses = model.losses(0, scale=1e20)
    plain = [g.clone() for g in torch.autograd.grad(sum(losses), list(model.heads.parameters()), retain_graph=True)]
    assert all(bool(g.isfinite().all()) for g in plain)
    opt = gs.Sum(torch.optim.SGD(model.parameters(), lr=0.0), nonfinite=nonfinite)
    opt.backward(losses)
    assert not opt._accumulation.skip  # noqa: SLF001
    for p, g in zip(model.heads.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)


def test_loss_weighting_accumulation_refuses_another_number_of_tasks() -> None:
    model = Model()
    opt = gs.GeometricMean(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(0))
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="2 losses, but 3 were accumulated"):
        opt.backward(model.losses(1)[:2])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    model.zero_grad()  # cleared through the model: a new step, which may have another T
    opt.backward(model.losses(1)[:2])


def test_rlw_on_losses_draws_once_per_step_as_rlw_on_gradients() -> None:
    """The two forms give the shared parameters the same update (RLW on gradients gives the heads their
    plain gradient), with accumulation too: each draws once per step."""

    def shared_grads(make: type) -> list[torch.Tensor]:
        model = Model()
        opt = make(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
        grads = []
        for step in range(2):
            opt.zero_grad()
            for micro in range(2):
                opt.backward([loss / 2 for loss in model.losses(10 * step + micro)])
            grads += [p.grad.clone() for p in model.trunk.parameters()]
        return grads

    for p, q in zip(shared_grads(gs.RLW), shared_grads(gs.RLWLoss)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_loss_weighting_refuses_skip_with_a_scaler() -> None:
    model = Model()
    opt = gs.UW(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=3, nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite='propagate'"):
        opt.backward(model.losses(0), scaler=torch.amp.GradScaler("cpu"))
    assert all(p.grad is None for p in model.parameters())


def test_tiny_but_nonzero_gradients_make_a_parameter_shared() -> None:
    """Task gradients of ~1e-32 and ~1e-26 in fp32: their squares underflow, their values do not."""
    model = Model(tasks=3)
    losses = model.losses(0)
    losses = [losses[0], losses[1] * 1e-30, losses[2] * 1e-25]
    trunk = list(model.trunk.parameters())
    J = torch.stack([_flat_grads(trunk, loss) for loss in losses])
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.0))
    opt.backward(losses)
    assert opt.last_weights is not None  # the trunk was in the surgery
    grads = torch.cat([p.grad.reshape(-1) for p in trunk]).double()
    torch.testing.assert_close(grads, F.mgda(J), rtol=1e-5, atol=1e-12)


def test_tasks_per_step_with_reduction_mean_divides_by_the_number_of_tasks() -> None:
    model = Model(tasks=3)
    losses = model.losses(0)
    plain = [g / 3 for g in torch.autograd.grad(sum(losses), list(model.trunk.parameters()), retain_graph=True)]
    opt = gs.Sum(torch.optim.SGD(model.parameters(), lr=0.0), reduction="mean", tasks_per_step=2)
    opt.backward(losses)
    for p, g in zip(model.trunk.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_a_stateful_method_of_your_own_updates_its_state_once_per_step() -> None:
    from gradsurgery.methods.spec import Method, State

    def init(T: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"ema": torch.zeros(T, dtype=torch.float64, device=device)}

    def ema_weights(G: torch.Tensor, *, reduction: str = "sum", state: dict[str, torch.Tensor]):
        d = G.diagonal(dim1=-2, dim2=-1).double()
        new = torch.where(state["ema"] == 0, d, 0.5 * state["ema"] + 0.5 * d)
        return new.clamp_min(1e-30).rsqrt(), {"ema": new}

    EMA = gs.wrapper_class(Method("EMA", None, ema_weights, doc="EMA of the squared norms.", state=State(init, "ema")))
    model = Model()
    trunk = list(model.trunk.parameters())
    opt = EMA(torch.optim.SGD(model.parameters(), lr=0.0))
    rows = None
    for micro in range(2):
        losses = model.losses(micro)
        step_rows = torch.stack([_flat_grads(trunk, loss) for loss in losses])
        rows = step_rows if rows is None else rows + step_rows
        opt.backward(losses)
    assert rows is not None
    torch.testing.assert_close(opt._outcome.method_state["ema"], (rows @ rows.T).diagonal(), rtol=1e-5, atol=0)  # noqa: SLF001


def test_a_method_of_your_own_with_weights_of_the_wrong_shape_is_told_so() -> None:
    class Wrong(gs.GradSurgery):
        uses_loss_values = False

        def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
            return torch.ones(G.shape[-1] + 1, dtype=torch.float64)

    model = Model()
    with pytest.raises(ValueError, match=r"Wrong's weights must be a floating-point tensor of shape \(3,\)"):
        Wrong(torch.optim.SGD(model.parameters(), lr=0.1)).backward(model.losses(0))
