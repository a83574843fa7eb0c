"""The types users' checkers see: the stubs of the wrappers and functional pairs are what the registry
builds, every option has a type, and each ``Literal`` names exactly the values its check accepts.
(mypy and pyright themselves run in ``.ci/typecheck``, over the package and ``tests/typing/``.)"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch

import gradsurgery as gs
from gradsurgery import hints
from gradsurgery._stubs import STUBS
from gradsurgery.methods import REGISTRY
from gradsurgery.methods.spec import Method, Option
from gradsurgery.wrappers import WRAPPERS

PACKAGE = Path(gs.__file__).parent
OPTIONS = [pytest.param(method, option, id=f"{method.name}.{option.name}") for method in REGISTRY for option in method.options]


@pytest.mark.parametrize("file", sorted(STUBS))
def test_stub_is_what_the_registry_builds(file: str) -> None:
    written = (PACKAGE / file).read_text()
    assert written == STUBS[file](), f"gradsurgery/{file} is stale: run python -m gradsurgery._stubs"


@pytest.mark.parametrize(("method", "option"), OPTIONS)
def test_every_option_has_a_type(method: Method, option: Option) -> None:
    assert option.hint != "Any", f"{method.name}'s {option.name} has no type: give its Option an annotation="


def _literal_choices(hint: str) -> tuple[object, ...] | None:
    if not hint.startswith("Literal["):
        return None
    return typing.get_args(eval(hint, {"Literal": typing.Literal}))  # noqa: S307 (our own hint strings)


@pytest.mark.parametrize(("method", "option"), [p for p in OPTIONS if _literal_choices(p.values[1].hint) is not None])
def test_a_literal_option_names_exactly_what_its_check_accepts(method: Method, option: Option) -> None:
    choices = _literal_choices(option.hint)
    assert choices is not None and option.default in choices
    for choice in choices:
        option.check(choice)
    for other in ("", "other", 0, None):
        if other not in choices:
            with pytest.raises(ValueError, match=option.name):
                option.check(other)


@pytest.mark.parametrize(
    ("alias", "choices"),
    [
        (hints.Reduction, ("sum", "mean")),
        (hints.NonFinite, ("raise", "skip", "propagate")),
        (hints.Engine, ("loop", "batched", "auto")),
        (hints.Backend, ("auto", "torch", "triton")),
        (hints.Sync, ("exact", "local", "sharded")),
        (hints.GranularityName, ("all", "parameter", "module")),
    ],
)
def test_the_common_literals_are_the_choices_the_wrappers_accept(alias: object, choices: tuple[str, ...]) -> None:
    assert typing.get_args(alias) == choices
    model = torch.nn.Linear(2, 2)
    name = {
        hints.Reduction: "reduction",
        hints.NonFinite: "nonfinite",
        hints.Engine: "engine",
        hints.Backend: "backend",
        hints.Sync: "sync",
        hints.GranularityName: "granularity",
    }[alias]
    with pytest.raises(ValueError, match=name):
        gs.Sum(torch.optim.SGD(model.parameters(), lr=0.1), **{name: "no such choice"})


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_every_wrapper_parameter_is_annotated(name: str) -> None:
    signature = inspect.signature(getattr(gs, name).__init__)
    missing = [p.name for p in signature.parameters.values() if p.name != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}({', '.join(missing)}) without a type"


def test_diagnostics_reports_have_the_keys_their_types_declare() -> None:
    model = torch.nn.Linear(3, 2)
    opt = gs.MGDA(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward(list(model(torch.randn(5, 3)).pow(2).mean(0)))
    report = opt.diagnostics()
    declared = typing.get_type_hints(hints.Diagnostics)
    assert hints.Diagnostics.__required_keys__ <= set(report) <= set(declared)
    uw = gs.UW(torch.optim.SGD(model.parameters(), lr=0.1), num_tasks=2)
    uw.backward(list(model(torch.randn(5, 3)).pow(2).mean(0)))
    assert set(uw.diagnostics()) == hints.LossWeightingDiagnostics.__required_keys__
