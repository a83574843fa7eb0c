"""Benchmarks of gradsurgery: speed suites (pytest-benchmark) and the joint-training study (``python -m bench``)."""
