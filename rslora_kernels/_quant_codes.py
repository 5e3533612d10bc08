"""The 16-entry decode tables of bitsandbytes' 4-bit formats (NF4, FP4).

A module of its own because :mod:`rslora_kernels.quant` (the format, the PyTorch dequantization)
and :mod:`rslora_kernels.ops.dequant_kernel` (the Triton one) both read the tables and ``quant``
launches the kernel: both import from here, neither imports the other back. The public names are
:data:`rslora_kernels.quant.QUANT_TYPES` and :func:`rslora_kernels.quant.code_table`.
"""
from __future__ import annotations

import torch
from torch import Tensor

QUANT_TYPES = ("nf4", "fp4")

# NF4: the 16 quantiles of N(0, 1) of the QLoRA paper (Dettmers et al. 2023), as fp32.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bits; exponent bias 2), in bit-pattern order, divided by its
# largest magnitude (12) in fp32 -- bitsandbytes' table, whose code 0b1000 ("-0") decodes to +0.0.
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

_code_cache = {}


def code_table(quant_type: str, device) -> Tensor:
    """The 16 fp32 values a nibble decodes to (before scaling), on ``device``."""
    key = (quant_type, str(device))
    if key not in _code_cache:
        if quant_type == "nf4":
            table = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            table = torch.tensor(_FP4_UNSCALED, dtype=torch.float32) / 12.0
        else:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        _code_cache[key] = table.to(device)
    return _code_cache[key]
