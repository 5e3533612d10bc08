"""Plain, readable PyTorch implementation of the LoRA linear op: the numerical oracle.

    y = x W^T + b + s * (drop(x) A^T) B^T,    drop(x) = x * mask / (1 - p)

Works in any floating dtype, float64 included. The adapter runs in x's dtype (lora_A/lora_B are
cast to it), exactly like the kernels. Dropout is given as an explicit keep-mask so the reference
reproduces what the kernels did (get it with ``rslora_kernels.dropout_mask``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["lora_linear", "dora_linear"]


def _dropped(x, dropout_p, dropout_mask):
    """``x * mask / (1 - p)`` for a given bool keep-mask (x's shape or ``[M, K]``); x when p = 0."""
    if dropout_p == 0.0:
        return x
    if dropout_mask is None:
        raise ValueError("dropout_mask is required when dropout_p > 0 "
                         "(the reference is deterministic; get the kernels' mask from rslora_kernels.dropout_mask)")
    if dropout_mask.dtype != torch.bool:
        raise TypeError(f"dropout_mask must be a bool tensor, got {dropout_mask.dtype}")
    if dropout_mask.numel() != x.numel() or dropout_mask.shape[-1] != x.shape[-1]:
        raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)} or [M, K]; got {tuple(dropout_mask.shape)}")
    return x * dropout_mask.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference LoRA linear.

    Args:
        x: ``[..., K]`` input.
        weight: ``[N, K]`` base weight (``nn.Linear.weight`` layout, any strides).
        lora_A: ``[r, K]``; lora_B: ``[N, r]`` (PEFT layouts).
        scaling: adapter scale ``s`` (``rslora_scaling(alpha, r)`` for rsLoRA).
        bias: ``[N]`` or None.
        dropout_p: dropout probability of the adapter branch, in [0, 1).
        dropout_mask: bool keep-mask of x's shape or ``[M, K]``; required when ``dropout_p > 0``.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    from ._validate import validate_inputs

    validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
    dropped = _dropped(x, dropout_p, dropout_mask)
    dtype = x.dtype
    base = F.linear(x, weight, bias)
    adapter = F.linear(F.linear(dropped, lora_A.to(dtype)), lora_B.to(dtype))
    return base + scaling * adapter


def dora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                dropout_p: float = 0.0, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference DoRA linear, written the way PEFT 0.21 computes it (``peft/tuners/lora/dora.py``):

        w = || W + s B A ||_row  (detached; in the adapters' dtype)        g = magnitude / w
        dropout on   y = x W^T + b + (g - 1) * (drop(x) W^T) + g * s * (drop(x) A^T) B^T
        dropout off  y = r + (g - 1) * (r - b) + g * s * (x A^T) B^T,    r = x W^T + b

    It builds the [N, K] matrix ``W + s B A`` (the oracle may; the kernels never do). Arguments as
    :func:`lora_linear`, plus ``magnitude [N]`` (PEFT's ``lora_magnitude_vector``). Returns
    ``[..., N]`` in x's dtype.
    """
    from ._validate import validate_inputs, validate_magnitude

    validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
    validate_magnitude(magnitude, weight, x)
    dtype = x.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    # the norm in the adapters' dtype, as PEFT's forward takes it (it casts x, and W with it, to lora_A's dtype)
    weight_norm = torch.linalg.norm(weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A), dim=1).detach()
    g = (magnitude / weight_norm).view(1, -1)
    adapter = lambda inp: F.linear(F.linear(inp, A), B)  # noqa: E731
    result = F.linear(x, weight, bias)
    if dropout_p > 0.0:
        dropped = _dropped(x, dropout_p, dropout_mask)
        y = result + (g - 1) * F.linear(dropped, weight) + g * adapter(dropped) * scaling
    else:
        base = result - bias if bias is not None else result
        y = result + (g - 1) * base + g * adapter(x) * scaling
    return y.to(dtype)
