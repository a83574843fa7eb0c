"""Functional API: ``J (T, P) → d (P,)`` and ``G (T, T) → w (T,)``, for every method of the registry.

For each method with a ``function`` name there is ``<function>(J, ...)`` (Gram → weights → combine:
two passes over ``J`` and a ``T × T`` solve) and ``<function>_weights(G, ...)``, which takes the Gram
matrix directly. Keyword names and defaults are the wrappers' (the method's options, ``reduction``,
``losses=`` for methods that read loss values, ``generator=`` for random ones, ``state=`` for stateful
ones, which then return ``(d, state)`` / ``(w, state)``), plus ``out=`` and ``backend=``.

Inputs are checked for NaN/Inf through the Gram matrix's diagonal (``T`` values, no extra pass over
``J``, one host synchronisation; a second only when that diagonal is out of range). A non-finite
input raises :class:`~gradsurgery.errors.NonFiniteGradientError` naming exactly the tasks whose rows
hold NaN/Inf. A Gram matrix that overflowed or underflowed in fp32 although ``J`` is finite is
recomputed with the rows scaled first, and the combine then runs in fp64 (see
:func:`gradsurgery.backend.gram`), so magnitudes from 1e-30 to 1e30 work in fp32.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any, Callable

import torch

from . import backend as _backend
from .errors import NonFiniteGradientError
from .hints import Backend
from .kernels._checks import SUPPORTED_DTYPES, overlaps
from .methods import REGISTRY
from .methods._common import check_gram, check_reduction
from .methods.spec import Method
from .pipeline import Target, aggregate as _aggregate


def gram(J: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``G = J Jᵀ`` (fp32 accumulation; fp64 for fp64 ``J``).

    Args:
        J: ``(T, P)`` task gradients, or ``(..., T, P)`` for a batch.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The ``(T, T)`` Gram matrix (``(..., T, T)`` for a batch).

    Raises:
        ValueError: ``J`` is not ``(..., T, P)`` with ``T ≥ 1``, not floating point, a meta tensor or
            requires grad; ``backend="triton"`` where Triton cannot run.
        TypeError: ``J`` is not a tensor.

    Examples:
        >>> import torch, gradsurgery as gs
        >>> gs.functional.gram(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        tensor([[1., 1.],
                [1., 2.]])
    """
    _check_J(J)
    return _backend.gram(J, backend=backend)


def aggregate(
    J: torch.Tensor,
    weights_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``d = weights_of(G)ᵀ J`` with ``G = J Jᵀ``: any Gram-space method applied to ``J``.

    Args:
        J: ``(T, P)`` task gradients.
        weights_of: ``G (T, T) → w (T,)``, the weights on the sum scale.
        out: a ``(P,)`` tensor to write the update into (default: a new one).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        The ``(P,)`` update.

    Raises:
        NonFiniteGradientError: a row of ``J`` holds NaN/Inf (the error names the tasks).
        ValueError: ``J`` is not a valid ``(T, P)`` input (see :func:`gram`).
        TypeError: ``J`` is not a tensor.

    Examples:
        >>> import torch, gradsurgery as gs
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> gs.functional.aggregate(J, lambda G: 1 / G.diagonal().sqrt())  # each gradient normalised
        tensor([1., 1.])
    """
    _check_J(J)
    _check_out(J, out)
    _backend.check_backend(backend, J.device)
    G = _checked_gram(J, backend)
    if out is None:
        out = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
    _aggregate(J, [Target(slice(None), out)], weights_of, backend=backend, G=G)
    return out


def check_finite_gram(G: torch.Tensor) -> None:
    """Raise :class:`NonFiniteGradientError` naming the tasks whose gradients are non-finite (host sync).

    A NaN/Inf in row ``t`` of ``J`` makes ``G[t, t]`` non-finite and, through it, the whole row and
    column ``t``: the diagonal names exactly those tasks. A ``G`` that is non-finite only off the
    diagonal (given directly, not computed from ``J``) names the tasks of its non-finite rows.

    Args:
        G: ``(T, T)`` Gram matrix, or ``(..., T, T)`` for a batch.

    Returns:
        ``None`` when every entry is finite.

    Raises:
        NonFiniteGradientError: some entry is NaN/Inf; ``.tasks`` lists the tasks.

    Examples:
        >>> import torch, gradsurgery as gs
        >>> gs.functional.check_finite_gram(torch.eye(2))
    """
    finite = torch.isfinite(G)
    if bool(finite.all()):
        return
    bad = ~finite.diagonal(dim1=-2, dim2=-1)
    if not bool(bad.any()):
        bad = ~finite.all(dim=-1)
    where = bad.nonzero().tolist()  # (..., task) per non-finite task
    tasks = sorted({index[-1] for index in where})
    entries = f" in batch entries {sorted({tuple(index[:-1]) for index in where})}" if G.dim() > 2 else ""
    raise NonFiniteGradientError(
        f"non-finite gradient (NaN/Inf, or a squared norm that overflows {G.dtype}) for task(s) {tasks}{entries}",
        tasks=tasks,
    )


def _checked_gram(J: torch.Tensor, backend: str) -> torch.Tensor:
    G, in_range = _backend.rescued(J, _backend.gram(J, backend=backend))
    if not in_range:  # the common case reads G back once, in the rescue check
        check_finite_gram(G)
    return G


def _check_J(J: torch.Tensor) -> None:
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"J must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() < 2:
        raise ValueError(f"J must be (T, P), or (..., T, P) for a batch of problems, got shape {tuple(J.shape)}")
    if J.shape[-2] == 0:
        raise ValueError("J has T = 0 rows: there must be at least one task")
    if not J.dtype.is_floating_point:
        raise ValueError(f"J must be floating point, got dtype {J.dtype}")
    if J.is_meta:
        raise ValueError("J is a meta tensor (shape only, no values): pass the task gradients themselves")
    if J.requires_grad:
        raise ValueError("J requires grad: the functional API is not differentiable; pass J.detach() (the task gradients as data)")


def _check_out(J: torch.Tensor, out: torch.Tensor | None) -> None:
    """``out`` takes the update of ``J`` ``(..., T, P)``: a floating ``(..., P)`` tensor on J's device with
    contiguous rows, sharing no memory with ``J`` (checked before anything is computed or drawn)."""
    if out is None:
        return
    shape = (*J.shape[:-2], J.shape[-1])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a tensor of shape {shape} (J's batch shape and P), got {got}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out must have a floating-point dtype ({', '.join(map(str, SUPPORTED_DTYPES))}), got {out.dtype}")
    if out.device != J.device:
        raise ValueError(f"out is on {out.device} but J is on {J.device}")
    if out.numel() > 1 and out.stride(-1) != 1:
        raise ValueError(f"out must have contiguous rows (stride(-1) == 1), got strides {out.stride()}")
    if overlaps(out, J):
        raise ValueError("out must not share memory with J")


def _check_G(G: torch.Tensor) -> None:
    check_gram(G)
    check_finite_gram(G)


# ---------------------------------------------------------------------- one pair per method


_EXTRA_TYPES = {
    "losses": "torch.Tensor | Sequence[float] | None",
    "generator": "torch.Generator | None",
    "state": "dict[str, torch.Tensor] | None",
}


def _extras(method: Method) -> list[str]:
    """The keywords beyond the options that the method's functions take, besides reduction/backend."""
    names = []
    if method.reads_losses:
        names.append("losses")
    if method.random:
        names.append("generator")
    if method.state is not None:
        names.append("state")
    return names


def _split(method: Method, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """kwargs → (checked options, extras for the weights function, reduction, backend)."""
    reduction = kwargs.pop("reduction", "sum")
    backend = kwargs.pop("backend", "auto")
    check_reduction(reduction)
    _backend.check_backend(backend)
    extras = {name: kwargs.pop(name) for name in _extras(method) if name in kwargs}
    generator = extras.get("generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    state = extras.get("state")
    if state is not None and method.state is not None:
        expected = set(method.state.init(1, torch.device("cpu")))
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be the dict of {sorted(expected)} that {method.function} returned, got {got}")
    options = method.checked(kwargs)
    if "losses" in extras and not method.uses_losses(options):
        extras.pop("losses")
    if extras.get("losses") is not None:
        _check_finite_losses(extras["losses"])
    return options, extras, reduction, backend


def _check_finite_losses(losses: Any) -> None:
    """Loss values the weights read must be finite, as the gradients must (one host sync)."""
    values = torch.as_tensor(losses).detach()
    finite = values.isfinite()
    if bool(finite.all()):
        return
    tasks = sorted({index[-1] for index in (~finite).nonzero().tolist()}) if values.dim() else [0]
    raise NonFiniteGradientError(f"non-finite loss value (NaN/Inf) for task(s) {tasks}", tasks=tasks)


def _weights(method: Method, G: torch.Tensor, options: dict[str, Any], extras: dict[str, Any], reduction: str, backend: str) -> Any:
    weights_of = method.weights
    assert weights_of is not None  # a loss-weighting method has no functional pair
    if method.solve is not None:
        extras = {**extras, "solve": _backend.solvers(backend, G).get(method.solve)}
    if method.state is not None:
        state = extras.pop("state", None)
        if state is None:  # the method's initial state, for every entry of a batch
            batch = G.shape[:-2]
            state = {k: v.expand(*batch, *v.shape).clone() for k, v in method.state.init(G.shape[-1], G.device).items()}
        return weights_of(G, reduction=reduction, **options, **extras, state=state)
    return weights_of(G, reduction=reduction, **options, **extras)


def _pair(method: Method) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``<function>(J, ...)`` and ``<function>_weights(G, ...)`` for ``method``."""

    def on_gram(G: torch.Tensor, **kwargs: Any) -> Any:
        options, extras, reduction, backend = _split(method, kwargs)
        _check_G(G)
        return _weights(method, G, options, extras, reduction, backend)

    def on_rows(J: torch.Tensor, *, out: torch.Tensor | None = None, **kwargs: Any) -> Any:
        options, extras, reduction, backend = _split(method, kwargs)
        _check_J(J)
        _check_out(J, out)
        _backend.check_backend(backend, J.device)
        if out is None:
            out = torch.empty(J.shape[:-2] + J.shape[-1:], dtype=J.dtype, device=J.device)
        if method.combine is not None:
            if J.dim() > 2:
                return _elementwise_batch(method, J, out, dict(options, **extras), reduction, backend)
            return method.combine(J, out=out, reduction=reduction, backend=backend, **options, **extras)
        G = _checked_gram(J, backend)
        if J.dim() > 2:
            result = _weights(method, G, options, dict(extras), reduction, backend)
            w, new_state = result if method.state is not None else (result, None)
            wide = G.dtype == torch.float64 and J.dtype != torch.float64
            _backend.combine(w, J, out, backend=backend, wide=wide)
            return (out, new_state) if method.state is not None else out
        state: list[Any] = []

        def weights_of(G: torch.Tensor) -> torch.Tensor:
            result = _weights(method, G, options, dict(extras), reduction, backend)
            if method.state is not None:
                result, new_state = result
                state.append(new_state)
            w: torch.Tensor = result
            return w

        _aggregate(J, [Target(slice(None), out)], weights_of, backend=backend, G=G)
        return (out, state[0]) if state else out

    # The signatures help(), IDEs and the type stubs (gradsurgery/_stubs.py) show: every keyword, typed.
    keyword, positional = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(o.name, keyword, default=o.default, annotation=o.hint) for o in method.options]
    parameters += [inspect.Parameter(name, keyword, default=None, annotation=_EXTRA_TYPES[name]) for name in _extras(method)]
    parameters.append(inspect.Parameter("reduction", keyword, default="sum", annotation="Reduction"))
    tail = [inspect.Parameter("backend", keyword, default="auto", annotation="Backend")]
    out_parameter = inspect.Parameter("out", keyword, default=None, annotation="torch.Tensor | None")
    stateful = method.state is not None
    returns = "tuple[torch.Tensor, dict[str, torch.Tensor]]" if stateful else "torch.Tensor"
    rows = [inspect.Parameter("J", positional, annotation="torch.Tensor"), *parameters, out_parameter, *tail]
    grams = [inspect.Parameter("G", positional, annotation="torch.Tensor"), *parameters, *tail]
    on_rows.__signature__ = inspect.Signature(rows, return_annotation=returns)  # type: ignore[attr-defined]
    on_gram.__signature__ = inspect.Signature(grams, return_annotation=returns)  # type: ignore[attr-defined]
    name = method.function
    assert name is not None
    on_rows.__name__ = on_rows.__qualname__ = name
    on_gram.__name__ = on_gram.__qualname__ = f"{name}_weights"
    on_rows.__doc__, on_gram.__doc__ = _docs(method)
    return on_rows, on_gram


def _docs(method: Method) -> tuple[str, str]:
    """The docstrings of ``<function>(J, ...)`` and ``<function>_weights(G, ...)``: Google style, the
    method's options as the wrapper's, a doctest each."""

    def arg(name: str, text: str) -> str:
        return textwrap.fill(f"{name}: {text}.", width=104, initial_indent="    ", subsequent_indent="        ") + "\n"

    name, function = method.name, method.function
    options = "".join(arg(o.name, f"{o.doc} (default ``{o.default!r}``)") for o in method.options)
    if method.reads_losses:
        options += arg("losses", "the ``T`` loss values (``(..., T)`` for a batch), for the options that read them")
    if method.random:
        options += arg("generator", "the ``torch.Generator`` to draw from (default: torch's global generator)")
    if method.state is not None:
        options += arg("state", f"the state the previous call returned (default: the initial state: {method.state.doc})")
    options += arg("reduction", '``"sum"`` (default: the scale of ``sum(losses).backward()``) or ``"mean"`` (divided by ``T``)')
    backend = arg("backend", '``"auto"`` (Triton for CUDA tensors when it imports), ``"torch"`` or ``"triton"``')
    stateful = ", and the new state: ``(d, state)``" if method.state is not None else ""
    raises = (
        "Raises:\n"
        "    NonFiniteGradientError: a row holds NaN/Inf (the error names the tasks).\n"
        "    ValueError: an input of the wrong shape or dtype, or an option out of range (named with its value).\n"
        "    TypeError: an input that is not a tensor, or an unknown option.\n"
    )
    extra = ", generator=torch.Generator().manual_seed(0)" if method.random else ""
    unpack = "d, state = " if method.state is not None else "d = "
    rows = (
        f"The {name} update of the rows of ``J``.\n\n{method.summary()}\n\n"
        f"The update ``gs.{name}`` writes into the shared parameters' ``.grad``, for a ``J`` given directly: the\n"
        "method's math, defaults and references are in that class's documentation.\n\n"
        "Args:\n"
        + arg("J", "``(T, P)`` task gradients, one row per task, or ``(..., T, P)`` for a batch of independent problems")
        + options
        + arg("out", "a ``(P,)`` tensor to write the update into (default: a new one)")
        + backend
        + f"\nReturns:\n    The ``(P,)`` update (``(..., P)`` for a batch){stateful}.\n\n"
        + raises
        + "\nExamples:\n"
        "    >>> import torch, gradsurgery as gs\n"
        "    >>> J = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])  # two tasks' gradients of 3 shared values\n"
        f"    >>> {unpack}gs.functional.{function}(J{extra})\n"
        "    >>> d.shape\n"
        "    torch.Size([3])\n"
    )
    gram = (
        f"The {name} weights from the Gram matrix ``G = J Jᵀ``.\n\n{method.summary()}\n\n"
        f"``d = wᵀJ`` is ``gs.functional.{function}(J)``; these are the weights alone, for a ``G`` computed\n"
        "elsewhere (accumulated, all-reduced, or of a representation).\n\n"
        "Args:\n"
        + arg("G", "``(T, T)`` Gram matrix of the task gradients, or ``(..., T, T)`` for a batch")
        + options
        + backend
        + f"\nReturns:\n    The ``(T,)`` float64 weights (``(..., T)`` for a batch){stateful}.\n\n"
        + raises.replace("a row holds", "``G`` holds")
        + "\nExamples:\n"
        "    >>> import torch, gradsurgery as gs\n"
        "    >>> J = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]])\n"
        f"    >>> {unpack.replace('d', 'w')}gs.functional.{function}_weights(J @ J.T{extra})\n"
        "    >>> w.shape\n"
        "    torch.Size([2])\n"
    )
    return rows, gram


def _elementwise_batch(method: Method, J: torch.Tensor, out: torch.Tensor, options: dict[str, Any], reduction: str, backend: str) -> torch.Tensor:
    """An elementwise method on a batch: the entries side by side as the columns of one ``(T, B·P)``
    matrix (one call; entry ``b``'s columns draw with offset ``b·P``), then back to ``(..., P)``."""
    assert method.combine is not None
    T, P = J.shape[-2:]
    flat = J.reshape(-1, T, P).transpose(0, 1).reshape(T, -1)
    result = method.combine(flat, out=torch.empty(flat.shape[1], dtype=out.dtype, device=out.device), reduction=reduction, backend=backend, **options)
    return out.copy_(result.reshape(out.shape))


_FUNCTIONS: dict[str, Callable[..., Any]] = {}
for _method in REGISTRY:
    if _method.function is not None:
        _on_rows, _on_gram = _pair(_method)
        _FUNCTIONS[_method.function] = _on_rows
        if _method.combine is None:  # an elementwise method needs J: it has no weights from G
            _FUNCTIONS[f"{_method.function}_weights"] = _on_gram
globals().update(_FUNCTIONS)

__all__ = ["aggregate", "check_finite_gram", "gram", *sorted(_FUNCTIONS)]  # pyright: ignore[reportUnsupportedDunderAll]  (listed in functional.pyi)
