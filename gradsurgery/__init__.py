"""gradsurgery: gradient surgery (PCGrad, CAGrad, MGDA) for joint training in PyTorch."""

from . import functional, methods
from .citation import bibtex, cite
from .errors import NonFiniteGradientError
from .optim import CAGrad, GradSurgery, Mean, MGDA, PCGrad, Sum

__version__ = "0.1.0"

__all__ = [
    "CAGrad",
    "GradSurgery",
    "MGDA",
    "Mean",
    "NonFiniteGradientError",
    "PCGrad",
    "Sum",
    "bibtex",
    "cite",
    "functional",
    "methods",
]
