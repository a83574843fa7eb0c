"""gradsurgery: gradient surgery (PCGrad, CAGrad, MGDA) for joint training in PyTorch."""

from . import functional, methods
from .citation import bibtex, cite
from .errors import NonFiniteGradientError

__version__ = "0.1.0"

__all__ = ["NonFiniteGradientError", "bibtex", "cite", "functional", "methods"]
