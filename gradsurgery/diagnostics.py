"""What the last step's Gram matrix says about the tasks: gradient norms, cosines, conflicts.

Everything the wrappers need for logging is in ``G = J Jᵀ`` (``T × T``) and the weights ``w`` they
chose, so the diagnostics cost ``O(T²)`` and never touch ``J``. :func:`gram_diagnostics` stays on the
device and never synchronises the host, so it can run every step (and inside a captured CUDA graph);
:func:`to_floats` is the single place where values are copied to the host, once, when a logger
actually reads them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["flatten", "gram_diagnostics", "to_floats"]


def gram_diagnostics(G: torch.Tensor, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-task gradient norms, pairwise cosines and conflict count from a Gram matrix.

    Args:
        G: ``(T, T)`` Gram matrix of the task gradients, ``G_ij = ⟨g_i, g_j⟩``.
        weights: ``(T,)`` weights of the combined update ``d = Σ_t w_t g_t`` (``None`` for an
            elementwise method such as GradDrop, which has none: the entry is then left out).

    Returns:
        ``"norms"`` ``(T,)``: ``‖g_t‖ = sqrt(G_tt)``;
        ``"cosine"`` ``(T, T)``: ``G_ij / (‖g_i‖ ‖g_j‖)``, defined as ``0`` wherever a norm is zero
        (a zero gradient neither agrees nor conflicts), so the diagonal is ``1`` except for zero
        gradients;
        ``"conflicts"`` (int64 scalar): the number of pairs ``i < j`` with ``G_ij < 0``;
        ``"weights"`` ``(T,)``: the weights, detached (absent when ``weights`` is ``None``).
        All tensors are on ``G``'s device; nothing is read back to the host.

    Raises:
        ValueError: ``G`` is not square, or ``weights`` is not ``(T,)``.

    Examples:
        >>> import torch
        >>> from gradsurgery.diagnostics import gram_diagnostics
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> gram_diagnostics(J @ J.T, None)["conflicts"]
        tensor(1)
    """
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square (T, T) matrix, got shape {tuple(G.shape)}")
    if weights is not None and weights.shape != (G.shape[0],):
        raise ValueError(f"weights must have shape ({G.shape[0]},), got {tuple(weights.shape)}")
    G = G.detach()
    # Half-precision products of two norms can underflow; the diagnostics are cheap, so use fp32.
    if G.dtype in (torch.float16, torch.bfloat16):
        G = G.float()
    # Rounding can leave a tiny negative diagonal for a zero gradient; a norm is never imaginary.
    norms = G.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    nonzero = denom > 0
    cosine = torch.where(nonzero, G / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
    # The rounding of G and of the norms can push |cos| just past 1.
    cosine = cosine.clamp(-1.0, 1.0)
    conflicts = torch.triu(G < 0, diagonal=1).sum()
    out = {"norms": norms, "cosine": cosine, "conflicts": conflicts}
    if weights is not None:
        out["weights"] = weights.detach()
    return out


def to_floats(diag: dict[str, torch.Tensor]) -> dict[str, float | list[Any]]:
    """Plain Python numbers (and nested lists) for TensorBoard, W&B or JSON.

    All tensors are packed into one buffer and copied to the host in a single transfer, so a call
    costs one device synchronisation however many entries ``diag`` holds. Integer tensors come back
    as ``int``, floating ones as ``float``; 0-d tensors as a number, others as (nested) lists.

    Args:
        diag: named tensors on one device, such as :func:`gram_diagnostics` returns.

    Returns:
        The same keys, with numbers and (nested) lists of numbers.

    Examples:
        >>> import torch
        >>> from gradsurgery.diagnostics import gram_diagnostics, to_floats
        >>> to_floats(gram_diagnostics(torch.eye(2), None))["norms"]
        [1.0, 1.0]
    """
    if not diag:
        return {}
    tensors = {key: value.detach() for key, value in diag.items()}
    device = next(iter(tensors.values())).device
    # MPS has no float64; float32 still holds every count below 2**24 exactly.
    pack_dtype = torch.float32 if device.type == "mps" else torch.float64
    flat = torch.cat([t.to(device=device, dtype=pack_dtype).reshape(-1) for t in tensors.values()])
    host = flat.cpu()
    out: dict[str, float | list[Any]] = {}
    offset = 0
    for key, t in tensors.items():
        chunk = host[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
        if not t.is_floating_point():
            chunk = chunk.round().to(torch.int64)
        out[key] = chunk.tolist()
    return out


def flatten(report: Mapping[str, Any]) -> dict[str, float]:
    """``to_floats``'s report as ``{name: float}``, the shape loggers take.

    Args:
        report: a report of :func:`to_floats` (what ``opt.diagnostics()`` returns).

    Returns:
        ``norm/<t>``, ``cos/<i>-<j>`` for ``i < j``, ``weight/<t>``, the scalars under their own
        names (``conflicts``; booleans as 0.0/1.0), and each block's entries under ``block/<b>/``.

    Examples:
        >>> from gradsurgery.diagnostics import flatten
        >>> flatten({"norms": [1.0, 2.0], "cosine": [[1.0, -0.5], [-0.5, 1.0]], "conflicts": 1})
        {'norm/0': 1.0, 'norm/1': 2.0, 'cos/0-1': -0.5, 'conflicts': 1.0}
    """
    out: dict[str, float] = {}
    singular = {"norms": "norm", "weights": "weight"}
    for key, value in report.items():
        if key == "blocks":
            for b, block in enumerate(value):
                out.update({f"block/{b}/{name}": number for name, number in flatten(block).items()})
        elif key == "cosine":
            for i, row in enumerate(value):
                for j in range(i + 1, len(row)):
                    out[f"cos/{i}-{j}"] = float(row[j])
        elif isinstance(value, list):
            name = singular.get(key, key)
            out.update({f"{name}/{t}": float(v) for t, v in enumerate(value)})
        else:
            out[key] = float(value)
    return out
