"""Benchmarks of rslora-kernels, run as modules: ``python -m benchmarks.sweep`` (ranks), ``python -m benchmarks.static_report``, ``python -m benchmarks.composite_cpu``."""
