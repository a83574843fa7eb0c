"""TorchJD's counterpart of each of our methods, configured from our options (``bench.methods``), built
the same way by every benchmark.

Keyed by our wrapper name; a registered method missing here has no TorchJD counterpart that computes
the same thing (GradDrop's is elementwise on ``J`` and draws differently; it is timed on ``J`` only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bench.methods import CAGRAD_C, lookup, method_options

__all__ = ["CAGRAD_C", "TorchJDPeer", "torchjd_aggregator", "torchjd_peer", "torchjd_weighting"]


@dataclass(frozen=True)
class TorchJDPeer:
    """How TorchJD computes one of our methods.

    ``aggregator``: its class in ``torchjd.aggregation`` (for ``jac_to_grad``: ``J`` given).
    ``weighting``: how to get its weights: a weighting class of ``torchjd.aggregation``, ``".weighting"``
    (the aggregator's own weighting, which TorchJD does not export: Nash-MTL) or ``None`` (no weights:
    the aggregator itself, which returns the update: ConFIG). ``on``: what the weighting reads,
    ``"gramian"`` (``G``) or ``"matrix"`` (rows: any ``M`` with ``M Mᵀ = G`` gives the same result).
    ``options``: TorchJD's keywords from ours and ``T``.
    """

    aggregator: str
    weighting: str | None
    on: str
    options: Callable[[Mapping[str, Any], int], dict[str, Any]] = lambda ours, T: {}


_PEERS: dict[str, TorchJDPeer] = {
    "Sum": TorchJDPeer("Sum", "SumWeighting", "matrix"),
    "Mean": TorchJDPeer("Mean", "MeanWeighting", "matrix"),
    "PCGrad": TorchJDPeer("PCGrad", "PCGradWeighting", "gramian"),
    "CAGrad": TorchJDPeer("CAGrad", "CAGradWeighting", "gramian", lambda ours, T: {"c": ours["c"]}),
    "MGDA": TorchJDPeer("MGDA", "MGDAWeighting", "gramian"),
    "UPGrad": TorchJDPeer("UPGrad", "UPGradWeighting", "gramian"),
    "DualProj": TorchJDPeer("DualProj", "DualProjWeighting", "gramian"),
    "IMTLG": TorchJDPeer("IMTLG", "IMTLGWeighting", "gramian"),
    "AlignedMTL": TorchJDPeer(
        "AlignedMTL", "AlignedMTLWeighting", "gramian", lambda ours, T: {"scale_mode": ours["scale_mode"]}
    ),
    # TorchJD's Nash-MTL weighting reads the matrix; its max_norm (default 1.0) has no "off".
    "NashMTL": TorchJDPeer("NashMTL", ".weighting", "matrix", lambda ours, T: {"n_tasks": T}),
    "FairGrad": TorchJDPeer("FairGrad", "FairGradWeighting", "gramian", lambda ours, T: {"alpha": ours["alpha"]}),
    "GradVac": TorchJDPeer("GradVac", "GradVacWeighting", "gramian", lambda ours, T: {"beta": ours["beta"]}),
    "ConFIG": TorchJDPeer("ConFIG", None, "matrix"),
    "RLW": TorchJDPeer("Random", "RandomWeighting", "matrix"),
}


def torchjd_peer(name: str) -> TorchJDPeer | None:
    """TorchJD's counterpart of our method ``name`` (any name ``bench.methods.lookup`` takes), if any."""
    return _PEERS.get(lookup(name).name)


def _our_options(name: str) -> dict[str, Any]:
    method = lookup(name)
    return {**method.defaults(), **method_options(method)}


def torchjd_aggregator(name: str, T: int) -> Any:
    """TorchJD's aggregator of ``name`` for ``T`` tasks, for ``jac_to_grad``."""
    from torchjd import aggregation

    peer = _required(name)
    return getattr(aggregation, peer.aggregator)(**peer.options(_our_options(name), T))


def torchjd_weighting(name: str, T: int) -> Any:
    """TorchJD's weighting of ``name`` for ``T`` tasks (``peer.on`` says whether it reads ``G`` or rows);
    for a peer without weights (``peer.weighting is None``: ConFIG) its aggregator, which returns ``d``."""
    from torchjd import aggregation

    peer = _required(name)
    options = peer.options(_our_options(name), T)
    if peer.weighting is None:
        return getattr(aggregation, peer.aggregator)(**options)
    if peer.weighting == ".weighting":
        return getattr(aggregation, peer.aggregator)(**options).weighting
    return getattr(aggregation, peer.weighting)(**options)


def _required(name: str) -> TorchJDPeer:
    peer = torchjd_peer(name)
    if peer is None:
        raise ValueError(f"TorchJD has no counterpart of {lookup(name).name} here")
    return peer
