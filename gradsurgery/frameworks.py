"""``gs.backward``: the wrapper's ``backward`` through whatever a training framework hands back.

Frameworks put their own proxy around the optimizer they are given: Lightning's
``self.optimizers()`` is a ``LightningOptimizer`` (its class made a subclass of the wrapper's, the
attributes forwarded), Accelerate's ``accelerator.prepare(model, opt)`` an ``AcceleratedOptimizer``
(no ``backward`` at all). :func:`unwrap` follows ``._optimizer`` / ``.optimizer`` to the wrapper;
:func:`backward` runs the wrapper's ``backward`` there, and with ``accelerator=`` applies what
``accelerator.backward(loss)`` applies to one loss: the division by the gradient-accumulation steps
and the mixed-precision ``GradScaler`` (see :mod:`gradsurgery.integrations.accelerate`).
"""

from __future__ import annotations

from typing import Any

import torch

from .optim import GradSurgery
from .prepare import Losses, check_losses, outside_autocast

__all__ = ["backward", "outside_autocast", "unwrap"]

# A proxy of a proxy of a proxy is plausible (Lightning around Accelerate around the wrapper); more is a cycle.
MAX_DEPTH = 16


def unwrap(optimizer: Any) -> GradSurgery:
    """The gradsurgery wrapper inside ``optimizer``: the wrapper itself, or one reached through the
    ``._optimizer`` / ``.optimizer`` attributes of the proxies around it.

    A proxy that forwards attribute reads (Lightning's) or copies the wrapper's attributes (older
    Lightning) shares the wrapper's state objects, so running on it would work too; unwrapping makes
    every call land on the one object the checkpoints and ``diagnostics()`` read.

    Args:
        optimizer: the wrapper, or a proxy around it (any depth up to 16).

    Returns:
        The wrapper.

    Raises:
        TypeError: no wrapper is found (a plain ``torch.optim`` optimizer, or the wrapper's inner
            optimizer); the message names the chain of types.

    Examples:
        >>> import torch, gradsurgery as gs
        >>> from gradsurgery.frameworks import unwrap
        >>> opt = gs.PCGrad(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
        >>> unwrap(opt) is opt
        True
    """
    chain = []
    current = optimizer
    for _ in range(MAX_DEPTH):
        chain.append(type(current).__name__)
        own = vars(current) if hasattr(current, "__dict__") else {}
        if isinstance(current, GradSurgery) and "_layout" in own:
            return current
        inner = own.get("_optimizer", own.get("optimizer"))
        if inner is None or inner is current:
            if isinstance(current, GradSurgery):  # a forwarding proxy we cannot see through: it shares the state
                return current
            break
        current = inner
    raise TypeError(
        f"expected a gradsurgery wrapper (gs.PCGrad(torch.optim.Adam(...)), ...) or a framework's proxy around one, "
        f"got {' -> '.join(chain)}: wrap the torch optimizer in a gradsurgery wrapper before handing it to the framework"
    )


def backward(
    optimizer: Any,
    losses: Losses,
    *,
    accelerator: Any = None,
    features: torch.Tensor | None = None,
    scaler: Any = None,
) -> None:
    """``optimizer``'s gradsurgery wrapper runs ``backward(losses, features=, scaler=)``.

    Args:
        optimizer: the wrapper, or a framework's proxy around it (Lightning's ``LightningOptimizer``,
            Accelerate's ``AcceleratedOptimizer``; see :func:`unwrap`).
        losses: the ``T`` scalar losses (a sequence, an iterator, or a 1-D tensor).
        accelerator: a Hugging Face ``accelerate.Accelerator``. Its ``backward(loss)`` divides a loss
            by ``gradient_accumulation_steps`` and scales it with its ``GradScaler``; this does the same
            for the ``T`` losses: the gradient methods get ``L_t / n`` and the scaler, a loss-weighting
            method (whose objective is not homogeneous in the losses) its objective divided by ``n``
            and scaled. With ``accumulate(n)`` the shared gradient is then the surgery of the mean of
            the micro-batches' task gradients: that of one batch ``n`` times as large.
        features: representation mode, as the wrapper's ``backward(features=)``.
        scaler: a ``torch.amp.GradScaler``, as the wrapper's ``backward(scaler=)`` (not with an
            accelerator that has one).

    Called inside an autocast region (``accelerator.autocast()``), the backward runs outside it, as
    the wrapper's own ``backward`` does.

    Returns:
        ``None``; the ``.grad`` of the parameters are written as the wrapper's ``backward`` writes them.

    Raises:
        TypeError: no gradsurgery wrapper is inside ``optimizer`` (the message names the chain of types).
        ValueError: an accelerator whose backward runs in its own engine (DeepSpeed, Megatron-LM), or
            what the wrapper's ``backward`` refuses (bad losses, non-finite gradients).

    Examples:
        >>> import torch, gradsurgery as gs
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
        >>> opt = gs.MGDA(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1))
        >>> features = trunk(torch.randn(16, 4))
        >>> gs.backward(opt, [head(features).pow(2).mean() for head in heads])  # the same as opt.backward(...)
        >>> opt.step()
    """
    wrapper = unwrap(optimizer)
    if not isinstance(losses, torch.Tensor):
        losses = list(losses)  # an iterator is read more than once below
    if accelerator is not None:
        from .integrations.accelerate import accelerated

        losses, scaler = accelerated(accelerator, wrapper, losses, scaler)
    with outside_autocast(losses):
        wrapper.backward(losses, features=features, scaler=scaler)


