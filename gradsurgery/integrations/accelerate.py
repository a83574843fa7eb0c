"""Hugging Face Accelerate: what ``accelerator.backward(loss)`` does to one loss, for ``T`` of them.

``accelerator.prepare(model, opt)`` returns an ``AcceleratedOptimizer`` around the wrapper, which has
no ``backward``, and ``accelerator.backward`` takes one loss. Train with::

    model, opt = accelerator.prepare(model, gs.PCGrad(torch.optim.Adam(model.parameters())))
    with accelerator.accumulate(model):
        losses = ...
        gs.backward(opt, losses, accelerator=accelerator)
        opt.step()
        opt.zero_grad()

:func:`gradsurgery.backward` finds the wrapper and calls :func:`accelerated` for the losses and the
scaler; ``step``/``zero_grad`` stay the ``AcceleratedOptimizer``'s (they skip themselves while
accumulating), and ``save_state``/``load_state`` go through the wrapper's ``state_dict``. Nothing here
imports ``accelerate``: the accelerator is read through its public attributes. See ``docs/accelerate.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lossweighting import LossWeightingWrapper
from ..optim import GradSurgery
from ..prepare import Losses, check_losses

__all__ = ["accelerated"]

# Accelerate's own backward runs through these engines instead of loss.backward(): nothing to hand the
# wrapper's per-task gradients to.
UNSUPPORTED = ("DEEPSPEED", "MEGATRON_LM")


class DividedScaler:
    """What a loss-weighting wrapper's ``scaler=`` needs (``scale``): its objective divided by the
    accumulation steps, then scaled by the accelerator's ``GradScaler`` if it has one (the order of
    ``accelerator.backward``: ``scaler.scale(loss / n)``)."""

    def __init__(self, steps: int, scaler: Any) -> None:
        self.steps = steps
        self.scaler = scaler

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        divided = outputs / self.steps
        return divided if self.scaler is None else self.scaler.scale(divided)


def accelerated(accelerator: Any, wrapper: GradSurgery, losses: Losses, scaler: Any) -> tuple[Losses, Any]:
    """The losses and the ``scaler=`` for ``wrapper.backward`` that give what ``accelerator.backward``
    gives one loss."""
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))
    if kind in UNSUPPORTED:
        raise ValueError(
            f"gradsurgery cannot train under Accelerate's {kind} (its engine runs the backward pass itself); "
            "use plain or multi-process (DDP) Accelerate, where the wrapper averages the task gradients itself"
        )
    own = accelerator.scaler
    if own is not None and scaler is not None:
        raise ValueError("the accelerator has a GradScaler of its own: pass accelerator= or scaler=, not both")
    scaler = own if own is not None else scaler
    steps = accelerator.gradient_accumulation_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"accelerator.gradient_accumulation_steps must be a positive integer, got {steps!r}")
    if steps == 1:
        return losses, scaler
    if isinstance(wrapper, LossWeightingWrapper):
        return losses, DividedScaler(steps, scaler)
    # Divided one by one, the losses keep their own graphs (a stacked vector would fuse them).
    return [loss / steps for loss in check_losses(losses)], scaler
