"""The optimizer wrappers: hand-computed steps, accumulation, schedulers, checkpoints, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gradsurgery as gs
import gradsurgery.functional as F

WRAPPERS = {
    "Sum": lambda opt: gs.Sum(opt),
    "Mean": lambda opt: gs.Mean(opt),
    "PCGrad": lambda opt: gs.PCGrad(opt, seed=3),
    "CAGrad": lambda opt: gs.CAGrad(opt, c=0.4),
    "MGDA": lambda opt: gs.MGDA(opt),
    "MGDA-l2": lambda opt: gs.MGDA(opt, normalization="l2"),
}


class MultiTask(nn.Module):
    """A shared trunk, one head per task, and one parameter read by tasks 0 and 1 only."""

    def __init__(self, tasks: int = 3, width: int = 7) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
        self.pair = nn.Parameter(torch.randn(width))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        out = []
        for t, head in enumerate(self.heads):
            h = z + self.pair if t < 2 else z
            out.append(((head(h).squeeze(-1) - y[:, t]) ** 2).mean())
        return out


def _data(seed: int = 0, tasks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen), torch.randn(16, tasks, generator=gen)


def _model(seed: int = 0, tasks: int = 3) -> MultiTask:
    torch.manual_seed(seed)
    return MultiTask(tasks)


def _reference_grads(model: MultiTask, losses: list[torch.Tensor], weights_of) -> dict[str, torch.Tensor]:
    """Per-task grads → J over the parameters several tasks reach → weights → .grad, by hand."""
    names, params = zip(*model.named_parameters())
    per_task = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    reached = [[g is not None for g in row] for row in per_task]
    shared = [i for i in range(len(params)) if sum(r[i] for r in reached) > 1]
    flat = lambda row, i: torch.zeros(params[i].numel()) if row[i] is None else row[i].reshape(-1)  # noqa: E731
    J = torch.stack([torch.cat([flat(row, i) for i in shared]) for row in per_task])
    d = weights_of(J.double() @ J.double().T).to(J.dtype) @ J
    grads, offset = {}, 0
    for i in shared:
        grads[names[i]] = d[offset : offset + params[i].numel()].view_as(params[i])
        offset += params[i].numel()
    for i in range(len(params)):
        if i not in shared:
            found = [row[i] for row in per_task if row[i] is not None]
            if found:
                grads[names[i]] = sum(found)
    return grads


REFERENCE_WEIGHTS = {
    "Sum": lambda G: torch.ones(G.shape[0], dtype=torch.float64),
    "Mean": lambda G: torch.full((G.shape[0],), 1 / G.shape[0], dtype=torch.float64),
    "PCGrad": lambda G: F.pcgrad_weights(G, generator=torch.Generator().manual_seed(3)),
    "CAGrad": lambda G: F.cagrad_weights(G, c=0.4),
    "MGDA": lambda G: F.mgda_weights(G),
    "MGDA-l2": lambda G: F.mgda_weights(G, normalization="l2"),
}


@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.parametrize("inner", ["SGD", "Adam"])
def test_one_step_equals_the_hand_computed_update(name: str, inner: str) -> None:
    model, reference = _model(), _model()
    x, y = _data()
    make_inner = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "Adam": lambda p: torch.optim.Adam(p, lr=0.01)}[inner]
    opt = WRAPPERS[name](make_inner(model.parameters()))
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    opt.step()

    grads = _reference_grads(reference, reference.losses(x, y), REFERENCE_WEIGHTS[name])
    for pname, p in reference.named_parameters():
        p.grad = grads.get(pname)
    make_inner(reference.parameters()).step()
    for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
        # fp32 Gram and combine vs the reference's fp64 Gram: ~1e-6 relative on the gradients.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=pname)


@pytest.mark.parametrize("name", WRAPPERS)
def test_heads_get_their_own_plain_gradient(name: str) -> None:
    model = _model()
    x, y = _data()
    opt = WRAPPERS[name](torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    for t, head in enumerate(model.heads):
        expected = torch.autograd.grad(model.losses(x, y)[t], list(head.parameters()))
        for p, g in zip(head.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)  # vmapped backward: other rounding


def test_sum_equals_summed_losses_backward() -> None:
    model, reference = _model(), _model()
    x, y = _data()
    opt = gs.Sum(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    sum(reference.losses(x, y)).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", WRAPPERS)
def test_one_task_is_the_plain_optimizer(name: str) -> None:
    model, reference = _model(tasks=1), _model(tasks=1)
    x, y = _data(tasks=1)
    opt = WRAPPERS[name](torch.optim.Adam(model.parameters(), lr=0.01))
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()
        plain.zero_grad()
        reference.losses(x, y)[0].backward()
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_a_parameter_reached_by_two_of_three_tasks_is_shared() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    shared = {id(p) for p in opt._buffer.params}
    assert id(model.pair) in shared
    assert all(id(p) in shared for p in model.trunk.parameters())
    assert not any(id(p) in shared for p in model.heads.parameters())


def test_explicit_shared_parameters() -> None:
    model = _model()
    x, y = _data()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), shared=model.trunk, seed=0)
    opt.backward(model.losses(x, y))
    assert {id(p) for p in opt._buffer.params} == {id(p) for p in model.trunk.parameters()}
    # not listed: plain sum of the two tasks' gradients, as sum(losses).backward() gives
    losses = model.losses(x, y)
    expected = torch.autograd.grad(losses[0] + losses[1], model.pair)[0]
    torch.testing.assert_close(model.pair.grad, expected)


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_accumulation_is_surgery_of_the_accumulated_gradients(name: str) -> None:
    model, reference = _model(), _model()
    batches = [_data(seed) for seed in (1, 2)]
    opt = WRAPPERS[name](torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    for x, y in batches:
        opt.backward(model.losses(x, y))

    def total_losses() -> list[torch.Tensor]:
        per_batch = [reference.losses(x, y) for x, y in batches]
        return [sum(column) for column in zip(*per_batch)]

    grads = _reference_grads(reference, total_losses(), REFERENCE_WEIGHTS[name])
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[pname], rtol=1e-5, atol=1e-6, msg=pname)


def test_zero_grad_clears_the_accumulated_task_gradients() -> None:
    model = _model()
    x, y = _data()
    opt = gs.Sum(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.backward(model.losses(x, y))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, first[n])


def test_is_a_real_optimizer() -> None:
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = gs.CAGrad(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"][0] is extra


def test_step_with_closure() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        losses = model.losses(x, y)
        opt.backward(losses)
        return sum(losses).detach()

    first = opt.step(closure)
    second = opt.step(closure)
    assert second < first


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


INNER = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "user-defined": lambda p: SignSGD(p),
}


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_trains_with_every_inner_optimizer(inner: str, name: str) -> None:
    model = _model()
    x, y = _data()
    groups = [{"params": model.trunk.parameters()}, {"params": [*model.heads.parameters(), model.pair], "lr": 0.02}]
    opt = WRAPPERS[name](INNER[inner](groups))
    start = sum(model.losses(x, y)).item()
    for _ in range(15):
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()
    assert sum(model.losses(x, y)).item() < start


def test_frozen_parameters_are_left_alone() -> None:
    model = _model()
    x, y = _data()
    model.trunk[0].weight.requires_grad_(False)
    before = model.trunk[0].weight.clone()
    opt = gs.CAGrad(torch.optim.Adam(model.parameters(), lr=0.01))
    opt.backward(model.losses(x, y))
    opt.step()
    assert model.trunk[0].weight.grad is None and torch.equal(model.trunk[0].weight, before)


def test_parameters_of_mixed_dtype() -> None:
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(6, dtype=torch.float32))
    b = nn.Parameter(torch.randn(6, dtype=torch.float64))
    c = nn.Parameter(torch.randn(6).to(torch.bfloat16))
    losses = lambda: [(a * b.float() * c.float()).sum(), ((a - b.float()) ** 2 * c.float()).sum()]  # noqa: E731
    opt = gs.MGDA(torch.optim.SGD([a, b, c], lr=0.1))
    opt.backward(losses())
    assert (a.grad.dtype, b.grad.dtype, c.grad.dtype) == (torch.float32, torch.float64, torch.bfloat16)
    J = torch.stack([torch.cat([g.double().reshape(-1) for g in torch.autograd.grad(l, [a, b, c])]) for l in losses()])
    d = F.mgda_weights(J @ J.T) @ J
    torch.testing.assert_close(torch.cat([a.grad.double(), b.grad.double(), c.grad.double()]), d, rtol=1e-2, atol=1e-2)
    opt.step()


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    ],
    ids=["StepLR", "OneCycleLR", "ReduceLROnPlateau"],
)
def test_lr_schedulers_drive_the_wrapper(make_scheduler, recwarn) -> None:
    model = _model()
    x, y = _data()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed=0)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(5):
        opt.zero_grad()
        losses = model.losses(x, y)
        opt.backward(losses)
        opt.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # a flat metric: the LR must drop
        else:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_grad_scaler_unscales_surgery_and_skips_overflow() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="propagate")  # the AMP setting
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.zero_grad()
    opt.backward(scaler.scale(model.losses(x, y)))
    scaler.unscale_(opt)
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    reference = _model()
    grads = _reference_grads(reference, reference.losses(x, y), REFERENCE_WEIGHTS["MGDA"])
    for n in scaled:
        torch.testing.assert_close(scaled[n], grads[n], rtol=1e-4, atol=1e-6)
    scaler.step(opt)
    scaler.update()
    # an overflowing step is skipped and the scale shrinks
    before = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    losses = model.losses(x, y)
    opt.backward(scaler.scale([losses[0] * float("inf"), losses[1], losses[2]]))
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["PCGrad", "CAGrad", "MGDA"])
def test_checkpoint_resume_is_bit_identical(name: str) -> None:
    def train(model: MultiTask, opt: gs.GradSurgery, steps: range) -> None:
        for step in steps:
            x, y = _data(step)
            opt.zero_grad()
            opt.backward(model.losses(x, y))
            opt.step()

    make = lambda model: WRAPPERS[name](torch.optim.Adam(model.parameters(), lr=0.01))  # noqa: E731
    model = _model()
    opt = make(model)
    train(model, opt, range(3))
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    train(model, opt, range(3, 7))

    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    resumed = _model(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = WRAPPERS[name](torch.optim.Adam(resumed.parameters(), lr=0.01))
    if name == "PCGrad":
        opt2 = gs.PCGrad(torch.optim.Adam(resumed.parameters(), lr=0.01), seed=12345)  # the seed comes back too
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, range(3, 7))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_another_method_or_task_count_is_refused() -> None:
    model = _model()
    x, y = _data()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    opt.backward(model.losses(x, y))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="checkpoint is for 'PCGrad'"):
        gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1)).load_state_dict(state)
    fresh = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="trained with 3"):
        fresh.backward(model.losses(x, y)[:2])


def test_last_gram_and_weights_are_tensors_of_the_last_step() -> None:
    model = _model()
    x, y = _data()
    opt = gs.CAGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    assert opt.last_gram.shape == (3, 3) and opt.last_weights.shape == (3,)
    assert isinstance(opt.last_gram, torch.Tensor) and isinstance(opt.last_weights, torch.Tensor)


# ---------------------------------------------------------------------- bad input


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
    )


def _assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snapshot) -> None:
    params, grads, state = snapshot
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys()
    for key in state["state"]:
        for name, value in state["state"][key].items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(value))


def _trained() -> tuple[MultiTask, gs.GradSurgery]:
    model = _model()
    opt = gs.PCGrad(torch.optim.Adam(model.parameters(), lr=0.01), seed=0)
    x, y = _data()
    opt.backward(model.losses(x, y))
    opt.step()
    opt.backward(model.losses(x, y))  # pending accumulation with T = 3
    return model, opt


BAD_LOSSES = {
    "empty": (lambda m, x, y: [], "losses is empty"),
    "non-scalar": (lambda m, x, y: [*m.losses(x, y)[:2], m.trunk(x).sum(0)], "loss 2 is not a scalar"),
    "no-grad": (lambda m, x, y: [*m.losses(x, y)[:2], torch.tensor(1.0)], "loss 2 does not require grad"),
    "disconnected": (lambda m, x, y: [*m.losses(x, y)[:2], torch.ones((), requires_grad=True) * 2], "loss 2 reaches no parameter"),
    "changed-T": (lambda m, x, y: m.losses(x, y)[:2], "2 losses, but 3 were accumulated"),
    "2-D tensor": (lambda m, x, y: torch.stack(m.losses(x, y))[None], "must be 1-D"),
    "not a tensor": (lambda m, x, y: [1.0, 2.0, 3.0], "loss 0 is a float"),
}


@pytest.mark.parametrize("case", BAD_LOSSES)
def test_bad_losses_raise_before_anything_changes(case: str) -> None:
    model, opt = _trained()
    x, y = _data()
    make, message = BAD_LOSSES[case]
    snapshot = _snapshot(model, opt)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.backward(make(model, x, y))
    _assert_unchanged(model, opt, snapshot)


def test_shared_parameter_not_held_by_the_optimizer_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"shared\[0\] .* is not a parameter of the optimizer"):
        gs.MGDA(torch.optim.SGD(model.trunk.parameters(), lr=0.1), shared=[model.pair])
    with pytest.raises(ValueError, match="listed twice"):
        gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), shared=[model.pair, model.pair])


def test_duplicate_parameters_are_refused() -> None:
    model = _model()
    inner = torch.optim.SGD(model.trunk.parameters(), lr=0.1)
    inner.param_groups[0]["params"].append(inner.param_groups[0]["params"][0])
    with pytest.raises(ValueError, match="appears twice"):
        gs.Sum(inner)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: gs.CAGrad(torch.optim.SGD(p, lr=0.1), c=-1.0),
        lambda p: gs.CAGrad(torch.optim.SGD(p, lr=0.1), rescale="2"),
        lambda p: gs.MGDA(torch.optim.SGD(p, lr=0.1), normalization="l1"),
        lambda p: gs.PCGrad(torch.optim.SGD(p, lr=0.1), reduction="max"),
        lambda p: gs.Sum(torch.optim.SGD(p, lr=0.1), backend="cuda"),
        lambda p: gs.Sum(p),
        lambda p: gs.PCGrad(torch.optim.SGD(p, lr=0.1), seed="a"),
        lambda p: gs.PCGrad(torch.optim.SGD(p, lr=0.1), seed=2**70),
        lambda p: gs.PCGrad(torch.optim.SGD(p, lr=0.1), seed=-1),
        lambda p: gs.PCGrad(torch.optim.SGD(p, lr=0.1), seed=True),
    ],
    ids=["negative-c", "rescale", "normalization", "reduction", "backend", "not-an-optimizer", "seed-str", "seed-huge", "seed-negative", "seed-bool"],
)
def test_bad_options_are_refused_at_construction(make) -> None:
    with pytest.raises((ValueError, TypeError)):
        make(list(_model().parameters()))


def test_storage_dtype_that_is_not_a_dtype_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="storage_dtype must be a torch.dtype"):
        gs.MGDA(torch.optim.SGD(_model().parameters(), lr=0.1), storage_dtype="bfloat16")


def test_complex_parameters_are_refused_at_construction() -> None:
    weight = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="parameter 0 .* is complex"):
        gs.MGDA(torch.optim.SGD([weight], lr=0.1))


def test_complex_parameter_added_later_is_refused_before_any_backward() -> None:
    model = _model()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    weight = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt.add_param_group({"params": [weight]})
    x, y = _data()
    calls = []
    handle = model.trunk[0].weight.register_hook(lambda g: calls.append(1))
    with pytest.raises(ValueError, match="is complex"):
        opt.backward(model.losses(x, y))
    handle.remove()
    assert not calls  # refused before any backward pass ran
    assert all(p.grad is None for p in model.parameters())


def test_diagnostics_without_shared_parameters_says_so() -> None:
    model = _model(tasks=1)
    x, y = _data(tasks=1)
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="needs a backward"):
        opt.diagnostics()
    opt.backward(model.losses(x, y))
    with pytest.raises(RuntimeError, match="no shared parameters"):
        opt.diagnostics()


@pytest.mark.parametrize(
    "J, message",
    [
        (torch.empty(3, 4, device="meta"), "meta tensor"),
        (torch.randn(3, 4, requires_grad=True), "requires grad"),
    ],
    ids=["meta", "requires-grad"],
)
def test_functional_api_says_what_is_wrong_with_J(J: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        F.mgda(J)


# ---------------------------------------------------------------------- non-finite gradients


def _nan_losses(model: MultiTask, x: torch.Tensor, y: torch.Tensor, task: int, *, head_only: bool = False) -> list[torch.Tensor]:
    losses = model.losses(x, y)
    if head_only:  # NaN only in the head's gradient: the shared rows stay finite
        head_out = model.heads[task](model.trunk(x).detach()).sum() * float("nan")
        losses[task] = losses[task] + head_out
    else:
        losses[task] = losses[task] * float("nan")
    return losses


@pytest.mark.parametrize("head_only", [False, True], ids=["shared", "head"])
@pytest.mark.parametrize("accumulating", [False, True], ids=["fresh", "accumulating"])
def test_nonfinite_raise_names_the_task_and_changes_nothing(head_only: bool, accumulating: bool) -> None:
    model = _model()
    x, y = _data()
    # The loop engine attributes the NaN to its task; in the vmapped backward a NaN derivative times
    # another task's zero cotangent is NaN too, so the batched engine may name more tasks.
    opt = gs.CAGrad(torch.optim.Adam(model.parameters(), lr=0.01), engine="loop")
    opt.backward(model.losses(x, y))
    opt.step()
    opt.zero_grad()
    if accumulating:
        opt.backward(model.losses(x, y))
    snapshot = _snapshot(model, opt)
    with pytest.raises(gs.NonFiniteGradientError, match=r"task\(s\) \[1\]") as error:
        opt.backward(_nan_losses(model, x, y, 1, head_only=head_only))
    assert error.value.tasks == [1]
    _assert_unchanged(model, opt, snapshot)
    # the accumulated gradients survive the refused batch
    opt.backward(model.losses(x, y))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nonfinite_raise_with_the_batched_engine_names_the_task() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), engine="batched")
    snapshot = _snapshot(model, opt)
    with pytest.raises(gs.NonFiniteGradientError) as error:
        opt.backward(_nan_losses(model, x, y, 1))
    assert 1 in error.value.tasks
    _assert_unchanged(model, opt, snapshot)


def test_nonfinite_skip_skips_the_step_and_counts_it() -> None:
    model = _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.Adam(model.parameters(), lr=0.01), nonfinite="skip")
    opt.backward(model.losses(x, y))
    opt.step()
    opt.zero_grad()
    snapshot = _snapshot(model, opt)
    opt.backward(_nan_losses(model, x, y, 0))
    opt.step()
    _assert_unchanged(model, opt, snapshot)
    assert opt.skipped_steps == 1
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    opt.step()
    assert opt.skipped_steps == 1 and opt.state_dict()["gradsurgery"]["skipped_steps"] == 1


def test_nonfinite_propagate_reaches_grad() -> None:
    model = _model()
    x, y = _data()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="propagate", seed=0)
    opt.backward(_nan_losses(model, x, y, 2))
    assert not torch.isfinite(model.trunk[0].weight.grad).all()


def test_storage_dtype_halves_the_buffer_and_keeps_the_update_close() -> None:
    model, reference = _model(), _model()
    x, y = _data()
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), storage_dtype=torch.bfloat16)
    ref = gs.MGDA(torch.optim.SGD(reference.parameters(), lr=0.1))
    opt.backward(model.losses(x, y))
    ref.backward(reference.losses(x, y))
    assert opt._buffer.matrix.dtype == torch.bfloat16
    assert opt._buffer.matrix.element_size() * 2 == ref._buffer.matrix.element_size()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32
        # bf16 rows: 8 mantissa bits, ~4e-3 relative per entry
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match="storage_dtype"):
        gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1), storage_dtype=torch.int8)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_parameter_that_becomes_shared_joins_the_buffer_with_the_rows_written_so_far(engine: str) -> None:
    torch.manual_seed(0)
    trunk = nn.Parameter(torch.randn(5))
    extra = nn.Parameter(torch.randn(5))
    targets = torch.randn(3, 5)

    def losses(extra_users: int) -> list[torch.Tensor]:
        return [((trunk + (extra if t < extra_users else 0) - targets[t]) ** 2).sum() * (t + 1) for t in range(3)]

    opt = gs.MGDA(torch.optim.SGD([trunk, extra], lr=0.0), engine=engine)
    opt.backward(losses(1))  # extra: task 0 only, so task-specific
    assert [id(p) for p in opt._buffer.params] == [id(trunk)]
    opt.zero_grad()
    opt.backward(losses(2))  # extra now reached by two tasks: shared
    assert {id(p) for p in opt._buffer.params} == {id(trunk), id(extra)}
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [trunk, extra], allow_unused=True, materialize_grads=True)])
            for loss in losses(2)]
    J = torch.stack(rows).double()
    d = (F.mgda_weights(J @ J.T) @ J).float()
    torch.testing.assert_close(torch.cat([trunk.grad, extra.grad]), d, rtol=1e-5, atol=1e-5)


class _LossProportional(gs.GradSurgery):
    """A user-defined method that reads the loss values (``uses_loss_values`` keeps its default)."""

    def weights(self, G: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        assert losses is not None
        self.seen = losses.clone()
        return G.shape[0] * losses / losses.sum()


def test_a_user_defined_method_receives_the_accumulated_loss_values() -> None:
    model = _model()
    x, y = _data()
    opt = _LossProportional(torch.optim.SGD(model.parameters(), lr=0.1))
    first, second = model.losses(x[:8], y[:8]), model.losses(x[8:], y[8:])
    opt.backward(first)
    opt.backward(second)
    expected = torch.tensor([a.item() + b.item() for a, b in zip(first, second)], dtype=torch.float64)
    torch.testing.assert_close(opt.seen, expected)
    assert not gs.PCGrad.uses_loss_values and gs.MGDA(torch.optim.SGD(model.parameters()), normalization="loss").uses_loss_values
