"""The methods the study compares, by their command-line names, built through the public wrappers.

Importing this module does not import torch, so the command line can reject bad names instantly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

METHODS: tuple[str, ...] = ("sum", "mean", "pcgrad", "cagrad", "mgda", "mgda-ub")

LABELS: dict[str, str] = {
    "stl": "Single-task",
    "sum": "Sum",
    "mean": "Mean",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "mgda": "MGDA",
    "mgda-ub": "MGDA-UB",
}

# MGDA-UB is MGDA on the gradients of the shared representation: the wrapper's representation mode.
REPRESENTATION_METHODS: frozenset[str] = frozenset({"mgda-ub"})


def parse_methods(text: str) -> list[str]:
    """``"sum,pcgrad"`` → ``["sum", "pcgrad"]`` in the canonical order; ``ValueError`` names the bad ones."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no method given; choose from {','.join(METHODS)}")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {','.join(METHODS)}")
    return [name for name in METHODS if name in names]


def make_optimizer(name: str, inner: torch.optim.Optimizer, *, seed: int, cagrad_c: float) -> Any:
    """The ``gradsurgery`` wrapper for ``name`` around ``inner`` (imported here: the CLI checks its
    arguments before paying for the import)."""
    import gradsurgery as gs

    if name == "sum":
        return gs.Sum(inner)
    if name == "mean":
        return gs.Mean(inner)
    if name == "pcgrad":
        return gs.PCGrad(inner, seed=seed)
    if name == "cagrad":
        return gs.CAGrad(inner, c=cagrad_c)
    if name in ("mgda", "mgda-ub"):
        return gs.MGDA(inner)
    raise ValueError(f"unknown method {name!r}; choose from {','.join(METHODS)}")


def joint_backward(opt: Any, name: str, losses: Sequence[torch.Tensor], features: torch.Tensor | None) -> None:
    """``opt.backward`` in the mode the method needs: representation mode for MGDA-UB."""
    if name in REPRESENTATION_METHODS:
        if features is None:
            raise ValueError(f"{name} needs the shared representation (features=)")
        opt.backward(list(losses), features=features)
    else:
        opt.backward(list(losses))
