"""The methods the study compares, by their command-line names, built by ``bench.methods``' factory.

A name is any registered method's (``bench.methods.lookup``: its function name, e.g. ``nash_mtl``, or
its wrapper name, e.g. ``NashMTL``, in any case), or ``mgda-ub``: MGDA in representation mode (MGDA-UB).
Names are stored in their canonical form (the function name; ``sum``/``mean`` for the two without one).
``METHODS`` is what a run without ``--methods`` compares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from bench.methods import Options, key, lookup, make_wrapper, names

if TYPE_CHECKING:
    import torch

METHODS: tuple[str, ...] = ("sum", "mean", "pcgrad", "cagrad", "mgda", "mgda-ub")

# A study name → the registered method it runs through the wrapper's representation mode.
# MGDA-UB is MGDA on the gradients of the shared representation.
REPRESENTATION: dict[str, str] = {"mgda-ub": "mgda"}
_SPECIAL_LABELS = {"stl": "Single-task", "naive": "sum(losses).backward()", "mgda-ub": "MGDA-UB"}


def known() -> tuple[str, ...]:
    """Every name the study takes, in the order of its tables: the registry's, each representation-mode
    variant right after its method."""
    out: list[str] = []
    for name in names():
        out.append(name)
        out += [variant for variant, base in REPRESENTATION.items() if base == name]
    return tuple(out)


def ordered(names: Sequence[str]) -> list[str]:
    """``names`` (``"stl"``, ``"naive"``, methods, cheap modes) in table order: single-task first, then
    the registry's order, a method's cheap modes right after it."""
    rank = {name: i for i, name in enumerate(("stl", "naive", *known()))}

    def place(name: str) -> tuple[int, int]:
        method, every = split_entry(name)
        return rank[method], every

    return sorted(names, key=place)


def label(name: str) -> str:
    """The name a table or figure shows: ``Single-task``, ``MGDA-UB``, else the wrapper's class name;
    ``PCGrad (every 4)`` for a cheap mode."""
    method, every = split_entry(name)
    text = _SPECIAL_LABELS.get(method) or lookup(method).name
    return text if every == 1 else f"{text} (every {every})"


def canonical(name: str) -> str:
    """``name`` (any case, function or wrapper name) in the form the study stores; ``ValueError`` if unknown."""
    folded = name.casefold()
    if folded in REPRESENTATION:
        return folded
    return key(lookup(name))


def parse_methods(text: str) -> list[str]:
    """``"sum,PCGrad,nash_mtl"`` → ``["sum", "pcgrad", "nash_mtl"]`` in the canonical order.

    ``ValueError`` with the reason for a list that is empty, has an empty entry (``"pcgrad,,cagrad"``,
    a trailing comma), names a method twice (``"pcgrad,PCGrad"``) or names an unknown one.
    """
    choose = f"choose from {','.join(known())} (or the wrapper names: PCGrad, NashMTL, ...)"
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValueError(f"no method given; {choose}")
    if not all(entries):
        raise ValueError(f"empty entry in {text!r}: separate method names by single commas, no comma at either end")
    resolved: dict[str, str] = {}
    unknown: list[str] = []
    for entry in entries:
        try:
            name = canonical(entry)
        except ValueError:
            unknown.append(entry)
            continue
        if name in resolved:
            raise ValueError(f"method {name!r} given twice (as {resolved[name]!r} and {entry!r})")
        resolved[name] = entry
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; {choose}")
    return [name for name in known() if name in resolved]


def entry(method: str, every: int = 1) -> str:
    """The name of a method run in a cheap mode: ``"pcgrad@4"`` is PCGrad with ``every=4``."""
    return method if every == 1 else f"{method}@{every}"


def split_entry(name: str) -> tuple[str, int]:
    """``"pcgrad@4"`` → ``("pcgrad", 4)``; ``"pcgrad"`` → ``("pcgrad", 1)``."""
    method, _, every = name.partition("@")
    return method, int(every) if every else 1


def make_optimizer(
    name: str, inner: torch.optim.Optimizer, *, seed: int, num_tasks: int, options: Options | None = None
) -> Any:
    """The ``gradsurgery`` wrapper for the study's method ``name`` (``"pcgrad@4"``: with ``every=4``) around
    ``inner`` for ``num_tasks`` tasks (``bench.methods.make_wrapper``: the benchmarks' options, ``options``
    on top, ``seed``)."""
    method, every = split_entry(name)
    cheap = {"every": every} if every != 1 else {}
    return make_wrapper(REPRESENTATION.get(method, method), inner, seed=seed, options=options, num_tasks=num_tasks, **cheap)


def joint_backward(opt: Any, name: str, losses: Sequence[torch.Tensor], features: torch.Tensor | None) -> None:
    """``opt.backward`` in the mode the method needs: representation mode for MGDA-UB."""
    if split_entry(name)[0] in REPRESENTATION:
        if features is None:
            raise ValueError(f"{name} needs the shared representation (features=)")
        opt.backward(list(losses), features=features)
    else:
        opt.backward(list(losses))
