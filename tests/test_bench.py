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

ROOT = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------- cheap modes, granularity, loss peers


def test_variant_suffixes_are_the_wrapper_options() -> None:
    from bench.suite.variants import Spec, build, wrapper_options

    model, _, _ = build(Spec("mlp", 3, 4, width=8, inputs=4))
    assert wrapper_options("gs-pcgrad-loop", model) == {"engine": "loop"}
    assert wrapper_options("gs-pcgrad-repr", model) == {}
    assert wrapper_options("gs-pcgrad-loop-every4", model) == {"engine": "loop", "every": 4}
    assert wrapper_options("gs-mgda-loop-tps3", model) == {"engine": "loop", "tasks_per_step": 3}
    assert wrapper_options("gs-cagrad-loop-module", model) == {
        "engine": "loop",
        "granularity": "module",
        "shared": model.trunk,
    }
    assert wrapper_options("gs-cagrad-loop-parameter", model) == {"engine": "loop", "granularity": "parameter"}
    assert wrapper_options("gs-pcgrad-loop-bf16", model)["storage_dtype"] is torch.bfloat16
    with pytest.raises(ValueError, match="unknown option 'everyk'"):
        wrapper_options("gs-pcgrad-loop-everyk", model)


@pytest.mark.parametrize("kind", ["gs-pcgrad-loop-every3", "gs-mgda-loop-tps2", "gs-cagrad-loop-module", "gs-mgda-loop-parameter"])
def test_cheap_and_granularity_variants_build_the_wrapper_they_name(kind: str) -> None:
    from bench.suite.variants import Spec, make_step, period_of, period_sample

    step = make_step(Spec("mlp", 3, 4, width=8, inputs=4), kind)
    sample = period_sample(step)
    sample()
    sample()
    wrapper = step.wrapper
    assert period_of(step) == (3 if kind.endswith("every3") else 1)
    assert (wrapper.every, wrapper.tasks_per_step) == ((3, None) if "every" in kind else (1, 2) if "tps" in kind else (1, None))
    if kind.endswith(("module", "parameter")):
        assert wrapper.blocks is not None and len(wrapper.blocks) == (3 if kind.endswith("module") else 6)


def test_the_floor_of_tasks_per_step_is_k_backward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.suite.variants import Spec, cheap_kinds, make_step

    assert cheap_kinds(tasks_per_step=3)[0] == "floor-tasks3"
    step = make_step(Spec("mlp", 5, 4, width=8, inputs=4), "floor-tasks3")
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    step()
    assert len(calls) == 3


def test_a_sample_of_an_every_variant_is_one_whole_period() -> None:
    from bench.suite.variants import Spec, make_step, period_sample

    step = make_step(Spec("mlp", 3, 4, width=8, inputs=4), "gs-pcgrad-loop-every3")
    sample = period_sample(step)
    sample()  # refresh, cheap, cheap
    step()  # out of phase: the next sample would start with a cheap step
    with pytest.raises(RuntimeError, match="not one period"):
        sample()


def test_the_ideal_every_step_is_one_floor_and_k_minus_one_naive_steps() -> None:
    from bench.suite.measure import ideal_every

    times = {"naive": [1.0, 2.0, 1.0], "floor": [5.0, 5.0, 10.0], "gs-x-loop-every4": [0.0] * 3}
    ideal = ideal_every(times, {"naive": 1, "floor": 1, "gs-x-loop-every4": 4})
    assert ideal["every4"]["of_medians"] == pytest.approx((5 + 3 * 1) / 20)
    assert ideal["every4"]["median_paired"] == pytest.approx(statistics_median([8 / 20, 11 / 20, 13 / 40]))


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def test_the_cheap_granularity_and_loss_targets_are_checked() -> None:
    from bench.suite.targets import targets
    from bench.suite.variants import LOSS_KINDS

    def ratio(x: float) -> dict[str, float]:
        return {"of_medians": x, "median_paired": x}

    row8 = {
        "model": "mlp",
        "T": 8,
        "ratios": {
            "gs-pcgrad-loop-every4": {"over_floor": ratio(0.44)},
            "gs-mgda-loop-every4": {"over_floor": ratio(0.46)},
            "gs-pcgrad-loop-module": {"over_whole": ratio(1.01)},
            "gs-mgda-loop-parameter": {"over_whole": ratio(1.03)},
            LOSS_KINDS[0]: {"over_naive": ratio(1.04)},
        },
    }
    row16 = {
        "model": "mlp",
        "T": 16,
        "ratios": {
            "gs-cagrad-loop-every8": {"over_floor": ratio(0.24)},
            "gs-cagrad-loop-tps4": {"over_floor": ratio(0.31)},
            "gs-cagrad-loop-every4": {"over_floor": ratio(0.9)},  # no bound at (16, 4): not checked
            LOSS_KINDS[1]: {"over_naive": ratio(1.06)},
        },
    }
    checks = {c["case"]: (c["bound"], c["met"]) for c in targets([row8, row16], [], None)}
    assert checks == {
        "mlp T=8 gs-pcgrad-loop-every4": (0.45, "yes"),
        "mlp T=8 gs-mgda-loop-every4": (0.45, "no"),
        "mlp T=8 gs-pcgrad-loop-module ÷ gs-pcgrad-loop": (1.02, "yes"),
        "mlp T=8 gs-mgda-loop-parameter ÷ gs-mgda-loop": (1.02, "no"),
        f"mlp T=8 {LOSS_KINDS[0]}": (1.05, "yes"),
        "mlp T=16 gs-cagrad-loop-every8": (0.25, "yes"),
        "mlp T=16 gs-cagrad-loop-tps4": (0.30, "no"),
        f"mlp T=16 {LOSS_KINDS[1]}": (1.05, "no"),
    }


LOSS = [name for name in NAMES if bm.kind(name) == "loss"]


@pytest.mark.parametrize("name", LOSS)
def test_a_torchjd_scalarizer_gives_our_update_direction(name: str) -> None:
    """Ours and TorchJD's scalarizer of the same method backpropagate proportional objectives: on the
    first step the shared parameters' gradients point the same way (a random method aside)."""
    pytest.importorskip("torchjd.scalarization")
    from bench.peers import torchjd_scalarizer, torchjd_scalarizer_peer
    from bench.suite.variants import LOSS_PEER_KINDS, Spec, build, forward, make_step

    if torchjd_scalarizer_peer(name) is None:
        assert f"torchjd-{name}" not in LOSS_PEER_KINDS
        pytest.skip(f"TorchJD has no scalarizer for {bm.lookup(name).name}")
    assert f"torchjd-{name}" in LOSS_PEER_KINDS
    spec = Spec("mlp", 3, 16, width=8, inputs=4)
    step = make_step(spec, f"torchjd-{name}")  # the suite's variant runs (FAMO's update, DWA's step included)
    step()
    step()
    ours_model, x, y = build(spec)
    theirs_model, _, _ = build(spec)
    ours = bm.make_wrapper(name, torch.optim.SGD(ours_model.parameters(), lr=0.0), num_tasks=3)
    ours.zero_grad()
    ours.backward(forward(spec, ours_model, x, y)[1])
    theirs = torchjd_scalarizer(name, 3)
    theirs(torch.stack(forward(spec, theirs_model, x, y)[1])).backward()
    a = torch.cat([p.grad.flatten() for p in ours_model.trunk.parameters()])
    b = torch.cat([p.grad.flatten() for p in theirs_model.trunk.parameters()])
    assert torch.isfinite(b).all()
    if not bm.lookup(name).random:
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 1 - 1e-5


@pytest.mark.parametrize("method", bm.ORIGINAL)
def test_the_block_aggregation_is_the_method_on_each_block(method: str) -> None:
    from bench.bench_aggregation import block_variants, equal_blocks

    T = 2 if method == "pcgrad" else 4  # PCGrad draws no order at T = 2
    J = torch.randn(T, 1000, generator=torch.Generator().manual_seed(3))
    variants = block_variants(J, (method,), blocks=5)
    layout = equal_blocks(1000, 5)
    assert [spans for spans in layout.blocks] == [[(200 * b, 200 * (b + 1))] for b in range(5)]
    d = variants[f"agg5-{method}"]()
    for start, stop in (spans[0] for spans in layout.blocks):
        block = J[:, start:stop]
        w = bm.weights_function(method)(gs.functional.gram(block))
        torch.testing.assert_close(d[start:stop], w.to(J.dtype) @ block, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variants[f"agg1-{method}"](), bm.aggregate_function(method)(J), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the pytest-benchmark suites (bench/speed)


def test_the_default_pytest_run_leaves_the_speed_suites_to_pytest_bench() -> None:
    """``python -m pytest`` collects tests/ only; ``pytest bench/ --benchmark-only`` needs pyproject's
    addopts free of --benchmark-disable (pytest-benchmark refuses the pair)."""
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert "--benchmark-disable" not in options.get("addopts", "")
    assert sorted(p.name for p in (ROOT / "bench" / "speed").glob("test_*.py")) == ["test_aggregation.py", "test_step.py"]


def test_a_tiny_pytest_benchmark_run_groups_each_method_beside_naive_and_floor(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "pytest", "bench/speed", "-q", "-p", "no:cacheprovider", "--benchmark-only",
        "--bench-size", "tiny", "--bench-T", "3", "--bench-methods", "pcgrad,famo", "--bench-modes", "loop,every2",
        "--benchmark-min-rounds", "1", "--benchmark-max-time", "0.000001", "--benchmark-json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    groups: dict[str, set[str]] = {}
    for entry in report["benchmarks"]:
        groups.setdefault(entry["group"], set()).add(entry["extra_info"]["kind"])
    assert groups == {
        "step mlp T=3 tiny": {"naive", "floor", "gs-pcgrad-loop", "gs-pcgrad-loop-every2", "gs-famo"},
        "aggregation T=3 P=0.02M": {"naive", "floor", "ours-pcgrad", "blocks64-pcgrad"},
    }
    every = next(e for e in report["benchmarks"] if e["extra_info"]["kind"] == "gs-pcgrad-loop-every2")
    assert every["extra_info"]["steps_per_round"] == 2 and every["stats"]["iterations"] == 2
    assert report["gradsurgery"]["torch_threads"] == 1 and "library_digest" in report["gradsurgery"]["git"]


def test_the_report_takes_the_last_complete_run_unless_a_partial_one_is_named(tmp_path: Path) -> None:
    from bench.suite.report import load_last_run

    lines = [
        {"run": "A", "kind": "time", "T": 8},
        {"run": "A", "kind": "targets", "wall_s": 1.0},
        {"run": "B", "kind": "time", "T": 16},
        {"run": "B", "kind": "targets", "partial": True, "wall_s": 2.0},
    ]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["T"] for r in load_last_run(path)[0]] == [8]
    assert [r["T"] for r in load_last_run(path, "B")[0]] == [16]
