"""``gs.<Name>`` for every method of the registry: a class per spec, with the method's options (then
the common ones) in its signature and its documentation in its docstring."""

from __future__ import annotations

import inspect
from typing import Any

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
_SEED_DOC = (
    "    - ``seed`` (default ``None``): seeds the wrapper's own ``torch.Generator`` on the parameters' device\n"
    "      (drawn from torch's global generator when ``None``, so ``torch.manual_seed`` makes runs\n"
    "      reproducible); its state is part of ``state_dict()``.\n"
)
_NUM_TASKS_DOC = "    - ``num_tasks`` (required): the number of tasks, for the learnable parameters created at construction.\n"


def wrapper_class(method: Method) -> type[GradSurgery]:
    """``gs.<method.name>``: the optimizer wrapper of a method spec, with its options, then the
    common ones, in its signature and docstring."""
    base: type[MethodWrapper] = LossWeightingWrapper if method.loss is not None else MethodWrapper
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [inspect.Parameter(o.name, keyword, default=o.default) for o in method.options]
    option_lines = "".join(f"    - ``{o.name}`` (default ``{o.default!r}``): {o.doc}\n" for o in method.options)
    if method.random:
        own.append(inspect.Parameter("seed", keyword, default=None))
        option_lines += _SEED_DOC
    if method.loss is not None and method.loss.learnable is not None:
        own.insert(0, inspect.Parameter("num_tasks", keyword))
        option_lines = _NUM_TASKS_DOC + option_lines
    excluded = set(method.fixed) | (set(NOT_APPLICABLE) if method.loss is not None else set())
    common = [p for p in _COMMON if p.name not in excluded]
    optimizer = inspect.Parameter("optimizer", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.optim.Optimizer)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    doc = f"{method.name} as an optimizer wrapper.\n\n{method.doc.strip()}\n"
    if option_lines:
        doc += f"\n    Options of {method.name}:\n\n{option_lines}"
    doc += "\n    The options common to every wrapper are described in :class:`gradsurgery.GradSurgery`."

    def __init__(self: MethodWrapper, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        base.__init__(self, optimizer, **options)

    __init__.__signature__ = inspect.Signature([self, optimizer, *own, *common])  # type: ignore[attr-defined]
    __init__.__doc__ = f"Wrap ``optimizer`` with {method.name}; see the class documentation for the options."
    attributes: dict[str, Any] = {"method": method, "__init__": __init__, "__doc__": doc, "__module__": "gradsurgery"}
    if not callable(method.reads_losses) and method.loss is None:  # a plain class attribute, readable on the class
        attributes["uses_loss_values"] = method.reads_losses
    for alias, target in method.aliases.items():
        attributes[alias] = getattr(base, target)
    return type(method.name, (base,), attributes)


WRAPPERS: dict[str, type[GradSurgery]] = {method.name: wrapper_class(method) for method in REGISTRY}
