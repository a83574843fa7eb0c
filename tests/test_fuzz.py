"""Hypothesis fuzzing of the functional API and the wrappers: only documented exceptions, finite
outputs, and the invariants of STYLE.md."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery as gs
import gradsurgery.functional as F

from .helpers import KINDS, make_J

FUNCTIONAL = {
    "pcgrad": lambda J, **kw: F.pcgrad(J, generator=torch.Generator().manual_seed(0), **kw),
    "cagrad": F.cagrad,
    "mgda": F.mgda,
}


@given(
    method=st.sampled_from(sorted(FUNCTIONAL)),
    T=st.integers(1, 12),
    P=st.integers(1, 300),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    exponent=st.integers(-25, 25),
    seed=st.integers(0, 10_000),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_functional_outputs_are_finite_and_homogeneous(
    method: str, T: int, P: int, kind: str, dtype: torch.dtype, exponent: int, seed: int, reduction: str
) -> None:
    if dtype in (torch.float16, torch.bfloat16):
        exponent = max(-3, min(exponent, 3))  # keep the entries themselves representable
    scale = 10.0**exponent
    J = make_J(kind, T, P, dtype=torch.float64, seed=seed)
    d = FUNCTIONAL[method]((J * scale).to(dtype), reduction=reduction)
    assert d.shape == (P,) and d.dtype == dtype
    assert torch.isfinite(d).all()
    if dtype == torch.float64:
        reference = FUNCTIONAL[method](J, reduction=reduction) * scale
        bound = 1e-6 * T * scale * max(J.abs().max().item(), 1e-300)
        assert (d - reference).abs().max() <= bound


@given(
    name=st.sampled_from(["Sum", "Mean", "PCGrad", "CAGrad", "MGDA"]),
    tasks=st.integers(1, 5),
    micro_batches=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    exponent=st.integers(-6, 6),
    engine=st.sampled_from(["loop", "batched"]),
    seed=st.integers(0, 1000),
)
def test_wrappers_accumulate_and_stay_finite(
    name: str, tasks: int, micro_batches: list[int], exponent: int, engine: str, seed: int
) -> None:
    torch.manual_seed(seed)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(tasks))
    params = [*trunk.parameters(), *heads.parameters()]
    make = {
        "Sum": gs.Sum, "Mean": gs.Mean, "PCGrad": lambda o, **k: gs.PCGrad(o, seed=seed, **k),
        "CAGrad": gs.CAGrad, "MGDA": gs.MGDA,
    }[name]
    opt = make(torch.optim.SGD(params, lr=1e-3), engine=engine)
    scale = 10.0**exponent
    opt.zero_grad()
    for size in micro_batches:
        x = torch.randn(size, 4)
        z = torch.tanh(trunk(x))
        opt.backward([head(z).pow(2).mean() * scale for head in heads])
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
