"""Benchmarks for objdl: each ``bench_*.py`` runs on its own (``python benchmarks/bench_X.py``)."""
