"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019).

A task whose loss has been falling more slowly than the others' gets more weight. With ``L̄_t(k)`` the
average loss of task ``t`` over period ``k`` and ``r_t = L̄_t(k−1) / L̄_t(k−2)`` its last ratio, the
weights for every step of period ``k`` are ::

    w_t = T · softmax(r / temperature)_t          (Σ_t w_t = T: the sum scale)

and each step backpropagates ``Σ_t w_t L_t`` once (``w`` carries no gradient). Until two periods have
been averaged, ``w = 1``: naive summation. ``temperature`` (default ``2.0``, the paper's) smooths the
softmax: large values give uniform weights.

**Periods, not epochs.** The paper, the official code (lorenmt/mtan) and LibMTL average the training
losses over each *epoch*, so the weights change once per epoch and the first two epochs are unweighted;
TorchJD's ``DWA`` does the same with an explicit ``step()`` at each epoch's end. The wrapper sees one
mini-batch at a time and does not know the epoch, so the average is taken over ``period`` consecutive
``backward()`` calls (default ``1``: the ratios are per step, ``r_t = L_t(k−1) / L_t(k−2)`` of single
mini-batch losses, and the first two steps are unweighted). Per-step ratios carry the mini-batch noise
of both losses; ``period=len(loader)`` (one ``backward()`` per batch) reproduces the official epoch
averages exactly, and any ``period`` in between smooths the ratios over that many batches. A period
counts ``backward()`` calls, so with gradient accumulation it counts micro-batches. The ratios assume
losses that keep one sign (the paper's losses are positive); a zero average gives non-finite weights,
which the ``nonfinite`` policy handles.

The state (saved in ``state_dict()``): the two last period averages, the running sum of the current
period and the number of ``backward()`` calls so far, in float64.
"""

from __future__ import annotations

import torch

from .spec import Method, Objective, Option, finite_number, positive_int

BIBTEX = """@inproceedings{liu2019end,
  title     = {End-to-End Multi-Task Learning with Attention},
  author    = {Liu, Shikun and Johns, Edward and Davison, Andrew J.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  pages     = {1871--1880},
  year      = {2019},
  doi       = {10.1109/CVPR.2019.00197}
}"""


def dwa_state(T: int, device: torch.device) -> dict[str, torch.Tensor]:
    """No average yet (ones, so that the unused ratio stays finite), an empty period, no call."""
    return {
        "averages": torch.ones(2, T, dtype=torch.float64, device=device),  # [older, newer]
        "running": torch.zeros(T, dtype=torch.float64, device=device),
        "calls": torch.zeros(T, dtype=torch.float64, device=device),  # every entry the same count
    }


def dwa_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], temperature: float, period: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t w_t L_t`` with the weights of the two last complete periods, and the state after this call."""
    T = losses.shape[0]
    values = losses.detach().to(torch.float64)
    averages, running, calls = state["averages"], state["running"], state["calls"]
    older, newer = averages.unbind(0)
    ready = calls >= 2 * period  # two periods complete before this call
    weights = torch.where(ready, torch.softmax(newer / older / temperature, dim=0) * T, 1.0)
    running = running + values
    closes = torch.remainder(calls + 1, period) == 0
    averages = torch.where(closes, torch.stack([newer, running / period]), averages)
    new_state = {"averages": averages, "running": torch.where(closes, 0.0, running), "calls": calls + 1}
    return (weights * losses.to(torch.float64)).sum(), new_state


METHOD = Method(
    name="DWA",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("temperature", 2.0, finite_number("temperature", low=0.0, low_open=True), "softmax temperature (the paper's 2.0)"),
        Option("period", 1, positive_int("period"), "backward() calls averaged into one ratio (len(loader): the paper's epochs)"),
    ),
    loss=Objective(objective=dwa_objective, init=dwa_state),
)
