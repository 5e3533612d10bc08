"""Test setup: without a CUDA device, run the Triton kernels in Triton's CPU interpreter.

The same tests run unchanged on a GPU: there DEVICE is "cuda" and nothing is interpreted.
TRITON_INTERPRET must be set before the kernels module is imported (the package imports it lazily).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" does not measure on first use in the suite (it would time every new signature on a GPU
# and write the user's cache): auto is table-only here; tests/test_autotune.py switches measuring on
os.environ.setdefault("RSLORA_KERNELS_AUTOTUNE", "0")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


class Launch:
    """One recorded kernel launch: the kernel's name, its positional (runtime) arguments and its
    keyword arguments (constexprs, then launch options such as num_warps)."""

    def __init__(self, kernel, args, kwargs):
        self.kernel, self.name, self.args = kernel, kernel.fn.__name__, args
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}

    def __repr__(self):
        return f"Launch({self.name})"


@pytest.fixture
def kernel_launches(monkeypatch):
    """A list that records every Triton kernel launched while the test runs (:class:`Launch`),
    whichever launcher made it: the record is taken where Triton runs a kernel, with direct
    launches (which bypass that) turned off."""
    from rslora_kernels import _launch
    from rslora_kernels.ops import triton_kernels

    log = []
    kernel_class = type(triton_kernels._shrink_kernel)  # JITFunction, or InterpretedFunction under the interpreter
    run = kernel_class.run

    def recording_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            log.append(Launch(self, args, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recording_run)
    monkeypatch.setenv("RSLORA_KERNELS_DIRECT_LAUNCH", "0")  # a direct launch would bypass run
    _launch.clear_launch_cache()
    yield log
    monkeypatch.undo()
    _launch.clear_launch_cache()
