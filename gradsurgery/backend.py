"""The one dispatch point between the PyTorch references and the Triton kernels.

``backend="auto"`` runs Triton for CUDA tensors when Triton imports (fp64 and more than
``kernels.MAX_TASKS`` tasks stay on PyTorch), PyTorch otherwise; ``"triton"``
where Triton cannot run raises instead of falling back; ``"torch"`` always runs the references.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import kernels
from .hints import BACKENDS
from .kernels.blocks import BlockLayout, combine_blocks_reference, gram_blocks_reference
from .kernels.combine import combine_reference_unchecked



def check_backend(backend: str, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` for an unknown backend, or for ``"triton"`` where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not kernels.triton_available():
            raise ValueError('backend="triton" needs Triton: pip install "gradsurgery[triton]"')
        if device is not None and not kernels.triton_runs_on(torch.device(device)):
            raise ValueError(
                f'backend="triton" cannot run on {device}: Triton needs a CUDA device '
                "(or its interpreter, TRITON_INTERPRET=1, for CPU tensors)"
            )


def resolve(backend: str, J: torch.Tensor) -> str:
    """The backend that will process ``J``: ``"torch"`` or ``"triton"``."""
    check_backend(backend, J.device)
    if backend != "auto":
        return backend
    use_triton = (
        J.is_cuda and J.dtype != torch.float64 and J.shape[-2] <= kernels.MAX_TASKS and kernels.triton_available()
    )
    return "triton" if use_triton else "torch"


# A squared norm below this has lost digits to fp32 underflow (products of entries under ~1e-19
# fall into the denormals), so the Gram is recomputed with the rows scaled first.
_UNDERFLOW = 1e-30
_CHUNK_ELEMENTS = 1 << 19  # elements of J scaled in float64 at a time (a 4 MiB temporary)


def solvers(backend: str, G: torch.Tensor) -> dict[str, Callable[..., torch.Tensor]]:
    """The fused single-program solves to pass to the methods (``chains``/``solve``) for ``G``.

    Empty — the methods' own PyTorch solvers — unless the backend resolves to Triton for ``G`` and
    ``T ≤ kernels.SOLVE_MAX_TASKS``; an explicit ``"triton"`` beyond that limit lets the launcher's
    error surface instead of falling back.
    """
    check_backend(backend, G.device)
    T = G.shape[-1]
    if G.dim() > 2:  # the fused solves take one problem; a batch runs the methods' batched torch solvers
        return {}
    if backend == "torch" or (backend == "auto" and not (G.is_cuda and T <= kernels.SOLVE_MAX_TASKS)):
        return {}
    if backend == "auto" and not kernels.triton_available():
        return {}
    return {
        "pcgrad": kernels.pcgrad_weights_triton,
        "mgda": kernels.min_norm_triton,
        "cagrad": kernels.cagrad_dual_triton,
    }


def gram(J: torch.Tensor, *, backend: str = "auto", rescue: bool = False) -> torch.Tensor:
    """``J Jᵀ`` as a ``(T, T)`` matrix accumulated in fp32 (fp64 for fp64 ``J``).

    ``rescue=True`` checks the diagonal (one host sync): when a squared norm overflowed to Inf or
    underflowed below ``1e-30`` although the row is finite and non-zero, the Gram is recomputed in
    fp64 with every row divided by its largest magnitude before squaring (an extra pass over ``J``),
    so gradients from 1e-30 to 1e30 in fp32 keep their Gram matrix.
    """
    G = kernels.gram(J) if resolve(backend, J) == "triton" else kernels.gram_reference(J)
    if not rescue or J.dtype == torch.float64:
        return G
    return rescued(J, G)[0]


def rescued(J: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``gram(rescue=True)``'s check on ``G = J Jᵀ`` (one host sync): ``(G, in_range)``, ``G`` recomputed
    from scaled rows where it can be, ``in_range`` whether every squared norm was finite (and, below
    fp64, above the underflow threshold) in the first place — then no other check of ``G`` is needed."""
    diag = G.diagonal(dim1=-2, dim2=-1)
    low = _UNDERFLOW if J.dtype != torch.float64 else -math.inf
    # A quarter of the largest float keeps every |G_ij| ≤ sqrt(G_ii·G_jj) finite despite rounding.
    if bool(diag.clamp(low, torch.finfo(diag.dtype).max / 4).eq(diag).all()):  # Inf and NaN both fail
        return G, True
    if J.dtype == torch.float64:
        return G, False
    suspicious = ~torch.isfinite(diag) | (diag < _UNDERFLOW)
    magnitude = J.abs().amax(dim=-1) if J.shape[-1] else torch.zeros(J.shape[:-1], device=J.device)
    rescuable = suspicious & torch.isfinite(magnitude) & (magnitude > 0)
    if not bool(rescuable.any()):
        return G, False
    return scaled_gram(J, magnitude), False


def scaled_gram(J: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``J Jᵀ`` in fp64 computed as ``S (J/s)(J/s)ᵀ S`` with ``s`` the rows' largest magnitudes (a
    batch ``(..., T, P)`` entry by entry)."""
    scale = magnitude.to(torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    T, P = J.shape[-2:]
    G = torch.zeros(*J.shape[:-2], T, T, dtype=torch.float64, device=J.device)
    step = max(1, _CHUNK_ELEMENTS // max(T, 1))
    for start in range(0, P, step):
        block = J[..., start : start + step].to(torch.float64) / scale[..., None]
        G += block @ block.mT
    return G * scale[..., :, None] * scale[..., None, :]


def combine(
    w: torch.Tensor,
    J: torch.Tensor,
    out: torch.Tensor,
    *,
    accumulate: bool = False,
    backend: str = "auto",
    validate: bool = True,
    wide: bool = False,
) -> torch.Tensor:
    """``out (+)= wᵀJ`` with fp32 accumulation; returns ``out``. ``validate=False`` skips the torch
    path's argument checks, for arguments the caller built itself. ``wide=True`` accumulates in fp64
    (weights included): for rows whose magnitudes and weights fp32 cannot multiply together, the
    case where :func:`rescued` recomputed the Gram matrix."""
    if wide:
        return combine_wide(w, J, out, accumulate=accumulate)
    if resolve(backend, J) == "triton":
        return kernels.combine(w, J, out, accumulate=accumulate)
    if not validate:
        return combine_reference_unchecked(w, J, out, accumulate=accumulate)
    return kernels.combine_reference(w, J, out, accumulate=accumulate)


def combine_wide(w: torch.Tensor, J: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """``out (+)= wᵀJ`` in fp64, ``_CHUNK_ELEMENTS`` of ``J`` at a time (a batch entry by entry); returns ``out``."""
    weights = w.to(torch.float64).unsqueeze(-2)
    T, P = J.shape[-2:]
    step = max(1, _CHUNK_ELEMENTS // max(T, 1))
    for start in range(0, P, step):
        part = (weights @ J[..., start : start + step].to(torch.float64)).squeeze(-2)
        if accumulate:
            part += out[..., start : start + step].to(torch.float64)
        out[..., start : start + step].copy_(part)
    return out


def gram_blocks(J: torch.Tensor, layout: BlockLayout, *, backend: str = "auto", rescue: bool = False) -> torch.Tensor:
    """``(B, T, T)``: each block's Gram matrix, from one pass over ``J`` (see :mod:`gradsurgery.kernels.blocks`).
    ``rescue`` as in :func:`gram`, block by block (one host sync)."""
    if resolve(backend, J) == "triton":
        from .kernels.blocks import gram_blocks as triton_gram_blocks

        G = triton_gram_blocks(J, layout.gram_plan(J.device))
    else:
        G = gram_blocks_reference(J, layout.blocks)
    if not rescue or J.dtype == torch.float64:
        return G
    return rescued_blocks(J, G, layout)[0]


def rescued_blocks(J: torch.Tensor, G: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, bool]:
    """:func:`rescued` for per-block Gram matrices: when a block's squared norms left fp32's range,
    every block is recomputed from scaled rows in fp64 (the rare path)."""
    diag = G.diagonal(dim1=-2, dim2=-1)
    low = _UNDERFLOW if J.dtype != torch.float64 else -math.inf
    if bool(diag.clamp(low, torch.finfo(diag.dtype).max / 4).eq(diag).all()):
        return G, True
    if J.dtype == torch.float64:
        return G, False
    blocks = [torch.cat([J[:, a:b] for a, b in spans], dim=1) if spans else J[:, :0] for spans in layout.blocks]
    return torch.stack([rescued(block, G[i])[0].to(torch.float64) for i, block in enumerate(blocks)]), False


def combine_blocks(
    W: torch.Tensor,
    J: torch.Tensor,
    out: torch.Tensor,
    layout: BlockLayout,
    *,
    lo: int = 0,
    accumulate: bool = False,
    backend: str = "auto",
    wide: bool = False,
) -> torch.Tensor:
    """``out (+)= W[b]ᵀ J`` on the columns of each block ``b`` inside ``[lo, lo + J.shape[1])`` (``J`` and
    ``out`` hold those columns); fp64 with ``wide`` (see :func:`combine`)."""
    if wide:
        hi = lo + J.shape[1]
        for b, spans in enumerate(layout.blocks):
            for start, stop in spans:
                start, stop = max(start, lo), min(stop, hi)
                if start < stop:
                    combine_wide(W[b], J[:, start - lo : stop - lo], out[start - lo : stop - lo], accumulate=accumulate)
        return out
    if resolve(backend, J) == "triton":
        from .kernels.blocks import combine_blocks as triton_combine_blocks

        plan = layout.tile_plan(lo, lo + J.shape[1], J.device, interpreted=J.device.type == "cpu")
        return triton_combine_blocks(W, J, out, plan, accumulate=accumulate)
    return combine_blocks_reference(W, J, out, layout.blocks, lo=lo, accumulate=accumulate)
