"""The joint-training study run by ``python -m bench``: one module per study, plus the runner and the report."""
