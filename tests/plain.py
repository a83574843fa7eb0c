"""The reference for wrapper tests, in plain PyTorch: per-task ``torch.autograd.grad`` and each method's
math, with no part of gradsurgery's wrapper machinery (sharing detection, buffers, engines).

A parameter is shared when more than one task's gradient of it is non-zero; its expected ``.grad``
is ``wᵀJ`` with ``J`` the rows of the shared gradients and ``w`` the method's weights for ``J Jᵀ``
(fp64). Every other parameter gets the plain sum of its tasks' gradients; one no task reaches,
``None``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import gradsurgery.functional as F

Weights = Callable[[torch.Tensor], torch.Tensor]


def weights_of(method: str, *, seed: int = 0) -> Weights:
    """The method's weights for a Gram matrix, as the wrappers built by :func:`wrapper` compute them
    on their first step."""
    return {
        "Sum": lambda G: torch.ones(G.shape[0], dtype=torch.float64),
        "PCGrad": lambda G: F.pcgrad_weights(G, generator=torch.Generator(device=G.device).manual_seed(seed)),
        "CAGrad": lambda G: F.cagrad_weights(G),
        "MGDA": lambda G: F.mgda_weights(G),
    }[method]


METHODS = ("Sum", "PCGrad", "CAGrad", "MGDA")


def wrapper(method: str, optimizer: torch.optim.Optimizer, *, seed: int = 0, **options):
    import gradsurgery as gs

    if method == "PCGrad":
        return gs.PCGrad(optimizer, seed=seed, **options)
    return getattr(gs, method)(optimizer, **options)


def expected_grads(
    params: Sequence[torch.Tensor],
    losses: Sequence[torch.Tensor],
    weights: Weights,
    *,
    shared: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """Each parameter's expected ``.grad`` after ``opt.backward(losses)`` from cleared gradients."""
    params = list(params)
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=False) for loss in losses
    ]
    dense = [[None if g is None else (g.to_dense() if g.is_sparse else g) for g in row] for row in per_task]
    if shared is None:
        makers = [[t for t, row in enumerate(dense) if row[i] is not None and bool(row[i].ne(0).any())] for i in range(len(params))]
        shared_index = [i for i, m in enumerate(makers) if len(m) > 1]
    else:
        ids = {id(p) for p in shared}
        shared_index = [i for i, p in enumerate(params) if id(p) in ids]
    out: list[torch.Tensor | None] = [None] * len(params)
    if shared_index:
        rows = [
            torch.cat([(row[i] if row[i] is not None else torch.zeros_like(params[i])).reshape(-1).double() for i in shared_index])
            for row in dense
        ]
        J = torch.stack(rows)
        d = weights(J @ J.T) @ J
        offset = 0
        for i in shared_index:
            n = params[i].numel()
            if any(row[i] is not None for row in dense):
                out[i] = d[offset : offset + n].view_as(params[i]).to(params[i].dtype)
            offset += n
    for i in range(len(params)):
        if i in shared_index:
            continue
        found = [row[i] for row in per_task if row[i] is not None]
        if found:
            total = found[0]
            for g in found[1:]:
                total = total + g
            out[i] = total.detach()
    return out


def assert_grads(params: Sequence[torch.Tensor], expected: Sequence[torch.Tensor | None], *, rtol: float, atol: float) -> None:
    """``.grad`` equals ``expected`` (``None`` where expected is ``None``)."""
    for index, (p, e) in enumerate(zip(params, expected)):
        if e is None:
            assert p.grad is None, f"parameter {index} {tuple(p.shape)}: .grad should stay None"
            continue
        assert p.grad is not None, f"parameter {index} {tuple(p.shape)}: .grad is None"
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        want = e.to_dense() if e.is_sparse else e
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, msg=lambda m: f"parameter {index} {tuple(p.shape)}: {m}")
