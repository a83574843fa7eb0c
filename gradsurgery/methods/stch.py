"""STCH: smooth Tchebycheff scalarization (Lin et al., ICML 2024).

The Tchebycheff scalarization minimises the worst task, ``max_t (L_t − z*_t)`` for an ideal point
``z*``; STCH smooths the maximum with a log-sum-exp of temperature ``μ`` and backpropagates, once, ::

    T · μ · log Σ_t exp((L_t − z*_t) / μ)

The model receives ``Σ_t w_t ∇L_t`` with ``w = T · softmax((L − z*) / μ)``: the tasks furthest above
their ideal get the most weight, all of it as ``μ → 0``, uniform weights as ``μ → ∞``. The factor ``T``
(the official MTL code's ``* self.task_num``) puts it on the sum scale: the weights sum to ``T``, and
equal shifted losses give naive summation (``reduction="mean"`` drops the factor: weights summing to 1).
Uniform preferences (the paper's ``λ_t``, here 1) are the only ones offered.

- ``mu`` (default ``1.0``, the official MTL code's and LibMTL's ``STCH_mu``; the paper reports
  ``μ ∈ {0.01, 0.1, 0.5, 1}`` without one best value): on the raw losses ``μ`` is in the losses' unit.
- ``ideal``: ``"zero"`` (default; TorchJD's default reference, and what the official MTL code
  subtracts) or ``"running_min"``: each task's smallest loss so far, this step's included (no
  gradient), kept in the state.
- ``warmup`` (default ``0``): the official MTL recipe when ``> 0``. For the first ``warmup``
  ``backward()`` calls the objective is ``Σ_t log L_t``; the mean of those calls' losses becomes the
  nadir point ``n``, and from then on STCH runs on the log-normalised losses ``log(L_t / n_t)``:
  ``T·μ·log Σ_t exp((log(L_t/n_t) − z*_t)/μ)``, with ``z* = 0`` (``"zero"``, the official code) or
  ``log(min_t/n_t)`` (``"running_min"``). Its weights are ``T·softmax(…)_t / L_t``. The official code
  (Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``; LibMTL's is the same) counts the warm-up in epochs
  (``STCH_warmup_epoch = 4``: four epochs of ``Σ log L``, then a fifth whose mean loss is the nadir,
  STCH from the sixth) and adds ``1e-20`` inside each logarithm; here the warm-up counts ``backward()``
  calls and every warm-up call enters the nadir: ``warmup = 5 * len(loader)`` approximates it. With
  ``warmup > 0`` the objective takes logarithms: a loss ≤ 0 is refused, naming the task.

TorchJD's ``STCH(mu, weights, reference)`` is the scalarization on the values as given, with the
preferences ``1/T`` inside the exponent (``μ·log Σ exp((L − z*)/(T·μ))``: ours with ``μ' = T·μ``,
divided by ``T²``), no warm-up and no running ideal point.

The state (float64, saved in ``state_dict()``): the number of calls, the sum of the warm-up losses and
the running minimum.
"""

from __future__ import annotations

from typing import Any

import torch

from .spec import Method, Objective, Option, finite_number, one_of

BIBTEX = """@inproceedings{lin2024smooth,
  title     = {Smooth {Tchebycheff} Scalarization for Multi-Objective Optimization},
  author    = {Lin, Xi and Zhang, Xiaoyuan and Yang, Zhiyuan and Liu, Fei and Wang, Zhenkun and Zhang, Qingfu},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {235},
  pages     = {30479--30509},
  year      = {2024}
}"""

IDEALS = ("zero", "running_min")


def _non_negative_int(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"warmup must be an integer ≥ 0, got {value!r}")


def stch_state(T: int, device: torch.device) -> dict[str, torch.Tensor]:
    def full(value: float) -> torch.Tensor:
        return torch.full((T,), value, dtype=torch.float64, device=device)

    return {"calls": full(0.0), "warmup_sum": full(0.0), "minimum": full(float("inf"))}


def stch_objective(
    losses: torch.Tensor, *, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], mu: float, ideal: str, warmup: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The smoothed maximum of the shifted losses on the sum scale (after the warm-up, if any)."""
    T = losses.shape[0]
    values = losses.to(torch.float64)
    current = values.detach()
    calls = state["calls"]
    minimum = torch.minimum(state["minimum"], current)
    new_state = {"calls": calls + 1, "warmup_sum": state["warmup_sum"], "minimum": minimum}
    if warmup == 0:
        shifted = values - minimum if ideal == "running_min" else values
        return torch.logsumexp(shifted / mu, dim=0) * (T * mu), new_state
    warming = calls < warmup
    new_state["warmup_sum"] = torch.where(warming, state["warmup_sum"] + current, state["warmup_sum"])
    # While warming, the STCH branch is computed but not used: a placeholder nadir keeps it finite.
    nadir = torch.where(warming, 1.0, state["warmup_sum"] / warmup)
    logs = torch.log(values)
    shifted = logs - torch.log(minimum if ideal == "running_min" else nadir)
    smooth_max = torch.logsumexp(shifted / mu, dim=0) * (T * mu)
    return torch.where(warming[0], logs.sum(), smooth_max), new_state


METHOD = Method(
    name="STCH",
    function=None,
    weights=None,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option("mu", 1.0, finite_number("mu", low=0.0, low_open=True), "smoothing of the maximum (official MTL default 1.0)"),
        Option("ideal", "zero", one_of("ideal", IDEALS), "ideal point: 0, or each task's running minimum"),
        Option("warmup", 0, _non_negative_int, "backward() calls of Σ log L whose mean loss is the nadir (0: none)", annotation="int"),
    ),
    loss=Objective(objective=stch_objective, init=stch_state, positive=lambda options: options["warmup"] > 0),
)
