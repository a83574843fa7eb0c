"""Every registered method by name, built the same way by every benchmark and the study.

The one name → method factory of ``bench/``, on :data:`gradsurgery.methods.REGISTRY`: a method added to
the registry is in the step suite, the aggregation benchmark, the tiny problem and the study's
``--methods`` without a change here.

- A method's **name** here is its function name (``"pcgrad"``, ``"nash_mtl"``, ``"random"``) or, for
  ``Sum``/``Mean`` which have none, its wrapper name in lower case; :func:`lookup` also takes the wrapper
  name (``"NashMTL"``), in any case.
- The benchmarks' **own choices** of a method's options are :data:`BENCH_OPTIONS` (CAGrad's ``c``);
  every other option keeps the library's default. Methods that draw random numbers get ``seed``.
- Three **kinds** (:func:`kind`): ``"gram"`` (weights from the Gram matrix: PCGrad, CAGrad, ...),
  ``"elementwise"`` (needs ``J`` itself: GradDrop) and ``"loss"`` (one backward of an objective of the
  losses, no per-task gradients: UW, DWA, ...). Only ``"gram"`` methods have weights from ``G``; only
  ``"loss"`` methods take ``num_tasks`` and refuse the per-task-gradient options (``engine=``, ...).

Importing this module imports neither torch nor gradsurgery (the GPU step sets Triton's interpreter
switch before the library loads); the functions do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

    import gradsurgery as gs
    from gradsurgery.methods import Method

CAGRAD_C = 0.4  # the official NYUv2/Cityscapes value, for ours and the peers alike
SEED = 0
# The benchmarks' choices, by wrapper name; the rest are the library's defaults.
BENCH_OPTIONS: Mapping[str, Mapping[str, Any]] = {"CAGrad": {"c": CAGRAD_C}}
# The three methods every grid (T, models, engines) has tracked since the first run; the other
# registered methods are timed at one T beside them.
ORIGINAL: tuple[str, ...] = ("pcgrad", "cagrad", "mgda")

Options = Mapping[str, Mapping[str, Any]]  # per wrapper name: that method's options


def _registry() -> tuple[Method, ...]:
    from gradsurgery.methods import REGISTRY

    return REGISTRY


def key(method: Method) -> str:
    """The name the benchmarks and the study use: the function name, else the wrapper name in lower case."""
    return method.function or method.name.lower()


def names() -> tuple[str, ...]:
    """Every registered method's name, in the registry's order."""
    return tuple(key(method) for method in _registry())


def lookup(name: str) -> Method:
    """The registered method called ``name`` (its function or wrapper name, in any case)."""
    folded = name.casefold()
    for method in _registry():
        if folded in {key(method).casefold(), method.name.casefold()}:
            return method
    raise ValueError(f"unknown method {name!r}; choose from {','.join(names())} (or their wrapper names)")


def kind(name: str) -> str:
    """``"gram"``, ``"elementwise"`` or ``"loss"`` (see the module docstring)."""
    method = lookup(name)
    if getattr(method, "loss", None) is not None:
        return "loss"
    return "elementwise" if method.combine is not None else "gram"


def names_of(*kinds: str) -> tuple[str, ...]:
    """The registered names of those kinds, in the registry's order."""
    return tuple(name for name in names() if kind(name) in kinds)


def method_options(method: Method, options: Options | None = None) -> dict[str, Any]:
    """The method's own options as the benchmarks set them: :data:`BENCH_OPTIONS`, then ``options``."""
    unknown = sorted(set(options or {}) - {m.name for m in _registry()})
    if unknown:
        raise ValueError(f"options given for unregistered method(s) {unknown}")
    return {**BENCH_OPTIONS.get(method.name, {}), **(options or {}).get(method.name, {})}


def make_wrapper(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    seed: int = SEED,
    options: Options | None = None,
    num_tasks: int | None = None,
    **common: Any,
) -> gs.GradSurgery:
    """``gs.<Name>(optimizer, ...)`` for the method called ``name``.

    ``options`` maps wrapper names to method options that replace the benchmarks' (e.g. the toy's
    ``{"CAGrad": {"c": 0.5}}``; a method not named there keeps its own); ``seed`` seeds a method that
    draws random numbers; ``num_tasks`` goes to a loss-weighting method (those with learnable
    parameters need it) and nowhere else; ``common`` are the wrapper options (``engine=``,
    ``storage_dtype=``, ``backend=``, ``nonfinite=``, ...), which a loss-weighting wrapper checks
    (it refuses those about per-task gradients).
    """
    import gradsurgery

    method = lookup(name)
    extra: dict[str, Any] = {"seed": seed} if method.random else {}
    if kind(name) == "loss":
        extra["num_tasks"] = num_tasks
    return getattr(gradsurgery, method.name)(optimizer, **method_options(method, options), **extra, **common)


def weights_function(
    name: str, *, seed: int = SEED, options: Options | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``G → w`` for the method called ``name``: ``gs.functional.<function>_weights`` with the benchmarks'
    options (``Sum``/``Mean``, which have no functional pair: the spec's weights). A random method draws
    from its own generator, seeded once; a stateful one carries its state from call to call, as the
    wrapper does. ``ValueError`` for a method of another kind (it has no weights from ``G``)."""
    import torch

    import gradsurgery.functional as F

    method = lookup(name)
    if kind(name) != "gram":
        raise ValueError(f"{method.name} is a {kind(name)} method: it has no weights from G")
    kwargs = method_options(method, options)
    if method.function is None:
        return lambda G: method.weights(G, **method.fixed, **kwargs)
    weights = getattr(F, f"{method.function}_weights")
    if method.random:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if method.state is None:
        return lambda G: weights(G, **kwargs)
    state: dict[str, Any] = {}

    def stateful(G: torch.Tensor) -> torch.Tensor:
        w, state["state"] = weights(G, state=state.get("state"), **kwargs)
        return w

    return stateful


def aggregate_function(
    name: str, *, seed: int = SEED, options: Options | None = None
) -> Callable[..., torch.Tensor]:
    """``J → d`` (``out=`` accepted) for the method called ``name``: ``gs.functional.<function>`` with the
    benchmarks' options (``Sum``/``Mean``: ``gs.functional.aggregate`` with their weights); a stateful
    method carries its state from call to call. ``ValueError`` for a loss-weighting method (no ``J``)."""
    import torch

    import gradsurgery.functional as F

    method = lookup(name)
    if kind(name) == "loss":
        raise ValueError(f"{method.name} weights the losses: it computes no per-task gradients to aggregate")
    if method.function is None:
        weights = weights_function(name, seed=seed, options=options)
        return lambda J, out=None: F.aggregate(J, weights, out=out)
    function = getattr(F, method.function)
    kwargs = method_options(method, options)
    if method.random:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if method.state is None:
        return lambda J, out=None: function(J, out=out, **kwargs)
    state: dict[str, Any] = {}

    def stateful(J: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d, state["state"] = function(J, out=out, state=state.get("state"), **kwargs)
        return d

    return stateful


def engine_in_use(wrapper: gs.GradSurgery, device: torch.device) -> str:
    """The engine a wrapper computes the task gradients with, from its public ``engine`` option and the
    documented rule for ``"auto"`` (the loop where the batched backward is not preferred, e.g. the CPU;
    there, batched with the loop as fallback); none for a loss-weighting wrapper (one backward). The
    wrapper does not expose which one a step ran."""
    from gradsurgery.taskgrads import prefers_batched

    if kind(wrapper.method.name) == "loss":
        return "none (one backward)"
    if wrapper.engine != "auto":
        return wrapper.engine
    return "batched (loop if vmap cannot run the graph)" if prefers_batched(device) else "loop"
