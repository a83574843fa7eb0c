"""gradsurgery: gradient surgery for joint (multi-task) training in PyTorch.

Every method of :data:`gradsurgery.methods.REGISTRY` is an optimizer wrapper here (``gs.PCGrad``,
``gs.CAGrad``, ``gs.MGDA``, ``gs.Sum``, ...) and a pair of functions in :mod:`gradsurgery.functional`.
"""

from . import functional, hints, methods
from .citation import bibtex, cite
from .errors import NonFiniteGradientError
from .frameworks import backward
from .methods import REGISTRY
from .optim import GradSurgery, MethodWrapper
from .wrappers import WRAPPERS, wrapper_class

globals().update(WRAPPERS)

__version__ = "0.1.0"

__all__ = [  # pyright: ignore[reportUnsupportedDunderAll]  (the wrappers are listed in __init__.pyi)
    "GradSurgery",
    "MethodWrapper",
    "NonFiniteGradientError",
    "backward",
    "REGISTRY",
    "bibtex",
    "cite",
    "functional",
    "hints",
    "methods",
    "wrapper_class",
    *sorted(WRAPPERS),
]
