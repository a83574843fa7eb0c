"""What ``loss.backward()`` does beyond the optimizer's parameters, done for the wrappers too.

The wrappers differentiate the losses with ``torch.autograd.grad`` on the wrapped optimizer's
parameters. Left at that, two things that plain PyTorch does would silently not happen:

- every other leaf that requires grad and that the losses reach gets its gradient accumulated into
  ``.grad``: a second optimizer's parameters (dense layers with Adam beside embeddings with
  SparseAdam), learnable loss weights kept in their own optimizer, an input with
  ``requires_grad=True`` (adversarial training);
- a parameter's ``register_post_accumulate_grad_hook`` hooks run once its ``.grad`` is accumulated
  (optimizer-in-backward, gradient logging).

So each ``backward`` walks the losses' graph once: the other leaves get the gradient of what the
method backpropagates (``Σ_t L_t`` for the gradient methods, their objective for loss weighting),
accumulated as ``loss.backward()`` would, and the post-accumulate hooks of every leaf that received a
gradient run after the wrapper has written it. For the gradient methods the other leaves cost one
more backward pass, restricted to the paths that lead to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grads import accumulate_plain
from .prepare import REENTRANT_CHECKPOINT, _walk, is_reentrant_checkpoint


@dataclass
class Beyond:
    """The leaves of one ``backward`` call's graph that need more than the wrapper's own gradients."""

    leaves: list[torch.Tensor]  # require grad, reached, not held by the optimizer
    hooked: list[torch.Tensor]  # the optimizer's parameters reached whose post-accumulate hooks must run

    def __bool__(self) -> bool:
        return bool(self.leaves or self.hooked)


def beyond(roots: list[torch.Tensor], params: list[torch.Tensor]) -> Beyond:
    """The leaves reached from ``roots`` that ``params`` (every parameter the optimizer holds) lacks,
    and those of ``params`` reached that carry post-accumulate-grad hooks. One walk of the graph."""
    held = {id(p) for p in params}
    leaves: list[torch.Tensor] = []
    hooked: list[torch.Tensor] = []
    reentrant = False
    for node in _walk(roots):
        variable = getattr(node, "variable", None)
        if variable is None:
            reentrant = reentrant or is_reentrant_checkpoint(node)
            continue
        if id(variable) not in held:
            if variable.requires_grad:
                leaves.append(variable)
        elif getattr(variable, "_post_accumulate_grad_hooks", None):
            hooked.append(variable)
    if reentrant and leaves:  # torch.autograd.grad cannot go through it (the wrapper refuses it anyway)
        raise ValueError(REENTRANT_CHECKPOINT)
    return Beyond(leaves, hooked)


def gradients(roots: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients of ``Σ roots`` at ``leaves``, keeping the graph for the wrapper's own passes."""
    if not leaves:
        return []
    ones = [torch.ones_like(root) for root in roots]
    return list(torch.autograd.grad(roots, leaves, grad_outputs=ones, retain_graph=True, allow_unused=True))


def accumulate(leaves: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Add ``grads`` into the leaves' ``.grad`` as ``loss.backward()`` would."""
    accumulate_plain([(leaf, [g]) for leaf, g in zip(leaves, grads) if g is not None])


def run_post_accumulate_hooks(tensors: list[torch.Tensor]) -> None:
    """Run each tensor's post-accumulate-grad hooks, in registration order, if it has a ``.grad``."""
    for tensor in tensors:
        hooks = getattr(tensor, "_post_accumulate_grad_hooks", None)
        if hooks and tensor.grad is not None:
            for hook in list(hooks.values()):
                hook(tensor)

