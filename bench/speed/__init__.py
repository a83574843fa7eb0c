"""The speed suites as pytest-benchmark tests: one training step and the aggregation alone.

    pytest bench/ --benchmark-only                         # small sizes, T = 2 and 8, ~1 minute
    pytest bench/ --benchmark-only --benchmark-autosave    # ... and save the JSON for this revision
    pytest bench/ --benchmark-only --benchmark-compare     # ... beside the last saved run
    pytest bench/ --benchmark-only --bench-size suite --bench-T 2,4,8,16 --bench-methods all \\
        --bench-modes loop,every4,tps4,module --bench-peers --benchmark-min-rounds 10   # scaled up

Each benchmark's group is one problem at one ``T`` (``step mlp T=8 small``, ``aggregation T=8 P=1M``), so
each method sits beside naive summation and the ``T``-backward floor of the same problem; the table's
bracketed factors are ÷ the fastest of the group (naive summation). ``--benchmark-group-by=param:kind``
follows one variant across ``T`` instead. The problems, the variants and the methods come from the
interleaved harness's builders (``bench.suite.variants``, ``bench.bench_aggregation``,
``bench.methods``); this package only decides which to time and hands them to the ``benchmark`` fixture.

pytest-benchmark times one variant after the other, so load from other processes lands on some and not
others: for ratios quoted as results, use the interleaved suites (``python -m bench.bench_suite``,
``python -m bench.bench_aggregation``). These are for tracking one's own revisions: saved JSON per
commit (``.benchmarks/``, with the library's digest and torch's threads under ``gradsurgery``),
``--benchmark-compare``, ``--benchmark-compare-fail=median:10%``.

Not collected by ``python -m pytest`` (``testpaths = ["tests"]``); the options are in ``bench/conftest.py``.
"""
