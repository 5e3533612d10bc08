"""Test setup: without a CUDA device, run the Triton kernels in Triton's CPU interpreter.

The same tests run unchanged on a GPU: there DEVICE is "cuda" and nothing is interpreted.
TRITON_INTERPRET must be set before the kernels module is imported (the package imports it lazily).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE
