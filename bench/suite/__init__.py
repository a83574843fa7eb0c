"""The CPU speed suite (``python -m bench.bench_suite``): problems and variants, measurements, targets, report."""
