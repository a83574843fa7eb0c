"""The methods: pure functions from the Gram matrix ``G = J Jᵀ`` to the weights ``w`` (``d = wᵀJ``),
each described once by a :class:`~gradsurgery.methods.spec.Method` at the end of its own file.

``REGISTRY`` lists them, one line each: the wrappers (``gs.<Name>``), the functional API
(``gs.functional.<function>`` and ``<function>_weights``), ``gs.cite()``, the benchmarks, the study
and the tests are generated from it.
"""

from __future__ import annotations

from . import aligned_mtl, cagrad, config, fairgrad, graddrop, gradvac, imtl_g, mgda, nash_mtl, pcgrad, rlw
from .sum import MEAN, METHOD as SUM
from ._simplex import DEFAULT_ITERATIONS
from .cagrad import cagrad_weights
from .mgda import mgda_weights
from .pcgrad import pcgrad_weights
from .spec import Method, Option, State, finite_number, one_of, optional, positive_int

CAGRAD = Method(
    name="CAGrad",
    function="cagrad",
    weights=cagrad_weights,
    doc=cagrad.__doc__ or "",
    bibtex=cagrad.BIBTEX,
    options=(
        Option("c", 0.4, finite_number("c", low=0.0), "radius of the ball around the mean gradient, relative to its norm"),
        Option("rescale", "1+c^2", one_of("rescale", cagrad.RESCALES), "what the update is divided by"),
        Option("max_iter", DEFAULT_ITERATIONS, positive_int("max_iter"), "iterations of the interior-point solve (T > 10, and the Triton solve)"),
    ),
    solve="cagrad",
)

REGISTRY: tuple[Method, ...] = (
    SUM,
    MEAN,
    pcgrad.METHOD,
    CAGRAD,
    mgda.METHOD,
    imtl_g.METHOD,
    aligned_mtl.METHOD,
    nash_mtl.METHOD,
    fairgrad.METHOD,
    gradvac.METHOD,
    config.METHOD,
    graddrop.METHOD,
    rlw.METHOD,
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
