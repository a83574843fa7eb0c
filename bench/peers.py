"""The peers and the constants every step benchmark shares, built the same way everywhere."""

from __future__ import annotations

CAGRAD_C = 0.4  # the official NYUv2/Cityscapes value, for ours and the peers alike


def torchjd_aggregator(method: str):
    """TorchJD's aggregator of ``method`` (``"pcgrad"``, ``"cagrad"``, ``"mgda"``), for ``jac_to_grad``."""
    from torchjd import aggregation

    return {"pcgrad": aggregation.PCGrad, "cagrad": lambda: aggregation.CAGrad(c=CAGRAD_C), "mgda": aggregation.MGDA}[
        method
    ]()


def torchjd_weighting(method: str):
    """TorchJD's weighting of ``method``, for its autogram engine."""
    from torchjd import aggregation

    return {
        "pcgrad": aggregation.PCGradWeighting,
        "cagrad": lambda: aggregation.CAGradWeighting(c=CAGRAD_C),
        "mgda": aggregation.MGDAWeighting,
    }[method]()
