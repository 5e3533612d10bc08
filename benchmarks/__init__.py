"""Benchmarks of rslora-kernels (run as modules, e.g. ``python -m benchmarks.composite_cpu``)."""
