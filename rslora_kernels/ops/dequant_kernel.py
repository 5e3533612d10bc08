"""Triton kernel of the 4-bit dequantization (bitsandbytes' NF4/FP4 format, nested absmax or not).

    W[i] = code[nibble(i)] * scale[i // blocksize],   nibble(2j) = byte[j] >> 4, nibble(2j+1) = byte[j] & 15
    scale[b] = absmax[b]  or  nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset

One program handles BYTES consecutive packed bytes (2 * BYTES weights): it loads the bytes, decodes
both nibbles through the 16-entry table, multiplies by the block scale (both nibbles of a byte share
a block: blocksizes are even) and stores the two halves interleaved, so loads and stores are
contiguous. The whole weight is flat: a block may straddle two rows, as in bitsandbytes.

Bit-exactness with ``bitsandbytes.functional.dequantize_4bit`` needs every multiply and add rounded
on its own: the launch passes ``enable_fp_fusion=False`` so the nested ``code * absmax + offset``
is not contracted into an FMA on the GPU. The interpreter (Triton 3.9) truncates fp32 -> bf16 on a
cast; there the kernel rounds to nearest-even on the bits first, as the GPU's cast does.

Kept apart from :mod:`rslora_kernels.quant` because this module imports Triton (first use only).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._quant_codes import code_table
from .._runtime import interpreting

BYTES_PER_PROGRAM = 1024  # 2048 weights: 1 KiB read, 4-8 KiB written per program
# no FMA contraction: bitsandbytes rounds the nested scale's product and sum separately
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset_ptr, out_ptr,
    # sizes
    n_elements,
    # meta
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BF16_RTNE_BY_HAND: tl.constexpr, BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BYTES + tl.arange(0, BYTES)
    byte_ok = byte_idx < (n_elements + 1) // 2
    byte = tl.load(packed_ptr + byte_idx, mask=byte_ok, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 15))

    block = byte_idx // (BLOCKSIZE // 2)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=byte_ok, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=byte_ok, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested_scale + tl.load(nested_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=byte_ok, other=0.0)

    w = tl.interleave(hi * scale, lo * scale)  # [2 * BYTES]: element 2j then 2j + 1
    if BF16_RTNE_BY_HAND:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        w = bits.to(tl.float32, bitcast=True)
    elem = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + elem, w.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


def dequantize_4bit_triton(w, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch ``_dequant_4bit_kernel`` for a :class:`rslora_kernels.quant.Weight4bit`; returns
    ``out`` (a new contiguous ``[N, K]`` tensor of ``dtype`` when None)."""
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    n = w.numel
    if n == 0:
        return out
    launch(_dequant_4bit_kernel, (-(-((n + 1) // 2) // BYTES_PER_PROGRAM),),
           (w.packed, w.absmax, code_table(w.quant_type, w.device),
            w.nested_code, w.nested_absmax, w.nested_offset, out,
            n),
           dict(BLOCKSIZE=w.blocksize, NESTED=w.nested, NESTED_BLOCKSIZE=max(w.nested_blocksize, 1),
                BF16_RTNE_BY_HAND=interpreting() and dtype == torch.bfloat16, BYTES=BYTES_PER_PROGRAM),
           LAUNCH_OPTIONS)
    return out
