"""The methods as pure functions from the Gram matrix ``G = J Jᵀ`` to the weights ``w`` (``d = wᵀJ``)."""

from .cagrad import cagrad_weights
from .mean import mean_weights
from .mgda import mgda_weights
from .pcgrad import pcgrad_weights
from .sum import sum_weights

__all__ = ["cagrad_weights", "mean_weights", "mgda_weights", "pcgrad_weights", "sum_weights"]
