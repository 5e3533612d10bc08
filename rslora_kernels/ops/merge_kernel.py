"""Triton kernel of the in-place adapter merge ``W <- W + sign * s * (B @ A)`` and its launcher.

Kept apart from :mod:`rslora_kernels.ops.merge` (the dispatcher and its PyTorch path) because this
module imports Triton, which the package only does on first use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreting


@triton.jit
def _merge_kernel(
    # pointers: W [N, K] is read and written in place; A [r, K]; B [N, r]
    w_ptr, a_ptr, b_ptr,
    # sizes
    N, K, R,
    # strides (any layout; a fan_in_fan_out W^T view works as is)
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # signed adapter scale: +s merges, -s unmerges
    scale,
    # meta
    BF16_RTNE_BY_HAND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of W: fp32 B@A over the rank, plus W, one store (one rounding)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rank_ok = ranks < R
        b = tl.load(b_ptr + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # IEEE fp32 products: a merge runs once, so it pays for exactness (no TF32)
        acc = tl.dot(b, a, acc, input_precision="ieee")

    w_ptrs = w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk
    tile_ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    out = w + scale * acc
    if BF16_RTNE_BY_HAND:
        # The interpreter (Triton 3.9) truncates fp32 -> bf16; round to nearest-even on the bits
        # so the cast below is exact. Inf stays inf; NaN stays NaN.
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    tl.store(w_ptrs, out.to(w_ptr.dtype.element_ty), mask=tile_ok)


def merge_triton_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, signed_scale: float) -> None:
    """Launch ``_merge_kernel``: ``weight [N, K] += signed_scale * lora_B [N, r] @ lora_A [r, K]``."""
    N, K = weight.shape
    R = lora_A.shape[0]
    BLOCK_N, BLOCK_K = 64, 64
    BLOCK_R = 16 if R <= 16 else 32  # tl.dot needs >= 16; ranks past R are masked to zero
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _merge_kernel[grid](
        weight, lora_A, lora_B,
        N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        signed_scale,
        BF16_RTNE_BY_HAND=interpreting() and weight.dtype == torch.bfloat16,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, num_warps=4,
    )
