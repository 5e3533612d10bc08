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

__all__ = ["lora_linear"]


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
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("dropout_mask is required when dropout_p > 0 "
                             "(the reference is deterministic; get the kernels' mask from rslora_kernels.dropout_mask)")
        if dropout_mask.dtype != torch.bool:
            raise TypeError(f"dropout_mask must be a bool tensor, got {dropout_mask.dtype}")
        if dropout_mask.numel() != x.numel() or dropout_mask.shape[-1] != x.shape[-1]:
            raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)} or [M, K]; got {tuple(dropout_mask.shape)}")
        dropped = x * dropout_mask.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    else:
        dropped = x
    dtype = x.dtype
    base = F.linear(x, weight, bias)
    adapter = F.linear(F.linear(dropped, lora_A.to(dtype)), lora_B.to(dtype))
    return base + scaling * adapter
