"""Functional API: ``J (T, P) → d (P,)`` and ``G (T, T) → w (T,)``.

Each ``J`` function is Gram → weights → combine: two passes over ``J`` and a ``T × T`` solve. The
``*_weights`` functions take the Gram matrix directly. Keyword names and defaults match the wrappers.

Inputs are checked for NaN/Inf through the Gram matrix's diagonal (``T`` values, no extra pass over
``J``, one host synchronisation; a second only when that diagonal is out of range; the wrappers with
``nonfinite="propagate"`` have none). A non-finite input raises
:class:`~gradsurgery.errors.NonFiniteGradientError` naming the tasks. A Gram matrix that overflowed
or underflowed in fp32 although ``J`` is finite is recomputed with the rows scaled first (see
:func:`gradsurgery.backend.gram`), so magnitudes from 1e-30 to 1e30 work in fp32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import backend as _backend
from .errors import NonFiniteGradientError
from .methods import cagrad as _cagrad
from .methods import mgda as _mgda
from .methods import pcgrad as _pcgrad
from .methods._common import check_gram, check_reduction
from .methods._simplex import DEFAULT_ITERATIONS

Losses = torch.Tensor | Sequence[float] | None

__all__ = ["aggregate", "cagrad", "cagrad_weights", "gram", "mgda", "mgda_weights", "pcgrad", "pcgrad_weights"]


def gram(J: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``G = J Jᵀ`` (fp32 accumulation; fp64 for fp64 ``J``)."""
    _check_J(J)
    return _backend.gram(J, backend=backend)


def aggregate(
    J: torch.Tensor,
    weights_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``d = weights_of(G)ᵀ J`` with ``G = J Jᵀ``: any Gram-space method applied to ``J``."""
    _check_J(J)
    _backend.check_backend(backend, J.device)
    G, in_range = _backend.rescued(J, _backend.gram(J, backend=backend))
    if not in_range:  # the common case reads G back once, in the rescue check
        check_finite_gram(G)
    w = weights_of(G)
    if out is None:
        out = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
    # A Gram rescued in fp64: rows (and so weights) beyond what fp32 can multiply, combined in fp64.
    wide = G.dtype == torch.float64 and J.dtype != torch.float64
    return _backend.combine(w, J, out, backend=backend, wide=wide)


def pcgrad(
    J: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """PCGrad update of the rows of ``J`` (see :mod:`gradsurgery.methods.pcgrad`)."""
    check_reduction(reduction)

    def weights_of(G: torch.Tensor) -> torch.Tensor:
        chains = _backend.solvers(backend, G).get("pcgrad")
        return _pcgrad.pcgrad_weights(G, generator=generator, reduction=reduction, chains=chains)

    return aggregate(J, weights_of, out=out, backend=backend)


def cagrad(
    J: torch.Tensor,
    *,
    c: float = 0.4,
    rescale: str | None = "1+c^2",
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CAGrad update of the rows of ``J`` (see :mod:`gradsurgery.methods.cagrad`)."""
    _cagrad.check_cagrad_options(c, rescale)
    check_reduction(reduction)

    def weights_of(G: torch.Tensor) -> torch.Tensor:
        solve = _backend.solvers(backend, G).get("cagrad")
        return _cagrad.cagrad_weights(G, c=c, rescale=rescale, reduction=reduction, max_iter=max_iter, solve=solve)

    return aggregate(J, weights_of, out=out, backend=backend)


def mgda(
    J: torch.Tensor,
    *,
    normalization: str = "none",
    losses: Losses = None,
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MGDA update of the rows of ``J`` (see :mod:`gradsurgery.methods.mgda`)."""
    _mgda.check_normalization(normalization)
    check_reduction(reduction)
    if normalization in ("loss", "loss+") and losses is None:
        raise ValueError(f'normalization="{normalization}" needs the loss values: pass losses=')

    def weights_of(G: torch.Tensor) -> torch.Tensor:
        solve = _backend.solvers(backend, G).get("mgda")
        return _mgda.mgda_weights(
            G, normalization=normalization, losses=losses, reduction=reduction, max_iter=max_iter, solve=solve
        )

    return aggregate(J, weights_of, out=out, backend=backend)


def pcgrad_weights(
    G: torch.Tensor, *, generator: torch.Generator | None = None, reduction: str = "sum", backend: str = "auto"
) -> torch.Tensor:
    """PCGrad weights from the Gram matrix (pass a generator on G's device: no copy, no sync)."""
    _check_G(G)
    chains = _backend.solvers(backend, G).get("pcgrad")
    return _pcgrad.pcgrad_weights(G, generator=generator, reduction=reduction, chains=chains)


def cagrad_weights(
    G: torch.Tensor,
    *,
    c: float = 0.4,
    rescale: str | None = "1+c^2",
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    backend: str = "auto",
) -> torch.Tensor:
    """CAGrad weights from the Gram matrix."""
    _check_G(G)
    solve = _backend.solvers(backend, G).get("cagrad")
    return _cagrad.cagrad_weights(G, c=c, rescale=rescale, reduction=reduction, max_iter=max_iter, solve=solve)


def mgda_weights(
    G: torch.Tensor,
    *,
    normalization: str = "none",
    losses: Losses = None,
    reduction: str = "sum",
    max_iter: int = DEFAULT_ITERATIONS,
    backend: str = "auto",
) -> torch.Tensor:
    """MGDA weights from the Gram matrix."""
    _check_G(G)
    solve = _backend.solvers(backend, G).get("mgda")
    return _mgda.mgda_weights(
        G, normalization=normalization, losses=losses, reduction=reduction, max_iter=max_iter, solve=solve
    )


def check_finite_gram(G: torch.Tensor) -> None:
    """Raise :class:`NonFiniteGradientError` naming the tasks whose gradients are non-finite (host sync).

    A NaN/Inf in row ``t`` of ``J`` makes ``G[t, t]`` non-finite and, through it, the whole row and
    column ``t``: the diagonal names exactly those tasks. A ``G`` that is non-finite only off the
    diagonal (given directly, not computed from ``J``) names the tasks of its non-finite rows.
    """
    finite = torch.isfinite(G)
    if bool(finite.all()):
        return
    bad = ~finite.diagonal()
    if not bool(bad.any()):
        bad = ~finite.all(dim=1)
    tasks = bad.nonzero().flatten().tolist()
    raise NonFiniteGradientError(
        f"non-finite gradient (NaN/Inf, or a squared norm that overflows {G.dtype}) for task(s) {tasks}",
        tasks=tasks,
    )


def _check_J(J: torch.Tensor) -> None:
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"J must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() != 2:
        raise ValueError(f"J must be 2-D (T, P), got shape {tuple(J.shape)}")
    if J.shape[0] == 0:
        raise ValueError("J has T = 0 rows: there must be at least one task")
    if not J.dtype.is_floating_point:
        raise ValueError(f"J must be floating point, got dtype {J.dtype}")
    if J.is_meta:
        raise ValueError("J is a meta tensor (shape only, no values): pass the task gradients themselves")
    if J.requires_grad:
        raise ValueError(
            "J requires grad: the functional API is not differentiable; pass J.detach() (the task gradients as data)"
        )


def _check_G(G: torch.Tensor) -> None:
    check_gram(G)
    check_finite_gram(G)
