"""The dropout stream on any device: whole masks and drop-and-scale, each dispatched to the fastest
implementation that produces the stream's exact bits.

    CPU tensors    the C++ extension (rslora_kernels/csrc/, multithreaded), or -- when it cannot be built, warned
                   once by :func:`~rslora_kernels.dropout.csrc.csrc_ops` -- the PyTorch implementation
    CUDA tensors   the Triton kernels of :mod:`rslora_kernels.dropout.kernels`

The fused Triton LoRA kernels draw the mask tile by tile instead (``keep_mask_tile``, in F1 or the
keep-bits pass) and keep it as packed bits; these are for everything else: ``rk.dropout_mask``, the
composite backend and the tests. Drop-and-scale
is a multiply by keep (0 or 1) on every device, never a select: an Inf or NaN at a dropped position
gives NaN, as the reference's ``x * mask / (1 - p)`` does.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from .csrc import csrc_ops
from .stream import as_seed_int, check_dropout_p, keep_mask_torch

__all__ = ["dropout_mask", "keep_mask_cpu", "dropout_scale", "dropout_scale_", "dropout_scale_pair_"]


def keep_mask_cpu(seed: int, rows: int, cols: int, p: float, row_offset: int = 0) -> Tensor:
    """Bool keep-mask [rows, cols] of the stream on the CPU, rows counted from ``row_offset``."""
    ops = csrc_ops()
    if ops is None:
        return keep_mask_torch(seed, rows, cols, p, row_offset)
    return ops.philox_keep_mask(seed, rows, cols, p, row_offset)


def dropout_mask(seed: Union[int, Tensor], shape: Sequence[int], p: float,
                 device: Union[str, torch.device, None] = None) -> Tensor:
    """The exact keep-mask (bool, True = kept) that the kernels use for an input of ``shape``.

    ``shape`` is x's shape (``[..., K]``) or its flattened ``[M, K]``; the result has ``shape``.
    Kept elements of x are scaled by ``1 / (1 - p)`` on the adapter branch.
    """
    seed = as_seed_int(seed)
    p = check_dropout_p(p)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of sizes >= 0, got {shape}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device must be 'cpu' or an available 'cuda' device (the mask holds data), "
                         f"got {str(device)!r}")
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    if device.type == "cpu" or rows * cols == 0:
        mask = keep_mask_cpu(seed, rows, cols, p)
    else:
        from .kernels import keep_mask_triton

        mask = keep_mask_triton(seed, rows, cols, p, device)
    return mask.reshape(shape).to(device)


_CPU_OPS = None  # the extension's drop-and-scale ops, resolved once: (scale, scale_, pair_)


def _cpu_ops():
    """The C++ drop-and-scale ops as resolved overloads, or None where the extension is unavailable.
    Looked up once: a step calls them two or three times, and resolving ``torch.ops`` names plus
    the overload per call cost about as much host time as the ops take at small shapes."""
    global _CPU_OPS
    ops = csrc_ops()  # asked every call: it warns or raises when unavailable (and tests stand it in)
    if ops is None:
        return None
    if _CPU_OPS is None:
        _CPU_OPS = (ops.philox_dropout_scale.default, ops.philox_dropout_scale_.default,
                    ops.philox_dropout_scale_pair_.default)
    return _CPU_OPS


def dropout_scale(x2d: Tensor, seed: Tensor, p: float, scale: float) -> Tensor:
    """A new ``[M, K]`` tensor ``x2d * keep * scale`` (``x2d`` any strides; ``seed`` a 0-dim int64
    tensor on x's device)."""
    if x2d.is_cpu:
        ops = _cpu_ops()
        if ops is not None:
            return ops[0](x2d, int(seed.item()), p, scale)
        return x2d * keep_mask_torch(int(seed.item()), x2d.shape[0], x2d.shape[1], p) * scale
    from .kernels import dropout_scale_triton

    return dropout_scale_triton(x2d, seed, p, scale)


def dropout_scale_(g: Tensor, seed: Tensor, p: float, scale: float) -> None:
    """``g *= keep * scale`` in place."""
    if g.is_cpu:
        ops = _cpu_ops()
        if ops is not None:
            ops[1](g, int(seed.item()), p, scale)
        else:
            g.mul_(keep_mask_torch(int(seed.item()), g.shape[0], g.shape[1], p)).mul_(scale)
        return
    from .kernels import dropout_scale_triton

    dropout_scale_triton(g, seed, p, scale, out=g)


def dropout_scale_pair_(g: Tensor, g_scale: float, x2d: Tensor, x_scale: float, seed: Tensor, p: float) -> Tensor:
    """``g *= keep * g_scale`` in place and return ``x2d * keep * x_scale``: one mask for both
    (the composite backward's two uses, on the CPU one generation of the mask)."""
    if x2d.is_cpu:
        ops = _cpu_ops()
        if ops is not None:
            return ops[2](g, x2d, int(seed.item()), p, g_scale, x_scale)
        keep = keep_mask_torch(int(seed.item()), x2d.shape[0], x2d.shape[1], p)
        g.mul_(keep).mul_(g_scale)
        return x2d * keep * x_scale
    from .kernels import dropout_scale_pair_triton

    return dropout_scale_pair_triton(g, g_scale, x2d, x_scale, seed, p)
