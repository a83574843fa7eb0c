"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020, Algorithm 1).

Elementwise. For every coordinate ``p`` of the shared parameters, with ``J[:, p]`` the tasks' gradients
there, ::

    P_p  = ½ (1 + Σ_t J_tp / Σ_t |J_tp|)          positive-sign purity (½ for an all-zero column)
    U_p  ~ Uniform[0, 1)
    M_tp = [U_p < P_p]·[J_tp > 0] + [U_p ≥ P_p]·[J_tp < 0]
    d_p  = Σ_t (ℓ_t + (1 − ℓ_t)·M_tp)·J_tp

so a coordinate where all tasks agree in sign is summed unchanged (``P = 1`` or ``0``), and a
conflicted one keeps the entries of one sign only, the positive ones with probability ``P_p`` (their
share of the coordinate's total magnitude). ``ℓ_t ∈ [0, 1]`` is the paper's per-task leak: ``ℓ_t = 1``
passes task ``t``'s gradient through unmasked (the paper's transfer-learning use), ``ℓ = 0`` — the
default — is "pure GradDrop", the paper's main setting and what the official code says is usual. The
update is the sum of the masked gradients: on the sum scale intrinsically (``reduction="mean"``
multiplies it by ``1/T``). ``T = 1`` returns the gradient unchanged.

GradDrop is not a combination of whole rows, so there are no weights and no Gram matrix: ``d`` is made
in one pass over ``J`` (``gradsurgery.kernels.graddrop``: per block of columns the two sums, the draw
and the masked sum; ``P``, ``U`` and ``M`` are never stored).

Randomness. One int64 seed per call is drawn from ``generator`` (a generator on ``J``'s device draws it
without a host sync); ``U_p`` is a counter-based hash of ``(seed, p)`` that the PyTorch and Triton
backends compute identically, so the same generator state keeps the same entries on either backend
(and, for an fp32 ``out``, gives the same bits). ``U_p`` lies on a ``2⁻²⁴`` grid: the positive entries
are kept with probability ``⌈2²⁴·P_p⌉/2²⁴``, within ``2⁻²⁴`` of ``P_p``. On a tie ``U_p = P_p`` (measure
zero in the paper, where both signs are dropped) the negative entries are kept, so a coordinate whose
entries are all negative is never dropped either. A coordinate with a NaN or Inf entry gives NaN, so
that non-finite gradients reach the caller's check instead of being dropped with the other sign.

Differences from the paper's official code (``lingvo/core/graddrop.py``), LibMTL and TorchJD:

- *Where it applies.* The paper and the official code insert GradDrop as a layer at a shared
  activation: the per-task gradients there are multiplied by ``sign(activation)`` and summed over the
  batch before ``P`` is computed, and the resulting per-feature mask is applied to the per-example
  gradients flowing back. LibMTL does the same on representation gradients only. Here, as in TorchJD,
  it applies to the parameter-gradient matrix ``J``: ``P`` per parameter coordinate, nothing summed
  over a batch, no activation sign.
- The official code computes ``Σg / (2Σ|g| + 1e-7) + ½``: the epsilon pulls the purity of very small
  gradients towards ½; here the ratio is exact (invariant to the gradients' scale). It keeps the
  positive sign when ``P ≥ U`` (a tie keeps positives) and, by default (``keep_gradnorm_constant``),
  multiplies the result by ``‖result‖ / ‖Σ_t g_t‖``, a rescaling that Algorithm 1 does not have and that
  is not offered here; nor is its sigmoid keep function (the paper's monotone ``f(P)``, TorchJD's
  ``f``): ``f`` is the identity, the paper's default.
- LibMTL and TorchJD draw ``U`` from the global RNG with ``torch.rand``; TorchJD's ``0/0`` purity is
  NaN (both masks then false, which changes nothing in an all-zero column).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from typing_extensions import TypeIs

from ._common import check_reduction
from .spec import Method, Option

BIBTEX = """@inproceedings{chen2020just,
  title     = {Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout},
  author    = {Chen, Zhao and Ngiam, Jiquan and Huang, Yanping and Luong, Thang and Kretzschmar, Henrik and Chai, Yuning and Anguelov, Dragomir},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  year      = {2020}
}"""

Leak = float | Sequence[float] | torch.Tensor | None


def check_graddrop_options(leak: Leak, T: int | None = None, *, read_values: bool = True) -> None:
    """Raise ``ValueError`` for a leak outside ``[0, 1]`` (NaN included) or of the wrong length (``T``
    when known).

    A tensor's values are read back to the host for that (at construction, and once per functional
    call); ``read_values=False`` checks only its shape and dtype (the wrapper's steps, which checked
    it at construction).
    """
    if leak is None:
        return
    if isinstance(leak, torch.Tensor):
        if leak.dim() != 1 or (T is not None and leak.shape[0] != T):
            expected = f"length T={T}" if T is not None else "1-D"
            raise ValueError(f"leak must be a {expected} tensor, got shape {tuple(leak.shape)}")
        if not leak.is_floating_point():
            raise ValueError(f"leak must be a floating-point tensor, got dtype {leak.dtype}")
        if read_values and not bool(((leak >= 0) & (leak <= 1)).all()):  # NaN fails both comparisons
            raise ValueError(f"leak must lie in [0, 1], got {leak.tolist()}")
        return
    values: list[object] | None = [leak] if _is_number(leak) else list(leak) if _is_sequence(leak) else None
    numbers = [v for v in values or [] if _is_number(v)]
    if values is None or len(numbers) != len(values):
        raise ValueError(f"leak must be a number in [0, 1], a sequence of them or a tensor, got {leak!r}")
    if not all(0.0 <= v <= 1.0 for v in numbers):  # NaN fails both comparisons
        raise ValueError(f"leak must lie in [0, 1], got {leak!r}")
    if not _is_number(leak) and T is not None and len(values) != T:
        raise ValueError(f"leak has {len(values)} values but there are T={T} tasks")


def _is_sequence(value: object) -> TypeIs[Sequence[object]]:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _is_number(value: object) -> TypeIs[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def leak_tensor(
    leak: Leak, T: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """The per-task leaks as a ``(T,)`` tensor on ``device`` (``None`` for no leak at all); numbers are
    stored in ``dtype`` (the accumulation dtype: the kernel reads them as fp32, fp64 ``J`` in fp64).

    Built with fills, not copied from host data (which on CUDA would wait for the device); a wrapper
    should build it once and pass the tensor every step.
    """
    check_graddrop_options(leak, T, read_values=False)
    if leak is None:
        return None
    if isinstance(leak, torch.Tensor):
        return leak.to(device)
    if _is_number(leak):
        return None if leak == 0 else torch.full((T,), float(leak), dtype=dtype, device=device)
    if all(v == 0 for v in leak):
        return None
    values = torch.empty(T, dtype=dtype, device=device)
    for t, v in enumerate(leak):
        values[t : t + 1].fill_(float(v))
    return values


def graddrop(
    J: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    leak: Leak = None,
    reduction: str = "sum",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GradDrop update ``d`` (shape ``(P,)``) of the ``(T, P)`` task gradients ``J``, written into ``out``.

    ``generator`` (torch's default when ``None``) gives one seed per call; pass one on ``J``'s device.
    ``leak``: ``None``/``0`` (pure GradDrop), one number for every task, ``T`` numbers, or a ``(T,)``
    tensor on ``J``'s device. ``out`` defaults to a new tensor of ``J``'s dtype. ``backend`` as
    everywhere (``gradsurgery.backend.resolve``): Triton for CUDA fp32/fp16/bf16 ``J`` with ``T ≤ 128``.
    Accumulates in fp32 (fp64 for fp64 ``J``). No host sync.
    """
    from ..backend import resolve
    from ..kernels.graddrop import graddrop as graddrop_triton
    from ..kernels.graddrop import graddrop_reference, graddrop_seed

    if not isinstance(J, torch.Tensor) or J.dim() != 2:
        got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
        raise ValueError(f"J must be a 2-D (T, P) tensor, got {got}")
    T, P = J.shape
    check_reduction(reduction)
    leaks = leak_tensor(leak, T, J.device, torch.float64 if J.dtype == torch.float64 else torch.float32)
    engine = resolve(backend, J)
    if out is None:
        out = torch.empty(P, dtype=J.dtype, device=J.device)
    seed = graddrop_seed(generator, device=J.device)
    scale = 1.0 / T if reduction == "mean" else 1.0
    run = graddrop_triton if engine == "triton" else graddrop_reference
    return run(J, seed, out, leak=leaks, scale=scale)


def _no_weights(G: torch.Tensor, **options: object) -> torch.Tensor:
    raise TypeError("GradDrop is elementwise: it needs J, not the Gram matrix")


METHOD = Method(
    name="GradDrop",
    function="graddrop",
    weights=_no_weights,
    doc=__doc__ or "",
    bibtex=BIBTEX,
    options=(
        Option(
            "leak",
            None,
            check_graddrop_options,
            "how much of each task's dropped gradient still leaks through (0: none)",
            annotation="float | Sequence[float] | torch.Tensor | None",
        ),
    ),
    random=True,
    combine=graddrop,
)
