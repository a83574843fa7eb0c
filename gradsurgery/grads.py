"""Writing ``.grad`` the way ``loss.backward()`` does, and noticing when someone else wrote it.

Two rules of plain PyTorch that fused optimizers and frameworks rely on:

- a new ``.grad`` has its parameter's memory layout when the parameter is dense (channels_last
  convolutions, transposed weights): ``torch.optim``'s fused and foreach kernels read the raw memory of
  a parameter and its gradient side by side;
- ``.grad`` belongs to the user between ``backward`` calls: whoever clears it (``model.zero_grad()``,
  a framework, ``set_to_none=False``) or changes it (clipping, unscaling) decides what the next
  ``backward`` accumulates onto.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def grad_strides(p: torch.Tensor) -> tuple[int, ...]:
    """The strides ``loss.backward()`` gives a new ``.grad`` of ``p``: ``p``'s own when ``p`` is
    non-overlapping and dense (any permutation of a contiguous layout), contiguous otherwise."""
    return torch.empty_like(p, device="meta").stride()


def new_grad(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A fresh gradient tensor of ``p`` holding ``value`` (a sparse ``value`` stays sparse)."""
    if value.is_sparse:
        return value.detach().clone()
    grad = torch.empty_strided(p.shape, grad_strides(p), dtype=p.dtype, device=p.device)
    return grad.copy_(value)


def accumulate_plain(pairs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
    """``p.grad += Σ grads`` (a new ``.grad`` in ``p``'s layout when it is ``None``), as
    ``loss.backward()`` accumulates. Sparse gradients (``nn.Embedding(sparse=True)``) stay sparse.

    Like ``loss.backward()``, a fresh gradient that nothing else holds becomes ``.grad`` itself
    instead of a copy: one that owns its whole storage (not a view), already in ``p``'s layout, not
    given to another parameter in the same call, and of a parameter without tensor hooks (a hook may
    have kept the gradient it was given: ``.grad`` must not alias it)."""
    handed: set[int] = set()  # storages that became a .grad in this call
    for p, grads in pairs:
        if not grads:
            continue
        total = grads[0]
        if len(grads) > 1:
            if any(g.is_sparse for g in grads):
                for g in grads[1:]:
                    total = total + g
            else:
                total = torch.stack([g.detach() for g in grads]).sum(0)
        if p.grad is None:
            value = total.detach()
            p.grad = value if _can_hand_over(p, value, handed) else new_grad(p, value)
        elif p.grad.is_sparse and not total.is_sparse:
            p.grad = p.grad + total.detach()
        else:
            p.grad.add_(total.detach())


def _can_hand_over(p: torch.Tensor, value: torch.Tensor, handed: set[int]) -> bool:
    if value.is_sparse or value.requires_grad or value._base is not None or value.storage_offset() != 0:
        return False
    if p._backward_hooks:
        return False
    if value.dtype != p.dtype or value.device != p.device or value.stride() != grad_strides(p):
        return False
    storage = value.untyped_storage()
    if storage.nbytes() != value.numel() * value.element_size() or storage.data_ptr() in handed:
        return False
    handed.add(storage.data_ptr())
    return True


def dense(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as a strided tensor (sparse gradients of shared parameters are densified)."""
    return grad.to_dense() if grad.is_sparse else grad


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each gradient as one float64 vector on the first one's device (sparse ones by
    their stored values), in one fused pass."""
    return _norms(grads, 2.0)


def grad_peaks(grads: list[torch.Tensor]) -> torch.Tensor:
    """The largest magnitude of each gradient, like :func:`grad_norms`: finite exactly when the
    gradient is, and non-zero exactly when it is (a 2-norm of fp32 entries overflows beyond ~1e19 and
    underflows below ~1e-19). What the non-finite checks and the sharing read."""
    return _norms(grads, float("inf"))


def _norms(grads: list[torch.Tensor], order: float) -> torch.Tensor:
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    device = grads[0].device
    strided = [g._values() if g.is_sparse else g for g in grads]
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in torch._foreach_norm(strided, ord=order)])


@dataclass
class Written:
    """What the wrapper left in the shared parameters' ``.grad`` after its last write: per parameter
    the tensor object and its version counter (``None``: ``.grad`` was left ``None``)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    versions: list[int | None]

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> Written:
        grads = [p.grad for p in params]
        return cls(list(params), grads, [None if g is None else g._version for g in grads])

    def untouched(self) -> bool:
        """Whether every ``.grad`` is still the same tensor, unmodified in place since then (views of
        one buffer share a version counter, so a change to any of them counts for all)."""
        for p, grad, version in zip(self.params, self.grads, self.versions):
            if p.grad is not grad or (grad is not None and grad._version != version):
                return False
        return True
