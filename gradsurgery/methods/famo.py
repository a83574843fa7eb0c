"""FAMO: fast adaptive multitask optimization (Liu, Feng, Stone & Liu, NeurIPS 2023).

FAMO keeps task logits ``ξ`` (``z = softmax(ξ)``) and backpropagates, once per step, ::

    T · Σ_t z_t log(L_t + ε) / c,      c = Σ_t z_t / (L_t + ε)   (c and z carry no gradient)

so the model receives ``Σ_t w_t ∇L_t`` with ``w_t = T·z_t / (c·(L_t + ε))``: a convex combination of the
gradients of the log-losses, put on the sum scale (``Σ_t w_t = T``; ``reduction="mean"`` gives the
official scale, weights summing to 1). ``ε = 1e-8`` as in the official code.

The logits learn from how much each loss fell: with ``δ_t = log(L_t^before + ε) − log(L_t^after + ε)``,
``ξ`` takes one Adam step (``lr = w_lr``, L2 weight decay ``gamma``, β = (0.9, 0.999), eps 1e-8:
``torch.optim.Adam``'s update, written out on ``ξ``) along the gradient of ``softmax(ξ)`` in the
direction ``δ``, ``(∂z/∂ξ)ᵀδ = z ⊙ (δ − zᵀδ)``: a task whose loss fell less gains weight.

**Before and after.** The official code (Cranial-XIX/FAMO: ``famo.py`` and the NYUv2/CelebA/QM9
trainers) and TorchJD's ``FAMO.update`` measure ``δ`` on the *same* batch: after ``optimizer.step()``
they run a second forward pass on it and call ``update(new_losses)`` (LibMTL's ``FAMO.update_w`` takes
the same argument). The wrapper sees one set of losses per ``backward()`` and runs no extra forward,
so here "after" is the *next* step's losses: each ``backward()`` first updates ``ξ`` with the previous
call's losses as "before" and its own as "after" (nothing on the first call), then forms the objective
with the new ``z``. ``δ`` therefore also holds the change from one batch to the next (mini-batch
noise), and the second forward pass is saved. A ``backward()`` is one step, so with gradient
accumulation ``ξ`` moves per micro-batch.

**Defaults.** ``w_lr = 0.025`` (every official script, LibMTL, TorchJD). ``gamma = 0.001``: LibMTL's and
TorchJD's default and the official QM9 script's; the official ``famo.py`` and command-line default is
``0.01`` (the CelebA script), and its ``weight_methods.FAMO`` class default ``1e-5``. The official
``min_losses`` lower bounds (zero by default) are not an option: pass ``L_t − b_t`` as the loss. The
official ``max_norm = 1`` gradient clipping is not part of the method here (clip before ``step()`` if
wanted; the official trainers' ``weight_methods.py`` calls ``clip_grad_norm_`` before
``loss.backward()``, so it does not clip that step's gradient). The losses must be positive (the
wrapper refuses a loss ≤ 0).

The state (saved in ``state_dict()``, float64): ``ξ``, Adam's two moments, the number of calls, and the
last call's losses.
"""

from __future__ import annotations

import torch

from .spec import Method, Objective, Option, finite_number

BIBTEX = """@inproceedings{liu2023famo,
  title     = {{FAMO}: Fast Adaptive Multitask Optimization},
  author    = {Liu, Bo and Feng, Yihao and Stone, Peter and Liu, Qiang},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {36},
  year      = {2023}
}"""

EPSILON = 1e-8  # the official code's shift inside the logarithms
BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the official code uses them
ADAM_EPS = 1e-8


def famo_state(T: int, device: torch.device) -> dict[str, torch.Tensor]:
    def zeros() -> torch.Tensor:
        return torch.zeros(T, dtype=torch.float64, device=device)

    return {"logits": zeros(), "exp_avg": zeros(), "exp_avg_sq": zeros(), "calls": zeros(), "previous": zeros() + 1}


def famo_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], w_lr: float, gamma: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Update ``ξ`` from the previous call's losses to these, then FAMO's objective with the new ``z``."""
    T = losses.shape[0]
    values = losses.to(torch.float64)
    current = values.detach()
    logits, calls = state["logits"], state["calls"]
    beta1, beta2 = BETAS
    z = torch.softmax(logits, dim=0)
    delta = torch.log(state["previous"] + EPSILON) - torch.log(current + EPSILON)
    grad = z * (delta - (z * delta).sum()) + gamma * logits
    exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * (grad * grad)
    step = calls.clamp_min(1.0)  # this is Adam's step `calls` (the first update is on the second call)
    denom = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + ADAM_EPS
    stepped = logits - w_lr / (1 - beta1**step) * (exp_avg / denom)
    update = calls >= 1
    logits = torch.where(update, stepped, logits)
    new_state = {
        "logits": logits,
        "exp_avg": torch.where(update, exp_avg, state["exp_avg"]),
        "exp_avg_sq": torch.where(update, exp_avg_sq, state["exp_avg_sq"]),
        "calls": calls + 1,
        "previous": current,
    }
    z = torch.softmax(logits, dim=0)
    shifted = values + EPSILON
    c = (z / shifted.detach()).sum()
    return (z * torch.log(shifted)).sum() * (T / c), new_state


METHOD = Method(
    name="FAMO",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("w_lr", 0.025, finite_number("w_lr", low=0.0, low_open=True), "Adam learning rate of the task logits"),
        Option("gamma", 0.001, finite_number("gamma", low=0.0), "Adam (L2) weight decay of the task logits"),
    ),
    loss=Objective(objective=famo_objective, init=famo_state, positive=True),
)
