"""TorchJD's counterpart of each of our methods, configured from our options (``bench.methods``), built
the same way by every benchmark.

Keyed by our wrapper name; a registered method missing here has no TorchJD counterpart that computes
the same thing (GradDrop's is elementwise on ``J`` and draws differently; it is timed on ``J`` only).
Gradient methods map to an aggregator / weighting of ``torchjd.aggregation`` (:class:`TorchJDPeer`),
loss-weighting methods to a scalarizer of ``torchjd.scalarization`` (:class:`TorchJDScalarizer`,
TorchJD ≥ 0.18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bench.methods import CAGRAD_C, lookup, method_options

__all__ = [
    "CAGRAD_C",
    "TorchJDPeer",
    "TorchJDScalarizer",
    "torchjd_aggregator",
    "torchjd_peer",
    "torchjd_scalarizer",
    "torchjd_scalarizer_peer",
    "torchjd_weighting",
]


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


@dataclass(frozen=True)
class TorchJDScalarizer:
    """How TorchJD computes one of our loss-weighting methods: a scalarizer (``torchjd.scalarization``)
    whose value is backpropagated once, as ours is.

    ``scalarizer``: its class. ``options``: its keywords from ours and ``T``. ``learnable``: it holds
    parameters (UW's log-variances, IMTL-L's scales) that its users add to the optimizer, as our wrapper
    adds ours. ``update``: FAMO's documented loop, ``update(losses)`` with the losses of a second forward
    pass on the same batch after ``optimizer.step()`` (ours takes the next step's losses instead and runs
    no extra forward: ``gradsurgery/methods/famo.py``). ``epoch_step``: DWA's ``step()``, called after
    every batch to roll its history as ours does with its default ``period=1``. ``matches``: whether our
    options (the benchmarks') have a counterpart there.
    """

    scalarizer: str
    options: Callable[[Mapping[str, Any], int], dict[str, Any]] = lambda ours, T: {}
    learnable: bool = False
    update: bool = False
    epoch_step: bool = False
    matches: Callable[[Mapping[str, Any]], bool] = lambda ours: True


_SCALARIZERS: dict[str, TorchJDScalarizer] = {
    # 0.5·(e^{-s}L + s): ours without the 1/2 (a constant factor of the objective).
    "UW": TorchJDScalarizer("UW", lambda ours, T: {"shape": T}, learnable=True),
    "DWA": TorchJDScalarizer(
        "DWA", lambda ours, T: {"temperature": ours["temperature"]}, epoch_step=True, matches=lambda ours: ours["period"] == 1
    ),
    "FAMO": TorchJDScalarizer(
        "FAMO", lambda ours, T: {"shape": T, "lr": ours["w_lr"], "weight_decay": ours["gamma"]}, update=True
    ),
    # exp(mean log L): ours times T (the sum scale).
    "GeometricMean": TorchJDScalarizer("GeometricMean"),
    "IMTLL": TorchJDScalarizer("IMTLL", lambda ours, T: {"shape": T}, learnable=True),
    # softmax(randn)-weighted sum: ours times T.
    "RLWLoss": TorchJDScalarizer("Random"),
    # μ'·logsumexp(L/(T·μ')) with uniform preferences 1/T: ours with μ' = μ/T, divided by T².
    "STCH": TorchJDScalarizer(
        "STCH", lambda ours, T: {"mu": ours["mu"] / T}, matches=lambda ours: ours["ideal"] == "zero" and ours["warmup"] == 0
    ),
}


def torchjd_scalarizer_peer(name: str) -> TorchJDScalarizer | None:
    """TorchJD's scalarizer for our loss-weighting method ``name``, if it has one for the benchmarks' options."""
    peer = _SCALARIZERS.get(lookup(name).name)
    return peer if peer is not None and peer.matches(_our_options(name)) else None


def torchjd_scalarizer(name: str, T: int) -> Any:
    """TorchJD's scalarizer of ``name`` for ``T`` tasks (an ``nn.Module``: its parameters, if any, go to
    the optimizer; see :class:`TorchJDScalarizer` for what its loop calls besides it)."""
    from torchjd import scalarization

    peer = torchjd_scalarizer_peer(name)
    if peer is None:
        raise ValueError(f"TorchJD has no scalarizer computing {lookup(name).name} here")
    return getattr(scalarization, peer.scalarizer)(**peer.options(_our_options(name), T))
