"""Model families × training idioms against plain PyTorch, the matrix a PyTorch reviewer asks for.

Every case runs the wrapper on one model and plain PyTorch on an identical twin (same seed, same
batches): per-task ``torch.autograd.grad`` and the method's math (``tests/plain.py``) give the
expected ``.grad``, which is set on the twin and stepped by a plain copy of the same inner optimizer
(fused, foreach, clipped, scheduled, scaled exactly as the wrapper's). Gradients are compared after
every ``backward``, parameters and buffers (BatchNorm running statistics) after the steps.

PCGrad draws its orders from its seeded generator once per step: every ``backward`` of an
accumulated step redoes the surgery with the step's draws (the ``.grad`` it leaves is observable after
each one); the reference keeps one generator seeded the same way and does the same
(:class:`SteppingWeights`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as NF
from torch import nn
from torch.nn.utils import parametrizations

import gradsurgery as gs
import gradsurgery.functional as GF
from gradsurgery.taskgrads import BatchingUnsupportedError

from .plain import METHODS, assert_grads, expected_grads, weights_of, wrapper

pytestmark = pytest.mark.usefixtures("one_thread")

Batch = tuple[torch.Tensor, ...]
Weights = Callable[[torch.Tensor], torch.Tensor]

# Tolerances, by the dtype of the parameter compared.
# - fp32: the wrapper accumulates the Gram matrix and combines in fp32 (rounding ~1e-7 per operation,
#   ~1e-6 relative over the few hundred entries summed here) where the reference works in fp64; the
#   weights of CAGrad/MGDA move with G by the conditioning of these small random problems (well below
#   100), so 1e-4 relative; 1e-6 absolute for entries whose value cancels between tasks.
# - float64: both sides are fp64 and differ only in summation order (~1e-15 × conditioning).
# - bf16: each side rounds its fp32/fp64 result once to 8 significant bits; a difference in the last
#   fp32 bits can flip that rounding, so one bf16 ulp (2^-7 relative at worst) is allowed, no more.
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-6},
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.bfloat16: {"rtol": 2.0**-7, "atol": 1e-5},
}
# Parameters after a few optimizer steps: the gradients' relative error carried through lr ≤ 0.1;
# atol covers entries that moved by ~lr and ended near zero.
PARAM_TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
    torch.bfloat16: {"rtol": 2.0**-7, "atol": 1e-4},
}
# Adam divides each entry by its own running magnitude, with slope lr/eps where that magnitude is
# below eps. An entry whose combined gradient cancels between tasks (seen: MGDA's weights cancelling
# one transformer weight to 1e-6 of the tasks' contributions, which fp32 then holds to ~4%) and sits
# near eps after unscaling or clipping moves by a few tenths of a percent of lr from rounding alone,
# which no tolerance on the gradients bounds. After fp32/bf16 Adam steps parameters are compared to
# 1% of lr absolute; the gradients themselves were compared tightly before each step, and a wrong
# layout, clip, skip or state moves entries by O(lr).
ADAM_LR = 0.01
ADAM_ATOL = 1e-2 * ADAM_LR


class SteppingWeights:
    """The method's weights as a wrapper computes them over successive steps: PCGrad draws from one
    generator seeded with ``seed`` once per step (its first step equals ``weights_of``); the calls
    of an accumulated step all draw what the step's first did (:meth:`same_step`)."""

    def __init__(self, method: str, *, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed) if method == "PCGrad" else None
        self.fixed = weights_of(method)
        self.start: torch.Tensor | None = None

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            return self.fixed(G)
        self.start = self.generator.get_state()
        return GF.pcgrad_weights(G, generator=self.generator)

    def same_step(self) -> None:
        """The next call belongs to the same step as the last one: the same draws."""
        if self.generator is not None and self.start is not None:
            self.generator.set_state(self.start)


def stepping_weights(method: str, *, seed: int = 0) -> SteppingWeights:
    return SteppingWeights(method, seed=seed)


def assert_grads_by_dtype(params: list[torch.Tensor], expected: list[torch.Tensor | None], *, scale: float = 1.0) -> None:
    """``scale``: the losses' scale (GradScaler's), which scales the absolute tolerance with them."""
    for index, (p, e) in enumerate(zip(params, expected)):
        tolerance = TOLERANCES[p.dtype]
        try:
            assert_grads([p], [e], rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)
        except AssertionError as error:
            raise AssertionError(f"parameter {index} of {len(params)}: {error}") from None


def assert_same_state(model: nn.Module, reference: nn.Module, *, adam: bool = False) -> None:
    """Parameters and buffers (running statistics) of the two twins agree (``adam``: after Adam steps,
    see ``ADAM_ATOL``)."""
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        tolerance = dict(PARAM_TOLERANCES[p.dtype])
        if adam and p.dtype != torch.float64:
            tolerance["atol"] = max(tolerance["atol"], ADAM_ATOL)
        torch.testing.assert_close(p, q, **tolerance, msg=lambda m: f"parameter {name}: {m}")
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, c, **PARAM_TOLERANCES[b.dtype], msg=lambda m: f"buffer {name}: {m}")
        else:
            assert torch.equal(b, c), f"buffer {name}"


# ---------------------------------------------------------------------- the model families


class Zoo(nn.Module):
    """A multi-task model: ``losses(batch)`` gives the ``T`` scalar losses (one forward), and
    ``wrapper_losses(batch)`` what the training loop hands to ``opt.backward`` (the same, unless the
    family computes them as one tensor)."""

    tasks = 3

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        raise NotImplementedError

    def wrapper_losses(self, batch: Batch) -> Any:
        return self.losses(batch)


def _regression(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((out.squeeze(-1).float() - y[:, t]) ** 2).mean() * (t + 1) for t, out in enumerate(outputs)]


class MLP(Zoo):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 9), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(9, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = self.trunk(x)
        return _regression([head(z) for head in self.heads], y)


class ConvBN(Zoo):
    """channels_last convolutions with BatchNorm (train mode: batch statistics, running stats updated
    once per forward). The convolution before BatchNorm has no bias: BatchNorm removes it, so its
    gradient would be pure rounding noise that Adam would blow up to ±lr."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Tanh()
        ).to(memory_format=torch.channels_last)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = self.trunk(x).mean(dim=(2, 3))
        return _regression([head(z) for head in self.heads], y)


class Transformer(Zoo):
    """One encoder layer, mean-pooled. Without biases inside the layer: the key projection's bias has
    an exactly zero gradient (softmax ignores a shift shared by all keys), so what autograd computes
    for it is rounding noise, which Adam normalises to ±lr and no two summation orders agree on."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True, bias=False)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = self.encoder(self.embed(x)).mean(dim=1)
        return _regression([head(z) for head in self.heads], y)


class Recurrent(Zoo):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 7, num_layers=2, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        out, _ = self.rnn(x)
        z = out[:, -1]
        return _regression([head(z) for head in self.heads], y)


class Embeddings(Zoo):
    """A shared embedding bag (mean of token embeddings) read by classification heads."""

    def __init__(self, *, sparse: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=sparse)
        self.mix = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 5) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        tokens, labels = batch
        z = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return [NF.cross_entropy(head(z), labels[:, t]) for t, head in enumerate(self.heads)]


class Tied(Zoo):
    """Input and output embeddings tied: every task's logits are its head's output times the
    embedding matrix, so the embedding is reached by every task along two paths."""

    def __init__(self, *, sparse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8, sparse=sparse)
        self.mix = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        tokens, labels = batch
        z = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return [NF.cross_entropy(head(z) @ self.embed.weight.t(), labels[:, t]) for t, head in enumerate(self.heads)]


class Parametrized(Zoo):
    """A shared layer under a parametrization: the optimizer holds its ``original`` tensors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        if kind == "weight_norm":
            parametrizations.weight_norm(self.shared)
        else:
            parametrizations.orthogonal(self.shared)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return _regression([head(z) for head in self.heads], y)


class Partial(Zoo):
    """A trunk every task reads, a layer only tasks 0 and 1 read, and a layer only task 2 reads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.pair = nn.Linear(8, 8)  # tasks 0 and 1
        self.own = nn.Linear(8, 8)  # task 2
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = self.trunk(x)
        pair = torch.tanh(self.pair(z))
        own = torch.tanh(self.own(z))
        return _regression([self.heads[0](pair), self.heads[1](pair + z), self.heads[2](own)], y)


class Vectorised(Zoo):
    """The ``(T,)`` losses computed as one tensor (``((out - y) ** 2).mean(0)``): every loss's graph
    reaches every head. The reference computes each loss on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh())
        self.heads = nn.Linear(9, self.tasks)

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = self.trunk(x)
        return [((z @ self.heads.weight[t] + self.heads.bias[t] - y[:, t]) ** 2).mean() for t in range(self.tasks)]

    def wrapper_losses(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        return ((self.heads(self.trunk(x)) - y) ** 2).mean(0)


class BF16Heads(Zoo):
    """An fp32 trunk, a bf16 layer every task reads, and bf16 heads (the losses in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.adapter = nn.Linear(8, 8).to(torch.bfloat16)
        self.heads = nn.ModuleList(nn.Linear(8, 1).to(torch.bfloat16) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y = batch
        z = torch.tanh(self.adapter(self.trunk(x).to(torch.bfloat16)))
        return _regression([head(z) for head in self.heads], y)


def _regression_batch(shape: tuple[int, ...], *, channels_last: bool = False) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        gen = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(*shape, generator=gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        return x, torch.randn(shape[0], 3, generator=gen)

    return make


def _token_batch(vocab: int, classes: int) -> Callable[[int], Batch]:
    def make(seed: int) -> Batch:
        gen = torch.Generator().manual_seed(100 + seed)
        return torch.randint(vocab, (6, 5), generator=gen), torch.randint(classes, (6, 3), generator=gen)

    return make


@dataclass(frozen=True)
class Family:
    build: Callable[[], Zoo]
    batch: Callable[[int], Batch]


FAMILIES: dict[str, Family] = {
    "mlp": Family(MLP, _regression_batch((8, 6))),
    "conv_bn_channels_last": Family(ConvBN, _regression_batch((6, 3, 7, 7), channels_last=True)),
    "transformer": Family(Transformer, _regression_batch((4, 5, 4))),
    "lstm": Family(lambda: Recurrent(nn.LSTM), _regression_batch((4, 5, 4))),
    "gru": Family(lambda: Recurrent(nn.GRU), _regression_batch((4, 5, 4))),
    "embedding": Family(lambda: Embeddings(sparse=False), _token_batch(20, 5)),
    "embedding_sparse": Family(lambda: Embeddings(sparse=True), _token_batch(20, 5)),
    "tied_embedding": Family(Tied, _token_batch(12, 12)),
    "tied_embedding_sparse": Family(lambda: Tied(sparse=True), _token_batch(12, 12)),
    "weight_norm": Family(lambda: Parametrized("weight_norm"), _regression_batch((8, 6))),
    "orthogonal": Family(lambda: Parametrized("orthogonal"), _regression_batch((8, 6))),
    "partial_sharing": Family(Partial, _regression_batch((8, 6))),
    "vectorised_losses": Family(Vectorised, _regression_batch((8, 6))),
    "bf16_heads": Family(BF16Heads, _regression_batch((8, 6))),
}


def twins(name: str, seed: int = 0) -> tuple[Zoo, Zoo]:
    """The model for the wrapper and its identical plain-PyTorch twin, both in train mode."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(FAMILIES[name].build().train())
    return models[0], models[1]


class Reference:
    """Plain PyTorch beside the wrapper: the twin's expected ``.grad`` for the method, and its own
    copy of the inner optimizer stepped on them."""

    def __init__(self, model: Zoo, optimizer: torch.optim.Optimizer, method: str) -> None:
        self.model = model
        self.optimizer = optimizer
        self.weights = stepping_weights(method)
        self.params = list(model.parameters())

    def expected(self, losses: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return expected_grads(self.params, losses, self.weights)

    def set_grads(self, grads: list[torch.Tensor | None]) -> None:
        """As ``loss.backward()`` leaves them: a dense ``.grad`` in its parameter's memory layout (the
        fused CPU optimizers read a parameter and its gradient's raw memory side by side)."""
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone() if g.is_sparse else torch.empty_like(p).copy_(g)


def _sgd(params) -> torch.optim.Optimizer:
    """SGD with momentum: it takes sparse gradients too."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


# Families whose graph vmap cannot batch (sparse gradients: no batching rule for sparse views): the
# batched engine may refuse them, clearly and before any .grad changes, instead of computing their
# gradients. Every other family must run batched.
BATCHING_MAY_REFUSE = {"embedding_sparse", "tied_embedding_sparse"}


# ---------------------------------------------------------------------- 1. every family, every method, both engines


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_like_plain_pytorch(family: str, method: str, engine: str) -> None:
    """Three steps of SGD with momentum: ``.grad`` after every ``backward``, parameters and running
    statistics after the last step."""
    model, twin = twins(family)
    opt = wrapper(method, _sgd(model.parameters()), engine=engine)
    ref = Reference(twin, _sgd(twin.parameters()), method)
    for step in range(3):
        batch = FAMILIES[family].batch(step)
        opt.zero_grad()
        if engine == "batched" and family in BATCHING_MAY_REFUSE:
            try:
                opt.backward(model.wrapper_losses(batch))
            except BatchingUnsupportedError as error:
                assert "batched backward cannot run" in str(error)
                assert all(p.grad is None for p in model.parameters()), "a refused backward changed .grad"
                return
        else:
            opt.backward(model.wrapper_losses(batch))
        expected = ref.expected(ref.model.losses(batch))
        assert_grads_by_dtype(list(model.parameters()), expected)
        opt.step()
        ref.set_grads(expected)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    assert_same_state(model, twin)


@pytest.mark.parametrize("method", ["PCGrad", "MGDA"])
@pytest.mark.parametrize("family", ["conv_bn_channels_last", "transformer", "lstm", "tied_embedding", "bf16_heads", "vectorised_losses"])
def test_batched_engine_in_chunks(family: str, method: str) -> None:
    """``chunk_size=2`` with three tasks: a chunk of two and a chunk of one."""
    model, twin = twins(family)
    opt = wrapper(method, _sgd(model.parameters()), engine="batched", chunk_size=2)
    ref = Reference(twin, _sgd(twin.parameters()), method)
    for step in range(2):
        batch = FAMILIES[family].batch(step)
        opt.zero_grad()
        opt.backward(model.wrapper_losses(batch))
        expected = ref.expected(twin.losses(batch))
        assert_grads_by_dtype(list(model.parameters()), expected)
        opt.step()
        ref.set_grads(expected)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    assert_same_state(model, twin)


@pytest.mark.parametrize("method", METHODS)
def test_a_layer_frozen_then_unfrozen(method: str) -> None:
    """Fine-tuning: the optimizer holds a layer whose ``requires_grad`` is off on some steps (its
    ``.grad`` stays ``None`` there, as ``loss.backward()`` leaves it) and on for others (shared then)."""
    model, twin = twins("mlp")
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    ref = Reference(twin, torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), method)
    for step, trainable in enumerate((False, True, False, True)):
        for m in (model, twin):
            m.trunk[0].weight.requires_grad_(trainable)
        batch = FAMILIES["mlp"].batch(step)
        opt.zero_grad()
        opt.backward(model.losses(batch))
        live = [p for p in twin.parameters() if p.requires_grad]
        found = dict(zip(map(id, live), expected_grads(live, twin.losses(batch), ref.weights)))
        expected = [found.get(id(p)) for p in twin.parameters()]
        assert_grads_by_dtype(list(model.parameters()), expected)
        opt.step()
        ref.set_grads(expected)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    assert_same_state(model, twin)


def test_parametrizations_train_their_original_tensors() -> None:
    """The optimizer holds ``parametrizations.weight.original*``: those are what the surgery fills."""
    for kind, names in (("weight_norm", {"original0", "original1"}), ("orthogonal", {"original"})):
        model, twin = twins(kind)
        opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
        batch = FAMILIES[kind].batch(0)
        opt.backward(model.losses(batch))
        originals = dict(model.shared.parametrizations.weight.named_parameters())
        assert set(originals) == names
        ref_originals = dict(twin.shared.parametrizations.weight.named_parameters())
        ref = Reference(twin, torch.optim.SGD(twin.parameters(), lr=0.1), "MGDA")
        expected = dict(zip([id(p) for p in ref.params], ref.expected(twin.losses(batch))))
        for name in names:
            want = expected[id(ref_originals[name])]
            assert want is not None and bool(want.ne(0).any())
            torch.testing.assert_close(originals[name].grad, want, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------------- 2. fused and foreach optimizers


INNER = {
    "Adam-fused": lambda p: torch.optim.Adam(p, lr=ADAM_LR, fused=True),
    "Adam-foreach": lambda p: torch.optim.Adam(p, lr=ADAM_LR, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=ADAM_LR, weight_decay=0.1, fused=True),
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, lr=ADAM_LR, weight_decay=0.1, foreach=True),
    "SGD-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, fused=True),
    "SGD-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
}


def _train_both(
    family: str,
    method: str,
    make_inner: Callable[[Any], torch.optim.Optimizer],
    *,
    steps: int = 3,
    between: Callable[[nn.Module], Any] | None = None,
    clear: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
    **options: Any,
) -> tuple[Zoo, Zoo]:
    """``steps`` steps of the wrapper and of plain PyTorch; ``between(model)`` runs on both between
    backward and step (clipping), ``clear(model, opt)`` clears the gradients (default: ``opt.zero_grad()``)."""
    model, twin = twins(family)
    opt = wrapper(method, make_inner(model.parameters()), **options)
    ref = Reference(twin, make_inner(twin.parameters()), method)
    for step in range(steps):
        batch = FAMILIES[family].batch(step)
        if clear is None:
            opt.zero_grad()
        else:
            clear(model, opt)
        opt.backward(model.wrapper_losses(batch))
        expected = ref.expected(twin.losses(batch))
        assert_grads_by_dtype(list(model.parameters()), expected)
        ref.set_grads(expected)
        if between is not None:
            got, want = between(model), between(twin)
            if got is not None:
                torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
            assert_grads_by_dtype(list(model.parameters()), [p.grad for p in twin.parameters()])
        opt.step()
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    return model, twin


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("method", METHODS)
def test_fused_and_foreach_optimizers_on_channels_last_batchnorm(inner: str, method: str, engine: str) -> None:
    """The fused and foreach kernels read a parameter's and its gradient's raw memory side by side:
    a channels_last weight whose ``.grad`` had another layout would be updated with scrambled values."""
    model, twin = _train_both("conv_bn_channels_last", method, INNER[inner], engine=engine)
    for p in model.parameters():
        assert p.grad.stride() == p.stride()
    assert_same_state(model, twin, adam=inner.startswith("Adam"))


@pytest.mark.parametrize("inner", ["Adam-fused", "SGD-foreach"])
@pytest.mark.parametrize("family", ["transformer", "lstm", "tied_embedding", "orthogonal", "bf16_heads"])
def test_fused_and_foreach_optimizers_across_families(family: str, inner: str) -> None:
    model, twin = _train_both(family, "CAGrad", INNER[inner])
    assert_same_state(model, twin, adam=inner.startswith("Adam"))


# ---------------------------------------------------------------------- 3. clearing through the module


CLEARS = {
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("clear", list(CLEARS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["conv_bn_channels_last", "gru", "tied_embedding", "embedding_sparse", "weight_norm", "partial_sharing"])
def test_clearing_through_the_module(family: str, method: str, clear: str) -> None:
    model, twin = _train_both(family, method, _sgd, clear=CLEARS[clear])
    assert_same_state(model, twin)


# ---------------------------------------------------------------------- 4. gradient clipping between backward and step


CLIPS = {
    "clip_grad_norm_": lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05),
    "clip_grad_norm_-foreach": lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05, foreach=True),
    "clip_grad_value_": lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), clip_value=0.01),
}


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["mlp", "transformer", "lstm", "partial_sharing"])
def test_clipping_between_backward_and_step(family: str, method: str, clip: str) -> None:
    """The clipped update: the wrapper's ``.grad`` clipped as plain PyTorch clips the reference's
    (the total norm returned must agree too), then an Adam step."""
    model, twin = _train_both(family, method, INNER["Adam-fused"], between=CLIPS[clip])
    assert_same_state(model, twin, adam=True)


# ---------------------------------------------------------------------- 5. LR schedulers


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=5),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def _grouped(model: Zoo) -> list[dict[str, Any]]:
    """Two parameter groups: the heads, and everything else (the shared parameters among them)."""
    heads = {id(p) for p in model.heads.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in heads], "lr": 0.05},
        {"params": list(model.heads.parameters()), "lr": 0.02},
    ]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("method", METHODS)
def test_lr_schedulers_drive_the_wrapper_like_the_plain_optimizer(scheduler: str, method: str) -> None:
    model, twin = twins("mlp")
    opt = wrapper(method, torch.optim.Adam(_grouped(model), lr=0.05))
    plain = torch.optim.Adam(_grouped(twin), lr=0.05)
    ref = Reference(twin, plain, method)
    sched, ref_sched = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            batch = FAMILIES["mlp"].batch(step)
            opt.zero_grad()
            opt.backward(model.losses(batch))
            ref.set_grads(ref.expected(twin.losses(batch)))
            opt.step()
            plain.step()
            if scheduler == "ReduceLROnPlateau":
                sched.step(1.0 + step)  # a metric that never improves: the LR halves every step
                ref_sched.step(1.0 + step)
            else:
                sched.step()
                ref_sched.step()
            assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    assert opt.param_groups[0]["lr"] != 0.05  # the schedule moved
    assert_same_state(model, twin, adam=True)


# ---------------------------------------------------------------------- 6. GradScaler with bf16 autocast on the CPU


@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["scale-step", "unscale-clip-step"])
@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("inner", ["Adam-fused", "SGD-foreach"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_grad_scaler_with_bf16_autocast(family: str, method: str, inner: str, engine: str, unscale_and_clip: bool) -> None:
    """torch 2.13's ``GradScaler("cpu")`` is enabled and really scales (2^16 by default). The wrapper's
    loop: ``opt.backward(scaler.scale(losses))``, optionally ``scaler.unscale_(opt)`` and
    ``clip_grad_norm_``, then ``scaler.step(opt)``, ``scaler.update()``; plain PyTorch: the surgery of
    the scaled task gradients set as ``.grad``, the same scaler calls. Step 1 overflows one task
    (Inf/NaN gradients with ``nonfinite="propagate"``): both scalers skip the step and halve the scale."""
    model, twin = twins(family)
    opt = wrapper(method, INNER[inner](model.parameters()), nonfinite="propagate", engine=engine)
    plain = INNER[inner](twin.parameters())
    ref = Reference(twin, plain, method)
    scaler, ref_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    for step in range(4):
        batch = FAMILIES[family].batch(step)
        overflow = step == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.losses(batch)
            twin_losses = twin.losses(batch)
        if overflow:
            losses[0] = losses[0] * 1e38  # × 2^16 in the scaler: Inf
            twin_losses[0] = twin_losses[0] * 1e38
        opt.zero_grad()
        opt.backward(scaler.scale(losses))
        plain.zero_grad()
        scaled = ref_scaler.scale(twin_losses)
        if overflow:
            # Plain PyTorch's .grad with an infinite loss: whatever autograd gives; what matters is
            # that both hold a non-finite value so that both scalers skip.
            sum(scaled).backward()
            assert any(not bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
            ref.weights(torch.eye(len(losses), dtype=torch.float64))  # the wrapper's surgery drew PCGrad's orders
        else:
            expected = ref.expected(scaled)
            assert_grads_by_dtype(list(model.parameters()), expected, scale=scaler.get_scale())
            ref.set_grads(expected)
        if unscale_and_clip:
            scaler.unscale_(opt)
            ref_scaler.unscale_(plain)
            norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05) for m in (model, twin)]
            if not overflow:
                torch.testing.assert_close(norms[0], norms[1], **TOLERANCES[torch.float32])
                for p, q in zip(model.parameters(), twin.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, **TOLERANCES[torch.float32])
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        ref_scaler.step(plain)
        scaler.update()
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        if overflow:
            assert scaler.get_scale() == 2.0**15
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a skipped step moved a parameter"
        assert_same_state(model, twin, adam=inner.startswith("Adam"))


# ---------------------------------------------------------------------- 7. float64 default dtype


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["mlp", "transformer", "gru", "orthogonal", "tied_embedding", "vectorised_losses"])
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_float64_default_dtype(family: str, method: str, engine: str, float64_default) -> None:
    model, twin = _train_both(family, method, INNER["AdamW-foreach"], engine=engine)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert_same_state(model, twin, adam=True)


# ---------------------------------------------------------------------- 8. gradient accumulation over micro-batches


ACCUMULATING = ["mlp", "conv_bn_channels_last", "lstm", "tied_embedding", "embedding_sparse", "partial_sharing", "vectorised_losses"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "family, engine",
    [(f, e) for f in ACCUMULATING for e in ("loop", "batched") if not (e == "batched" and f in BATCHING_MAY_REFUSE)],
)
def test_accumulating_two_micro_batches(family: str, engine: str, method: str) -> None:
    """``.grad`` after the first micro-batch is the surgery of its task gradients; after the second,
    the shared ``.grad`` is the surgery of the *accumulated* task gradients (not a sum of two
    surgeries) and task-specific ones are the plain sums. Two such steps, then the parameters."""
    model, twin = twins(family)
    opt = wrapper(method, _sgd(model.parameters()), engine=engine)
    ref = Reference(twin, _sgd(twin.parameters()), method)
    params = list(model.parameters())
    for step in range(2):
        first, second = FAMILIES[family].batch(2 * step), FAMILIES[family].batch(2 * step + 1)
        opt.zero_grad()
        opt.backward(model.wrapper_losses(first))
        first_losses = twin.losses(first)
        assert_grads_by_dtype(params, ref.expected(first_losses))
        opt.backward(model.wrapper_losses(second))
        accumulated = [a + b for a, b in zip(first_losses, twin.losses(second))]
        ref.weights.same_step()
        expected = ref.expected(accumulated)
        assert_grads_by_dtype(params, expected)
        opt.step()
        ref.set_grads(expected)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    assert_same_state(model, twin)


# ---------------------------------------------------------------------- 9. a torch.compile'd model (one compile)


class Compiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.GELU(), nn.Linear(10, 9), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(9, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


@pytest.fixture(scope="module")
def compiled() -> tuple[Compiled, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Compiled()
    return model, torch.compile(model), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_model_cleared_through_the_module_with_fused_adam_and_clipping(method: str, engine: str, compiled) -> None:
    """The compiled graph fuses trunk and heads into one node and the losses come as one ``(T,)``
    tensor; the reference is the eager twin. The batched engine cannot vmap a compiled backward: it
    may refuse, clearly and before any ``.grad`` changes."""
    model, fast, initial = compiled
    model.load_state_dict(initial)
    twin = Compiled()
    twin.load_state_dict(initial)
    try:
        opt = wrapper(method, INNER["Adam-fused"](model.parameters()), engine=engine)
        ref = Reference(twin, INNER["Adam-fused"](twin.parameters()), method)
        for step in range(3):
            x, y = FAMILIES["mlp"].batch(step)
            model.zero_grad()
            losses = ((fast(x) - y) ** 2).mean(0)
            if engine == "batched":
                try:
                    opt.backward(losses)
                except BatchingUnsupportedError as error:
                    assert "batched backward cannot run" in str(error)
                    assert all(p.grad is None for p in model.parameters()), "a refused backward changed .grad"
                    return
            else:
                opt.backward(losses)
            expected = ref.expected([((out - target) ** 2).mean() for out, target in zip(twin(x).unbind(1), y.unbind(1))])
            assert_grads_by_dtype(list(model.parameters()), expected)
            ref.set_grads(expected)
            norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05) for m in (model, twin)]
            torch.testing.assert_close(norms[0], norms[1], **TOLERANCES[torch.float32])
            assert_grads_by_dtype(list(model.parameters()), [p.grad for p in twin.parameters()])
            opt.step()
            ref.optimizer.step()
        assert_same_state(model, twin, adam=True)
    finally:
        model.load_state_dict(initial)


# ---------------------------------------------------------------------- 10. LBFGS: a closure that runs backward


@pytest.mark.parametrize("method", METHODS)
def test_lbfgs_closure(method: str) -> None:
    """``opt.step(closure)``: LBFGS calls the closure several times per step, each a fresh
    ``zero_grad`` + ``backward`` (PCGrad draws on each, as the reference does)."""
    model, twin = twins("mlp")
    opt = wrapper(method, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3))
    plain = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=4, history_size=3)
    ref = Reference(twin, plain, method)
    calls = [0, 0]
    for step in range(2):
        batch = FAMILIES["mlp"].batch(step)

        def closure() -> torch.Tensor:
            calls[0] += 1
            opt.zero_grad()
            losses = model.losses(batch)
            opt.backward(losses)
            return sum(losses).detach()

        def ref_closure() -> torch.Tensor:
            calls[1] += 1
            plain.zero_grad()
            losses = twin.losses(batch)
            ref.set_grads(ref.expected(losses))
            return sum(losses).detach()

        opt.step(closure)
        plain.step(ref_closure)
    assert calls[0] == calls[1] > 2
    assert_same_state(model, twin)


# ---------------------------------------------------------------------- 11. sharing that changes from step to step


class Routed(Zoo):
    """Task-conditional routing: each task reads the trunk and then one of three experts, chosen per
    step by the batch (task-routed mixtures of experts, adapters picked per task and step). An expert
    is shared on the steps where several tasks pick it, one task's on others, unused on the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(self.tasks))

    def losses(self, batch: Batch) -> list[torch.Tensor]:
        x, y, route = batch
        z = self.trunk(x)
        return _regression([head(torch.tanh(self.experts[e](z))) for head, e in zip(self.heads, route)], y)


ROUTES = ((0, 0, 1), (1, 2, 1), (0, 1, 2), (2, 2, 2))


@pytest.mark.parametrize("method", METHODS)
def test_sharing_that_changes_between_steps(method: str) -> None:
    """Plain semantics per step: the parameters several tasks reach on this step are shared; one that
    only one task reaches on this step gets that task's plain gradient (unweighted, and outside the
    Gram matrix), whatever it was on earlier steps; one no task reaches keeps ``None``. Step 2 routes
    every task to its own expert: experts 0 and 1, shared on steps 0 and 1, are task-specific."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Routed())
    model, twin = models
    opt = wrapper(method, torch.optim.SGD(model.parameters(), lr=0.05))
    ref = Reference(twin, torch.optim.SGD(twin.parameters(), lr=0.05), method)
    for step, route in enumerate(ROUTES):
        x, y = FAMILIES["mlp"].batch(step)
        batch = (x, y, route)
        opt.zero_grad()
        opt.backward(model.losses(batch))
        expected = ref.expected(twin.losses(batch))
        try:
            assert_grads_by_dtype(list(model.parameters()), expected)
        except AssertionError as error:
            raise AssertionError(f"step {step}, routes {route}: {error}") from None
        opt.step()
        ref.set_grads(expected)
        ref.optimizer.step()
        ref.optimizer.zero_grad()
    assert_same_state(model, twin)
