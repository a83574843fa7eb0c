"""A method, described once: everything the wrappers, the functional API, the citations, the
distributed option check, the benchmarks and the tests need to know about it.

Each method file ends with one ``METHOD = Method(...)``, and ``methods/__init__.py`` lists it once in
``REGISTRY``. From there come ``gs.<Name>`` (the optimizer wrapper), ``gs.functional.<function>`` and
``<function>_weights``, its ``gs.cite()`` entry and its place in every parametrised test.

The weights function is pure math on the Gram matrix (see DESIGN.md)::

    weights(G, *, reduction, **options, [losses=], [generator=], [solve=], [state=]) -> w | (w, state)

``G`` is ``(T, T)``, or a batch ``(..., T, T)`` of independent problems (``granularity=`` solves one
per block in one call); ``w`` is ``(T,)`` (``(..., T)``) float64 on ``G``'s device, each entry what the
unbatched call gives, on the method's documented scale (the sum scale for methods whose paper defines
a mean); ``reduction="mean"`` divides by ``T``. A method's options are typed for the wrappers'
signatures and the type stubs by their checks (or ``Option(annotation=)``).
``losses`` is passed only to methods that read the loss values, ``generator`` to those that draw
random numbers, ``solve`` (a fused single-program Triton solve, or ``None``) to those that have one,
and ``state=`` (the dict of the method's state tensors, as ``State.init`` made them) to stateful
methods, which return ``(w, new_state)``. The wrappers check that ``w`` has one entry per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

@dataclass(frozen=True)
class Check:
    """A check of an option's value, with the type it accepts: ``annotation`` is a type expression
    (``"float"``, ``"Literal['min', 'median']"``) for the wrappers' signatures and the type stubs."""

    run: Callable[[Any], None]
    annotation: str = "Any"

    def __call__(self, value: Any) -> None:
        self.run(value)


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its name, default, check and one line of documentation.

    ``check(value)`` raises ``ValueError`` (``TypeError`` for a wrong type) naming the option and
    the value; it sees the value alone (checks that need ``T`` run on the first step). The option's
    type is the check's (a :class:`Check` from the helpers below) unless ``annotation`` says otherwise.
    """

    name: str
    default: Any
    check: Callable[[Any], None]
    doc: str
    annotation: str | None = None

    @property
    def hint(self) -> str:
        """The type expression of the option's values (``"Any"`` when neither it nor its check says)."""
        if self.annotation is not None:
            return self.annotation
        return self.check.annotation if isinstance(self.check, Check) else "Any"


@dataclass(frozen=True)
class State:
    """A method's state across steps: tensors created for ``T`` tasks, carried by the wrapper from
    one step to the next, saved in ``state_dict()`` and refused on load for another ``T``."""

    init: Callable[[int, torch.device], dict[str, torch.Tensor]]
    doc: str


@dataclass(frozen=True)
class Objective:
    """A loss-weighting method: one backward of an objective of the losses, no per-task gradients::

        objective(losses, *, state, params, generator, **options) -> (scalar, new_state)

    ``losses`` is the ``(T,)`` vector of the losses, still in the autograd graph; ``state`` the method's
    tensors across steps (``init(T, device)`` makes the first), ``params`` its learnable parameters
    (``learnable(T, device)`` makes them; the wrapper adds them to the inner optimizer as a parameter
    group of their own), ``generator`` the wrapper's seeded generator (random methods). The returned
    scalar is backpropagated once; the effective weights ``∂objective/∂L_t`` are what diagnostics
    report. ``positive``: the method takes the logarithm of the losses (a loss ≤ 0 is refused).
    """

    objective: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    init: Callable[[int, torch.device], dict[str, torch.Tensor]] = lambda T, device: {}
    learnable: Callable[[int, torch.device], dict[str, torch.Tensor]] | None = None
    positive: bool | Callable[[Mapping[str, Any]], bool] = False  # (of the options, when they decide)


@dataclass(frozen=True)
class Method:
    """A Gram-space method (or an elementwise one, with ``combine``; or a loss-weighting one, with
    ``loss``)."""

    name: str  # the wrapper class: gs.<name>
    function: str | None  # gs.functional.<function> and <function>_weights (None: no functional pair)
    weights: Callable[..., Any] | None  # None: a loss-weighting method (it has no weights from G)
    doc: str  # the math, defaults and differences from the official code (the module docstring)
    bibtex: str = ""
    options: tuple[Option, ...] = ()
    reads_losses: bool | Callable[[Mapping[str, Any]], bool] = False
    random: bool = False  # draws from the wrapper's seeded generator
    state: State | None = None
    solve: str | None = None  # the key of its fused Triton solve in gradsurgery.backend.solvers
    # Elementwise methods need J itself: combine(J, out, **options, reduction, generator, backend)
    # writes the update into out in one pass (no weights, no Gram matrix).
    combine: Callable[..., torch.Tensor] | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)  # common options it fixes (Mean: reduction)
    loss: Objective | None = None  # a loss-weighting method (weights unused)
    aliases: Mapping[str, str] = field(default_factory=dict)  # other names of wrapper methods (a port's habits)

    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def checked(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` (method options only) completed with the defaults and checked; an unknown name
        raises ``TypeError`` like any unexpected keyword argument."""
        known = {option.name: option for option in self.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"{self.name} got unexpected option(s) {unknown}; its options are {sorted(known)}")
        options = {**self.defaults(), **values}
        for name, value in options.items():
            known[name].check(value)
        return options

    def uses_losses(self, options: Mapping[str, Any]) -> bool:
        return self.reads_losses(options) if callable(self.reads_losses) else self.reads_losses

    def summary(self) -> str:
        """The first line of the documentation."""
        return self.doc.strip().splitlines()[0]


# ---------------------------------------------------------------------- checks shared by the methods


def one_of(name: str, choices: tuple[Any, ...]) -> Check:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    return Check(check, f"Literal[{', '.join(repr(choice) for choice in choices)}]")


def positive_int(name: str) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")

    return Check(check, "int")


def finite_number(name: str, *, low: float = float("-inf"), high: float = float("inf"), low_open: bool = False) -> Check:
    """A real number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def check(value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        inside = number and value == value and abs(value) != float("inf") and value <= high
        inside = inside and (value > low if low_open else value >= low)
        if not inside:
            bound = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")

    return Check(check, "float")


def optional(check: Check) -> Check:
    def maybe(value: Any) -> None:
        if value is not None:
            check(value)

    return Check(maybe, f"{check.annotation} | None")
