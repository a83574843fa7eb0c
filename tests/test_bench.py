"""bench/'s method factory, TorchJD peers and the suites' variants: every registered method, built once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import gradsurgery as gs
from bench import methods as bm
from gradsurgery.methods import REGISTRY

NAMES = [method.function or method.name.lower() for method in REGISTRY]
GRAM = [name for name in NAMES if bm.kind(name) == "gram"]


def _inner() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def _gram(T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, 50, generator=g, dtype=torch.float64)
    J[1] = -0.5 * J[0] + 0.3 * J[1]  # a conflicting pair
    return J @ J.T


def test_names_follow_the_registry() -> None:
    assert bm.names() == tuple(NAMES)
    assert set(bm.ORIGINAL) <= set(NAMES)


@pytest.mark.parametrize("method", REGISTRY, ids=lambda m: m.name)
def test_lookup_takes_function_and_wrapper_names_in_any_case(method) -> None:
    name = method.function or method.name.lower()
    for spelling in (name, name.upper(), method.name, method.name.lower()):
        assert bm.lookup(spelling) is method


def test_lookup_refuses_an_unknown_name_listing_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'pcgard'; choose from sum,mean,pcgrad"):
        bm.lookup("pcgard")


@pytest.mark.parametrize("name", NAMES)
def test_make_wrapper_builds_the_registered_class_with_the_benchmarks_options(name: str) -> None:
    method = bm.lookup(name)
    if bm.kind(name) == "loss":  # one backward: no engine; learnable parameters need num_tasks
        opt = bm.make_wrapper(name, _inner(), num_tasks=2)
        with pytest.raises(ValueError, match="engine= does not apply"):
            bm.make_wrapper(name, _inner(), num_tasks=2, engine="loop")
    else:
        opt = bm.make_wrapper(name, _inner(), num_tasks=2, engine="loop")  # num_tasks: not passed on
        assert opt.engine == "loop"
    assert type(opt) is gs.WRAPPERS[method.name]
    expected = {**method.defaults(), **bm.BENCH_OPTIONS.get(method.name, {})}
    assert {k: getattr(opt, k) for k in expected} == expected
    if method.random:
        assert opt.seed == bm.SEED


def test_options_replace_the_benchmarks_for_the_named_method_only() -> None:
    assert bm.make_wrapper("cagrad", _inner()).c == bm.CAGRAD_C
    assert bm.make_wrapper("CAGrad", _inner(), options={"CAGrad": {"c": 0.5}}).c == 0.5
    assert bm.make_wrapper("mgda", _inner(), options={"CAGrad": {"c": 0.5}}).normalization == "none"
    assert bm.make_wrapper("pcgrad", _inner(), seed=7).seed == 7
    with pytest.raises(ValueError, match="unregistered"):
        bm.make_wrapper("pcgrad", _inner(), options={"CAgrad": {"c": 0.5}})
    with pytest.raises(TypeError):  # the wrapper checks a method's options
        bm.make_wrapper("cagrad", _inner(), options={"CAGrad": {"radius": 0.5}})


@pytest.mark.parametrize("name", GRAM)
def test_weights_function_is_the_functional_api_with_the_benchmarks_options(name: str) -> None:
    method = bm.lookup(name)
    G = _gram(4)
    w = bm.weights_function(name)(G)
    if method.function is None:
        expected = torch.full((4,), 0.25 if method.fixed.get("reduction") == "mean" else 1.0, dtype=torch.float64)
    else:
        kwargs = dict(bm.BENCH_OPTIONS.get(method.name, {}))
        if method.random:
            kwargs["generator"] = torch.Generator().manual_seed(bm.SEED)
        expected = getattr(gs.functional, f"{name}_weights")(G, **kwargs)
        if method.state is not None:
            expected = expected[0]
    torch.testing.assert_close(w, expected)
    L = torch.linalg.cholesky(G).contiguous()  # rows whose Gram matrix is G
    torch.testing.assert_close(bm.aggregate_function(name)(L), expected @ L)


def test_a_stateful_method_carries_its_state_from_call_to_call() -> None:
    stateful = next(m for m in REGISTRY if m.state is not None)
    name = stateful.function
    G = _gram(3)
    carried = bm.weights_function(name)
    first, second = carried(G), carried(G)
    fresh = bm.weights_function(name)(G)
    torch.testing.assert_close(first, fresh)
    assert not torch.allclose(second, first)  # the EMA targets moved after the first call


def test_an_elementwise_method_has_no_weights_function() -> None:
    elementwise = next(m for m in REGISTRY if m.combine is not None)
    assert bm.kind(elementwise.name) == "elementwise"
    with pytest.raises(ValueError, match="elementwise"):
        bm.weights_function(elementwise.name)
    d = bm.aggregate_function(elementwise.name)(torch.randn(3, 20))
    assert d.shape == (20,) and torch.isfinite(d).all()


@pytest.mark.parametrize("name", [n for n in NAMES if bm.kind(n) == "loss"])
def test_a_loss_weighting_method_has_neither_weights_nor_an_aggregation(name: str) -> None:
    with pytest.raises(ValueError, match="loss"):
        bm.weights_function(name)
    with pytest.raises(ValueError, match="weights the losses"):
        bm.aggregate_function(name)
    assert bm.engine_in_use(bm.make_wrapper(name, _inner(), num_tasks=2), torch.device("cpu")).startswith("none")


def test_engine_in_use_follows_the_option_and_the_auto_rule() -> None:
    cpu = torch.device("cpu")
    assert bm.engine_in_use(bm.make_wrapper("pcgrad", _inner(), engine="batched"), cpu) == "batched"
    assert bm.engine_in_use(bm.make_wrapper("pcgrad", _inner()), cpu) == "loop"


# ---------------------------------------------------------------------- TorchJD peers


@pytest.mark.filterwarnings("ignore:.*not DPP")  # TorchJD's Nash-MTL, on every solve
@pytest.mark.parametrize("name", GRAM)
def test_a_deterministic_peer_computes_what_we_compute(name: str) -> None:
    pytest.importorskip("torchjd")
    from bench.peers import torchjd_peer, torchjd_weighting

    method, peer = bm.lookup(name), torchjd_peer(name)
    if peer is None:
        pytest.skip(f"TorchJD has no counterpart of {method.name}")
    G = _gram(2)  # T = 2: PCGrad's and GradVac's single visiting order, nothing drawn
    L = torch.linalg.cholesky(G)
    if not torch.equal(bm.weights_function(name, seed=1)(G), bm.weights_function(name, seed=2)(G)):
        pytest.skip(f"{method.name} draws its weights at random")
    try:
        theirs = torchjd_weighting(name, 2)
        out = theirs(G if peer.on == "gramian" else L).double()
    except ImportError as error:  # an optional solver (cvxpy) missing
        pytest.skip(str(error))
    d_theirs = out @ L if peer.weighting is not None else out
    d_ours = bm.weights_function(name)(G) @ L
    assert float(torch.nn.functional.cosine_similarity(d_ours, d_theirs, dim=0)) > 1 - 1e-4


# ---------------------------------------------------------------------- the suites' variants


def test_every_registered_method_beyond_the_three_is_a_suite_variant() -> None:
    from bench.suite.variants import EVERY_METHOD_KINDS, KINDS, LOSS_KINDS, Spec, make_step

    gradient = {f"gs-{name}-loop" for name in NAMES if bm.kind(name) != "loss"}
    assert gradient <= set(KINDS) | set(EVERY_METHOD_KINDS)
    assert {f"gs-{name}" for name in NAMES if bm.kind(name) == "loss"} == set(LOSS_KINDS)
    spec = Spec("mlp", 3, 4, width=8, inputs=4)
    for kind in (*EVERY_METHOD_KINDS, *LOSS_KINDS):
        step = make_step(spec, kind)
        step()
        step()
        assert type(step.wrapper).__name__ == bm.lookup(kind.split("-")[1]).name, kind
        if kind in EVERY_METHOD_KINDS:
            assert step.wrapper.engine == "loop", kind


def test_every_registered_method_is_in_the_tiny_problem() -> None:
    from bench.tiny import TINY_KINDS, make_tiny_step

    assert {f"gs-{name}" for name in NAMES} <= set(TINY_KINDS)
    for kind in TINY_KINDS:
        if kind.startswith("gs-"):
            make_tiny_step(kind)()


def test_the_every_method_target_is_checked_per_method() -> None:
    from bench.suite.targets import EVERY_METHOD_BOUND, targets
    from bench.suite.variants import EVERY_METHOD_KINDS

    def ratio(x: float) -> dict[str, float]:
        return {"of_medians": x, "median_paired": x}

    kinds = {kind: {"over_floor": ratio(1.0 + 0.1 * (i % 3))} for i, kind in enumerate(EVERY_METHOD_KINDS)}
    checks = targets([{"model": "mlp", "T": 8, "ratios": kinds}], [], None)
    assert [c["case"] for c in checks] == [f"mlp T=8 {kind}" for kind in EVERY_METHOD_KINDS]
    for check, entry in zip(checks, kinds.values()):
        assert check["bound"] == EVERY_METHOD_BOUND
        assert check["met"] == ("yes" if entry["over_floor"]["of_medians"] <= EVERY_METHOD_BOUND else "no")


@pytest.mark.filterwarnings("ignore:.*not DPP")
def test_the_weights_benchmark_covers_every_method_with_weights(tmp_path: Path) -> None:
    pytest.importorskip("torchjd")
    from bench import bench_aggregation

    out = tmp_path / "aggregation.jsonl"
    args = argparse.Namespace(weights_T=[3], max_rounds=2, weights_budget=0.0, out=out)
    table = bench_aggregation.bench_weights(args)
    row = json.loads(out.read_text())
    with_weights = GRAM
    assert list(row["ratios"]) == with_weights
    assert [line[0] for line in table] == [bm.lookup(name).name for name in with_weights]
    assert set(row["ratios"]) | set(row["torchjd_missing"]) >= set(with_weights)
    for name, entry in row["ratios"].items():
        assert entry["ours_ms"] > 0
        if "over_torchjd" in entry:
            assert entry["bound"] == (0.5 if bm.lookup(name).name in bench_aggregation.QP_BASED else 1.0)


def test_a_memory_variant_that_failed_is_reported_not_checked() -> None:
    from bench.suite.report import memory_table
    from bench.suite.targets import targets

    variants = {
        "naive": {"peak_extra": 10, "steady_peak_extra": 10},
        "gs-pcgrad-loop": {"error": "RuntimeError: in the child"},
        "torchjd-pcgrad": {"peak_extra": 20, "steady_peak_extra": 20},
    }
    mem = {"model": "mlp", "T": 8, "shared_params": 100, "variants": variants}
    _, body = memory_table([mem])
    assert ["gs-pcgrad-loop", "failed", "failed"] in body
    assert targets([], [mem], None) == []
