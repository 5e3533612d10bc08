"""Benchmarks of rslora-kernels: the rank sweep, pytest-benchmark entry points, the static kernel report."""
