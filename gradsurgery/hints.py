"""The types of the public API: each option that takes one of a few strings is a ``Literal`` (so that
``reduction="avg"`` is caught by mypy or pyright in user code, not at run time), and the reports of
``diagnostics()`` are ``TypedDict``\\ s. The tuples the run-time checks use are read off these types, so
a choice is written once.
"""

# No ``from __future__ import annotations`` here: TypedDict reads NotRequired[...] off the evaluated
# annotations (with strings, every key would count as required at run time).
from typing import Literal, Sequence, Union, get_args

import torch
from typing_extensions import NotRequired, TypedDict

Reduction = Literal["sum", "mean"]
"""The scale of the combined update: ``"sum"`` (as ``sum(losses).backward()``) or ``"mean"`` (÷ T)."""

NonFinite = Literal["raise", "skip", "propagate"]
"""What a wrapper does with a NaN/Inf task gradient (see the README's non-finite policy)."""

Engine = Literal["loop", "batched", "auto"]
"""How the per-task gradients are computed: ``T`` backward calls, or one batched (vmap) call."""

Backend = Literal["auto", "torch", "triton"]
"""Where the Gram matrix and the combine run: ``"auto"`` picks Triton for CUDA tensors when it imports."""

Sync = Literal["exact", "local", "sharded"]
"""How the task gradients are synchronised under ``torch.distributed``."""

GranularityName = Literal["all", "parameter", "module"]

Granularity = Union[GranularityName, torch.nn.Module, Sequence[Sequence[torch.Tensor]]]
"""``granularity=``: a name, a module (its layers are the blocks) or a list of parameter groups."""

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinite)
ENGINES: tuple[str, ...] = get_args(Engine)
BACKENDS: tuple[str, ...] = get_args(Backend)
SYNC_MODES: tuple[str, ...] = get_args(Sync)
GRANULARITIES: tuple[str, ...] = get_args(GranularityName)


class Diagnostics(TypedDict):
    """``diagnostics()`` of a gradient method: the last step's task geometry, from its Gram matrix.

    ``norms[t]`` is ``‖g_t‖``, ``cosine[i][j]`` the cosine of ``g_i`` and ``g_j`` (0 where a gradient is
    zero), ``conflicts`` the number of pairs ``i < j`` with ``⟨g_i, g_j⟩ < 0``, over the whole shared
    gradient. ``weights`` are the method's weights (absent for an elementwise method such as GradDrop,
    and at the top level with ``granularity=``, where each block has its own); ``refreshed`` whether
    the step solved for new weights (``every=`` > 1 only); ``blocks`` one report per block, in the
    order of ``opt.blocks`` (``granularity=`` only).
    """

    norms: list[float]
    cosine: list[list[float]]
    conflicts: int
    weights: NotRequired[list[float]]
    refreshed: NotRequired[bool]
    blocks: NotRequired[list["Diagnostics"]]


class LossWeightingDiagnostics(TypedDict):
    """``diagnostics()`` of a loss-weighting method: its effective weights ``∂objective/∂L_t`` (there
    is no Gram matrix: no per-task gradient is computed)."""

    weights: list[float]
