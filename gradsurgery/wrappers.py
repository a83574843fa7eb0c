"""``gs.<Name>`` for every method of the registry: a class per spec, with the method's options (then
the common ones) in its signature and its documentation in its docstring."""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any, cast

import torch

from .lossweighting import NOT_APPLICABLE, LossWeightingWrapper
from .methods import REGISTRY
from .methods.spec import Method
from .optim import GradSurgery, MethodWrapper

_COMMON = [
    parameter
    for parameter in inspect.signature(GradSurgery.__init__).parameters.values()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
]
_OPTIMIZER_DOC = (
    "the ``torch.optim`` optimizer to wrap; its ``param_groups``, ``state`` and ``defaults`` are the "
    "wrapper's, so LR schedulers, ``torch.amp.GradScaler`` and checkpoints take the wrapper"
)
_SEED_DOC = (
    "seeds the wrapper's own ``torch.Generator`` on the parameters' device (drawn from torch's global "
    "generator when ``None``, so ``torch.manual_seed`` makes runs reproducible); its state is part of "
    "``state_dict()``"
)
_NUM_TASKS_DOC = "the number of tasks, for the learnable parameters created at construction (required)"
_RAISES = (
    "Raises:\n"
    "    TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or is already a wrapper), or an option is\n"
    "        unknown or of the wrong type.\n"
    "    ValueError: an option is out of range (the message names the option and the value), or\n"
    "        ``backend=\"triton\"`` where Triton cannot run.\n"
)


def _common_option_docs() -> dict[str, str]:
    """``name → description`` of the options common to every wrapper, read from the list in
    :class:`GradSurgery`'s docstring (the one place they are described)."""
    _, found, tail = inspect.cleandoc(GradSurgery.__doc__ or "").partition("Options common to every wrapper")
    docs: dict[str, str] = {}
    name = None
    for line in tail.splitlines()[1:] if found else []:
        item = re.match(r"- ``(\w+)``: (.*)", line)
        if item:
            name = item.group(1)
            docs[name] = item.group(2)
        elif name is not None and line.startswith("  ") and line.strip():
            docs[name] += " " + line.strip()
        elif name is not None and line.strip():
            break
    return {name: text.rstrip(";. ") for name, text in docs.items()}


def _arg(name: str, text: str) -> str:
    """One entry of a Google-style ``Args:`` section, wrapped."""
    return textwrap.fill(f"{name}: {text}.", width=104, initial_indent="    ", subsequent_indent="        ") + "\n"


def _example(method: Method) -> str:
    """A doctest that trains one step with the wrapper on a two-task model."""
    extra = ", num_tasks=2" if method.loss is not None and method.loss.learnable is not None else ""
    extra += ", seed=0" if method.random else ""
    return (
        "Examples:\n"
        "    >>> import torch, gradsurgery as gs\n"
        "    >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))\n"
        f"    >>> opt = gs.{method.name}(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1){extra})\n"
        "    >>> features = trunk(torch.randn(16, 4))\n"
        "    >>> losses = [head(features).pow(2).mean() for head in heads]\n"
        "    >>> opt.zero_grad()\n"
        "    >>> opt.backward(losses)\n"
        "    >>> opt.step()\n"
    )


def wrapper_class(method: Method) -> type[MethodWrapper]:
    """``gs.<method.name>``: the optimizer wrapper of a method spec, with its options, then the
    common ones, in its signature and docstring."""
    base: type[MethodWrapper] = LossWeightingWrapper if method.loss is not None else MethodWrapper
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [inspect.Parameter(o.name, keyword, default=o.default, annotation=o.hint) for o in method.options]
    args = "".join(_arg(o.name, f"{o.doc} (default ``{o.default!r}``)") for o in method.options)
    if method.random:
        own.append(inspect.Parameter("seed", keyword, default=None, annotation="int | None"))
        args += _arg("seed", _SEED_DOC)
    if method.loss is not None and method.loss.learnable is not None:
        own.insert(0, inspect.Parameter("num_tasks", keyword, annotation="int"))
        args = _arg("num_tasks", _NUM_TASKS_DOC) + args
    excluded = set(method.fixed) | (set(NOT_APPLICABLE) if method.loss is not None else set())
    common = [p for p in _COMMON if p.name not in excluded]
    common_docs = _common_option_docs()
    args += "".join(_arg(p.name, common_docs[p.name]) for p in common if p.name in common_docs)
    optimizer = inspect.Parameter("optimizer", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="torch.optim.Optimizer")
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    doc = f"{method.name} as an optimizer wrapper.\n\n{inspect.cleandoc(method.doc)}\n\n"
    doc += f"Args:\n{_arg('optimizer', _OPTIMIZER_DOC)}{args}\n{_RAISES}\n{_example(method)}"
    if len(common_docs) < len(common):  # GradSurgery's list was not found: point to it rather than say nothing
        doc += "\nThe options common to every wrapper are described in ``help(gradsurgery.GradSurgery)``.\n"

    def __init__(self: Any, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        base.__init__(self, optimizer, **options)

    # The signature help(), IDEs and the type stubs (gradsurgery/_stubs.py) show: every option, typed.
    signature = inspect.Signature([self, optimizer, *own, *common], return_annotation="None")
    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = f"Wrap ``optimizer`` with {method.name}; see the class documentation for the options."
    __init__.__qualname__ = f"{method.name}.__init__"  # documentation tools look it up by this name
    __init__.__module__ = "gradsurgery"
    attributes: dict[str, Any] = {"method": method, "__init__": __init__, "__doc__": doc, "__module__": "gradsurgery"}
    if not callable(method.reads_losses) and method.loss is None:  # a plain class attribute, readable on the class
        attributes["uses_loss_values"] = method.reads_losses
    for alias, target in method.aliases.items():
        attributes[alias] = getattr(base, target)
    return cast(type[MethodWrapper], type(method.name, (base,), attributes))


WRAPPERS: dict[str, type[MethodWrapper]] = {method.name: wrapper_class(method) for method in REGISTRY}
