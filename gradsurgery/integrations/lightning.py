"""PyTorch Lightning: ``self.manual_backward(losses)`` with ``T`` losses, through Lightning's machinery.

Lightning's ``manual_backward(loss)`` runs the strategy's and the precision plugin's
``pre_backward`` (DDP's reducer, the ``16-mixed`` scaler, the ``on_before_backward`` hooks), then
``LightningModule.backward(loss)``, then ``post_backward`` (the ``on_after_backward`` hooks). With a
list of losses it fails at the first step (``'list' object has no attribute 'backward'``).
:class:`GradSurgeryMixin` keeps that sequence and runs the wrapper's ``backward`` at its centre::

    class Model(GradSurgeryMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            ...

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            losses = ...                      # T scalar losses
            opt.zero_grad()
            self.manual_backward(losses)      # hooks, precision plugin, then the wrapper's backward
            opt.step()
            self.log_dict(opt.diagnostics(flat=True))

        def configure_optimizers(self):
            return gs.PCGrad(torch.optim.Adam(self.parameters(), lr=1e-3), seed=0)

The hooks see the losses stacked into one 1-D tensor (scaled, under ``16-mixed``); the wrapper gets
the losses themselves and, under a precision plugin with a ``GradScaler``, that scaler as ``scaler=``
(so a loss-weighting method scales its objective, not the losses). The wrapper's backward runs
outside the training step's autocast region (``bf16-mixed``, ``16-mixed``), as a backward outside it
would: its Gram matrix and combine stay in the parameters' precision. A scalar ``loss`` goes to
Lightning's own ``manual_backward`` unchanged. Nothing here imports Lightning: the mixin works with
``lightning.pytorch`` and with ``pytorch_lightning``. See ``docs/lightning.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..frameworks import outside_autocast, unwrap
from ..optim import GradSurgery
from ..prepare import Losses, check_losses

__all__ = ["GradSurgeryMixin"]

if TYPE_CHECKING:  # for the type checkers, the mixin is what it is mixed into; at run time, nothing
    from lightning.pytorch import LightningModule as _Host
else:
    _Host = object


@dataclass
class _Pending:
    """The call ``manual_backward`` is carrying through Lightning to :meth:`GradSurgeryMixin.backward`."""

    wrapper: GradSurgery
    losses: list[torch.Tensor]
    features: torch.Tensor | None


class GradSurgeryMixin(_Host):
    """Put before ``LightningModule`` in the bases: ``self.manual_backward(losses)`` (manual
    optimization) computes the task gradients with the module's gradsurgery wrapper, inside
    Lightning's ``manual_backward``: the strategy, the precision plugin and the
    ``on_before_backward`` / ``on_after_backward`` hooks run as for one loss."""

    def manual_backward(
        self,
        loss: torch.Tensor | Losses,
        *args: Any,
        optimizer: Any = None,
        features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """``loss``: one scalar (Lightning's own ``manual_backward``) or ``T`` scalar losses (a sequence
        or a 1-D tensor) for the gradsurgery wrapper.

        ``optimizer``: the wrapper (or ``self.optimizers()``'s proxy of it) when the module has several
        optimizers; by default the one gradsurgery wrapper among them. ``features``: representation
        mode, as the wrapper's ``backward(losses, features=)``.
        """
        if isinstance(loss, torch.Tensor) and loss.dim() == 0:
            if optimizer is not None or features is not None:
                raise ValueError("optimizer= and features= are for several losses; one scalar loss takes neither")
            super().manual_backward(loss, *args, **kwargs)
            return
        if args or kwargs:
            raise TypeError(
                "manual_backward with several losses takes no arguments for Tensor.backward "
                f"(got {len(args)} positional, {sorted(kwargs)}): the wrapper runs the backward passes"
            )
        losses = check_losses(loss)
        wrapper = self._gradsurgery_wrapper(optimizer)
        stacked = torch.stack([value.reshape(()) for value in losses])
        self.__dict__["_gradsurgery_pending"] = _Pending(wrapper, losses, features)
        try:
            super().manual_backward(stacked)
        finally:
            missed = self.__dict__.pop("_gradsurgery_pending", None)
        if missed is not None:
            plugin = type(self.trainer.precision_plugin).__name__
            raise RuntimeError(
                f"Lightning's {plugin} ran the backward pass without calling LightningModule.backward, so the "
                "gradsurgery wrapper never ran: this strategy or precision plugin (DeepSpeed, Fabric) is not supported"
            )

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook: the wrapper's ``backward`` for a call from :meth:`manual_backward`,
        ``loss.backward()`` (the default hook) otherwise."""
        pending = self.__dict__.pop("_gradsurgery_pending", None)
        if pending is None:
            if loss.dim() == 1 and self.automatic_optimization:
                raise TypeError(
                    "training_step returned several losses under automatic optimization, which backpropagates one; "
                    "set self.automatic_optimization = False and call self.manual_backward(losses)"
                )
            super().backward(loss, *args, **kwargs)
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        with outside_autocast(pending.losses):  # the training step's autocast region is still open here
            pending.wrapper.backward(pending.losses, features=pending.features, scaler=scaler)

    def _gradsurgery_wrapper(self, optimizer: Any) -> GradSurgery:
        if optimizer is not None:
            return unwrap(optimizer)
        found = self.optimizers(use_pl_optimizer=False)
        found = found if isinstance(found, list) else [found]
        wrappers = [opt for opt in found if isinstance(opt, GradSurgery)]
        if len(wrappers) != 1:
            names = [type(opt).__name__ for opt in found]
            raise TypeError(
                f"manual_backward with several losses needs the gradsurgery wrapper: configure_optimizers returned "
                f"{names}, {len(wrappers)} of them gradsurgery wrappers; return one (gs.PCGrad(torch.optim.Adam(...)), ...) "
                "or pass optimizer="
            )
        return wrappers[0]
