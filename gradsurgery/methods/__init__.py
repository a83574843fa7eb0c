"""The methods: pure functions from the Gram matrix ``G = J Jᵀ`` to the weights ``w`` (``d = wᵀJ``),
each described once by a :class:`~gradsurgery.methods.spec.Method` at the end of its own file.

``REGISTRY`` lists them, one line each: the wrappers (``gs.<Name>``), the functional API
(``gs.functional.<function>`` and ``<function>_weights``), ``gs.cite()``, the benchmarks, the study
and the tests are generated from it.
"""

from __future__ import annotations

from . import aligned_mtl, cagrad, config, dualproj, fairgrad, graddrop, gradvac, imtl_g, mgda, nash_mtl, pcgrad, rlw, upgrad, uw
from . import dwa, famo, geometric_mean, imtl_l, rlw_loss, stch
from .sum import MEAN, METHOD as SUM
from .cagrad import cagrad_weights
from .mgda import mgda_weights
from .pcgrad import pcgrad_weights
from .spec import Method, Objective, Option, State, finite_number, one_of, optional, positive_int

REGISTRY: tuple[Method, ...] = (
    SUM,
    MEAN,
    pcgrad.METHOD,
    cagrad.METHOD,
    mgda.METHOD,
    upgrad.METHOD,
    dualproj.METHOD,
    imtl_g.METHOD,
    aligned_mtl.METHOD,
    nash_mtl.METHOD,
    fairgrad.METHOD,
    gradvac.METHOD,
    config.METHOD,
    graddrop.METHOD,
    rlw.METHOD,
    uw.METHOD,
    dwa.METHOD,
    famo.METHOD,
    geometric_mean.METHOD,
    imtl_l.METHOD,
    rlw_loss.METHOD,
    stch.METHOD,
)


def by_name(name: str) -> Method:
    """The method whose wrapper (``"CAGrad"``) or function (``"cagrad"``) has this name."""
    for method in REGISTRY:
        if name in (method.name, method.function):
            return method
    names = sorted(m.function or m.name for m in REGISTRY)
    raise ValueError(f"unknown method {name!r}; expected one of {names}")


__all__ = [
    "REGISTRY",
    "Method",
    "Objective",
    "Option",
    "State",
    "by_name",
    "cagrad_weights",
    "finite_number",
    "mgda_weights",
    "one_of",
    "optional",
    "pcgrad_weights",
    "positive_int",
]
