"""Triton kernels of the group op (:mod:`rslora_kernels.ops.group`): sibling projections that read
the same x, fused across up to ``MAX_MEMBERS`` members.

    forward   GF1 T_i = drop_i(x) A_i^T, keep-bits_i      _group_shrink_kernel: ONE pass over x for every
                                                          member (each x tile loaded once, each member's
                                                          mask drawn on it), ranks up to 64; else
                                                          _shrink_kernel per member
              GF2 y_i = x W_i^T + s_i T_i B_i^T + b_i     _group_dual_gemm_kernel: ONE launch over the
                                                          stacked N of the members
    backward  B1  U_i = dy_i B_i                          _shrink_kernel, per member
              GB2 dx = sum_i dy_i W_i                     _group_dx_kernel: ONE launch, its reduction
                       + s_i/(1-p_i) m_i (U_i A_i)        runs across the members' N
              GB3a dA_i = s_i/(1-p_i) U_i^T (m_i x)       _group_da_kernel: ONE pass over x for every
                                                          member (ranks up to 64; else in B3 per member)
              B3  dB_i, db_i                              _m_reduce_kernel, per member

GF2's grid counts each member's N tiles separately (a tile never straddles two members, so a ragged
N_i just masks its last tile); the program's member is chosen from its N-tile index with scalar
branches, and each member's tensors are separate arguments (the weights are never concatenated or
copied). The programs are ordered as one GEMM over the stacked N (``_grouped_tile``), so GROUP_M row
tiles sweep every member's W tiles together. GB2 adds, per [M, K] tile, each member's masked rank
term and then its base term ``dy_i W_i`` into one fp32 accumulator, member by member in a fixed
order: deterministic, no atomics, and dx is written once instead of once per member plus autograd's
sums. Launch plan and tiles: docs/kernels.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._runtime import cuda_arch, num_sms
from ..dropout.kernels import apply_keep, keep_bits_words, keep_from_bits, keep_mask_tile, load_seed, store_keep_bits
from ..dropout.stream import drop_threshold
from .configs import dora_gemm_config, dual_gemm_config, grads_config, shrink_masked_config, split_m_for
from .triton_kernels import (_as_keep_bits, _bits_strides, _cdiv, _grouped_tile, _lora_grads, _meta, _offset_dtype,
                             _rank_term, _shrink, _sum_splits, lora_backward, lora_forward)

__all__ = ["MAX_MEMBERS", "group_forward", "group_backward"]

# members a fused launch takes (q/k/v); a larger group runs the single op's launchers member by member
MAX_MEMBERS = 3


# ----------------------------------------------------------------------------------------------
# GF1: T_i = drop_i(x) A_i^T for every member, one pass over x
# ----------------------------------------------------------------------------------------------
@triton.jit
def _member_shrink_step(acc, x, a_ptrs, reds, k0, K, rows, row_ok, seed_ptr, bits_ptr, threshold, n_words, stride_bm,
                        HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_RED: tl.constexpr):
    """acc^T [BLOCK_R, BLOCK_M] += A tile @ keep(x tile)^T for one member; with dropout its keep-mask is
    drawn on this x tile (the stream's own functions) and stored as its keep-bits. The masked x tile
    is the MMA's B operand (through shared memory; as A it would serialize the wgmma, C7515)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=reds[None, :] < K - k0, other=0.0)
    if HAS_DROPOUT:
        seed_lo, seed_hi = load_seed(seed_ptr)
        keep = keep_mask_tile(seed_lo, seed_hi, rows, k0, threshold, BLOCK_M, BLOCK_RED)
        store_keep_bits(bits_ptr, keep, rows, row_ok, k0, K, n_words, stride_bm, BLOCK_M, BLOCK_RED)
        x = apply_keep(x, keep)
    return tl.dot(a.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _store_member_t(acc, t_ptr, ranks, rows, M, R, stride_tm, out_scale, HAS_DROPOUT: tl.constexpr,
                    OFFSET_DTYPE: tl.constexpr):
    if HAS_DROPOUT:
        acc = acc * out_scale
    t_ptrs = t_ptr + (ranks.to(OFFSET_DTYPE)[:, None] + rows.to(OFFSET_DTYPE)[None, :] * stride_tm)
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=(ranks < R)[:, None] & (rows < M)[None, :])


@triton.jit
def _group_shrink_kernel(
    # pointers: x [M, K]; per member i: A_i [R_i, K], T_i [M, R_i] (unit column stride: a column block of
    # the group's stacked T), seed_i and keep-bits_i [M, n_words] (None without dropout, HAS_DROPOUT_i).
    # Members past NUM_MEMBERS are None and never touched
    x_ptr,
    a0_ptr, t0_ptr, seed0_ptr, bits0_ptr,
    a1_ptr, t1_ptr, seed1_ptr, bits1_ptr,
    a2_ptr, t2_ptr, seed2_ptr, bits2_ptr,
    # sizes (every R_i <= BLOCK_R: one rank tile a member, so each x element is visited, and drawn, once)
    M, K, R0, R1, R2, n_words,
    # strides: x; A_i (r, k); T's rows (shared: one stacked tensor); keep-bits rows (shared: one shape)
    stride_xm, stride_xk, stride_a0r, stride_a0k, stride_a1r, stride_a1k, stride_a2r, stride_a2k,
    stride_tm, stride_bm,
    # dropout: each member's stream threshold and the scale of its kept elements, 1/(1-p_i)
    threshold0, threshold1, threshold2, out_scale0, out_scale1, out_scale2,
    # meta
    NUM_MEMBERS: tl.constexpr,
    HAS_DROPOUT0: tl.constexpr, HAS_DROPOUT1: tl.constexpr, HAS_DROPOUT2: tl.constexpr,
    EVEN_K: tl.constexpr, OFFSET_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < M
    reds = tl.arange(0, BLOCK_RED)
    ranks = tl.arange(0, BLOCK_R)
    # wrapped inside the matrix: loads need no row or rank mask (those lanes are never stored)
    x_ptrs = x_ptr + ((rows % M).to(OFFSET_DTYPE)[:, None] * stride_xm + reds.to(OFFSET_DTYPE)[None, :] * stride_xk)
    a0_ptrs = a0_ptr + ((ranks % R0).to(OFFSET_DTYPE)[:, None] * stride_a0r + reds.to(OFFSET_DTYPE)[None, :] * stride_a0k)
    acc0 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    if NUM_MEMBERS > 1:
        a1_ptrs = a1_ptr + ((ranks % R1).to(OFFSET_DTYPE)[:, None] * stride_a1r
                            + reds.to(OFFSET_DTYPE)[None, :] * stride_a1k)
        acc1 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    if NUM_MEMBERS > 2:
        a2_ptrs = a2_ptr + ((ranks % R2).to(OFFSET_DTYPE)[:, None] * stride_a2r
                            + reds.to(OFFSET_DTYPE)[None, :] * stride_a2k)
        acc2 = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_RED):
        if EVEN_K:  # the x tile, loaded once for every member
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=reds[None, :] < K - k0, other=0.0)
        acc0 = _member_shrink_step(acc0, x, a0_ptrs, reds, k0, K, rows64, row_ok, seed0_ptr, bits0_ptr,
                                   threshold0, n_words, stride_bm, HAS_DROPOUT0, EVEN_K, DOT_DTYPE,
                                   INPUT_PRECISION, BLOCK_M, BLOCK_RED)
        a0_ptrs += tl.cast(BLOCK_RED * stride_a0k, OFFSET_DTYPE)
        if NUM_MEMBERS > 1:
            acc1 = _member_shrink_step(acc1, x, a1_ptrs, reds, k0, K, rows64, row_ok, seed1_ptr, bits1_ptr,
                                       threshold1, n_words, stride_bm, HAS_DROPOUT1, EVEN_K, DOT_DTYPE,
                                       INPUT_PRECISION, BLOCK_M, BLOCK_RED)
            a1_ptrs += tl.cast(BLOCK_RED * stride_a1k, OFFSET_DTYPE)
        if NUM_MEMBERS > 2:
            acc2 = _member_shrink_step(acc2, x, a2_ptrs, reds, k0, K, rows64, row_ok, seed2_ptr, bits2_ptr,
                                       threshold2, n_words, stride_bm, HAS_DROPOUT2, EVEN_K, DOT_DTYPE,
                                       INPUT_PRECISION, BLOCK_M, BLOCK_RED)
            a2_ptrs += tl.cast(BLOCK_RED * stride_a2k, OFFSET_DTYPE)
        x_ptrs += tl.cast(BLOCK_RED * stride_xk, OFFSET_DTYPE)
    _store_member_t(acc0, t0_ptr, ranks, rows, M, R0, stride_tm, out_scale0, HAS_DROPOUT0, OFFSET_DTYPE)
    if NUM_MEMBERS > 1:
        _store_member_t(acc1, t1_ptr, ranks, rows, M, R1, stride_tm, out_scale1, HAS_DROPOUT1, OFFSET_DTYPE)
    if NUM_MEMBERS > 2:
        _store_member_t(acc2, t2_ptr, ranks, rows, M, R2, stride_tm, out_scale2, HAS_DROPOUT2, OFFSET_DTYPE)


# ----------------------------------------------------------------------------------------------
# GF2: y_i = s_i T_i B_i^T + x W_i^T + b_i, one launch over the members' stacked N
# ----------------------------------------------------------------------------------------------
@triton.jit
def _group_dual_gemm_kernel(
    # pointers: x [M, K] shared; per member i: T_i [M, R_i], B_i [N_i, R_i], W_i [N_i, K], bias_i [N_i]
    # (None without, HAS_BIAS_i), y_i [M, N_i]. T, B, W and y have unit column stride (the launcher
    # checks). Members past NUM_MEMBERS are None and never touched
    x_ptr,
    t0_ptr, b0_ptr, w0_ptr, bias0_ptr, y0_ptr,
    t1_ptr, b1_ptr, w1_ptr, bias1_ptr, y1_ptr,
    t2_ptr, b2_ptr, w2_ptr, bias2_ptr, y2_ptr,
    # sizes
    M, K, N0, N1, N2, R0, R1, R2,
    # strides: x; then the row strides of each member's T, B, W, y
    stride_xm, stride_xk,
    stride_t0m, stride_b0n, stride_w0n, stride_y0m,
    stride_t1m, stride_b1n, stride_w1n, stride_y1m,
    stride_t2m, stride_b2n, stride_w2n, stride_y2m,
    # scalings
    s0, s1, s2,
    # meta. EVEN_R: every member's rank divides BLOCK_R
    NUM_MEMBERS: tl.constexpr,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
    EVEN_R: tl.constexpr, EVEN_K: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # the members' N tiles side by side, ordered as one GEMM over the stacked N (a tile never straddles
    # two members: each member's tiles are counted on their own)
    tiles0 = tl.cdiv(N0, BLOCK_F)
    tiles1 = tl.cdiv(N1, BLOCK_F)
    tiles2 = tl.cdiv(N2, BLOCK_F)
    pid_m, pid_f = _grouped_tile(M, (tiles0 + tiles1 + tiles2) * BLOCK_F, BLOCK_M, BLOCK_F, GROUP_M)
    # this program's member: scalar branches pick its tensors, so that the GEMM below is one body (one
    # set of pipeline buffers in shared memory, as F2's). Sizes and strides become run-time values
    # (+ zero: an argument equal to 1 is a constexpr, which a branch cannot reassign)
    zero = pid_f * 0
    member = zero
    pid_n = pid_f
    t_ptr, b_ptr, w_ptr, y_ptr = t0_ptr, b0_ptr, w0_ptr, y0_ptr
    N, R, scaling = N0 + zero, R0 + zero, s0
    stride_tm, stride_bn, stride_wn, stride_ym = stride_t0m + zero, stride_b0n + zero, stride_w0n + zero, stride_y0m + zero
    if NUM_MEMBERS > 1:
        if pid_f >= tiles0:
            member = zero + 1
            pid_n = pid_f - tiles0
            t_ptr, b_ptr, w_ptr, y_ptr = t1_ptr, b1_ptr, w1_ptr, y1_ptr
            N, R, scaling = N1 + zero, R1 + zero, s1
            stride_tm, stride_bn = stride_t1m + zero, stride_b1n + zero
            stride_wn, stride_ym = stride_w1n + zero, stride_y1m + zero
    if NUM_MEMBERS > 2:
        if pid_f >= tiles0 + tiles1:
            member = zero + 2
            pid_n = pid_f - tiles0 - tiles1
            t_ptr, b_ptr, w_ptr, y_ptr = t2_ptr, b2_ptr, w2_ptr, y2_ptr
            N, R, scaling = N2 + zero, R2 + zero, s2
            stride_tm, stride_bn = stride_t2m + zero, stride_b2n + zero
            stride_wn, stride_ym = stride_w2n + zero, stride_y2m + zero

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_n * BLOCK_F + tl.arange(0, BLOCK_F)
    # wrapped inside the matrix: loads need no row or feature mask (those lanes are never stored)
    rows_in = (rows % M).to(OFFSET_DTYPE)
    feats_in = (feats % N).to(OFFSET_DTYPE)
    # adapter term first, scaled on one fp32 tile (F2's order); bt_view[r, n] = B[n, r]
    acc = _rank_term(tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32), t_ptr, stride_tm, 1, rows_in,
                     b_ptr, 1, stride_bn, feats_in, R,
                     OFFSET_DTYPE, EVEN_R, DOT_DTYPE, INPUT_PRECISION, BLOCK_R) * scaling
    # base term into the same accumulator: w_view[k, n] = W[n, k]
    acc = _rank_term(acc, x_ptr, stride_xm, stride_xk, rows_in, w_ptr, 1, stride_wn, feats_in, K,
                     OFFSET_DTYPE, EVEN_K, DOT_DTYPE, INPUT_PRECISION, BLOCK_RED)

    # epilogue: the member's bias (its own branch: the members' biases may differ in dtype or be absent)
    feat_ok = feats < N
    if HAS_BIAS0:
        if member == 0:
            acc += tl.load(bias0_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS1:
        if member == 1:
            acc += tl.load(bias1_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:
        if member == 2:
            acc += tl.load(bias2_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_ym + feats.to(OFFSET_DTYPE)[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & feat_ok[None, :])


# ----------------------------------------------------------------------------------------------
# GB2: dx = sum_i dy_i W_i + s_i/(1-p_i) m_i (U_i A_i), one launch, reduced across the members' N
# ----------------------------------------------------------------------------------------------
@triton.jit
def _member_dx_terms(
    acc, rows, rows_in, cols_in, col0,
    u_ptr, a_ptr, dy_ptr, w_ptr, bits_ptr,
    M, N, R, n_words,
    stride_um, stride_ur, stride_ar, stride_ak, stride_dym, stride_dyn, stride_wn, stride_wk, stride_bm,
    adapter_scale,
    HAS_DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_R: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """acc + one member's dx terms on an [BLOCK_M, BLOCK_F] tile of dx: its rank term, scaled and
    masked on its own fp32 tile (the member's mask touches only its term), then dy W over its N."""
    rank = _rank_term(tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32), u_ptr, stride_um, stride_ur, rows_in,
                      a_ptr, stride_ar, stride_ak, cols_in, R,
                      OFFSET_DTYPE, EVEN_R, DOT_DTYPE, INPUT_PRECISION, BLOCK_R) * adapter_scale
    if HAS_DROPOUT:
        keep = keep_from_bits(bits_ptr, rows.to(tl.int64), rows < M, col0, n_words, stride_bm, BLOCK_M, BLOCK_F)
        rank = apply_keep(rank, keep)  # a multiply: Inf/NaN at a dropped position stays NaN, as in the reference
    acc += rank
    return _rank_term(acc, dy_ptr, stride_dym, stride_dyn, rows_in, w_ptr, stride_wn, stride_wk, cols_in, N,
                      OFFSET_DTYPE, EVEN_N, DOT_DTYPE, INPUT_PRECISION, BLOCK_RED)


@triton.jit
def _group_dx_kernel(
    # pointers: per member i: U_i [M, R_i], A_i [R_i, K], dy_i [M, N_i], W_i [N_i, K], keep-bits_i
    # [M, n_words_i] (None without dropout, HAS_DROPOUT_i); dx [M, K]. Members past NUM_MEMBERS are None
    u0_ptr, a0_ptr, dy0_ptr, w0_ptr, bits0_ptr,
    u1_ptr, a1_ptr, dy1_ptr, w1_ptr, bits1_ptr,
    u2_ptr, a2_ptr, dy2_ptr, w2_ptr, bits2_ptr,
    dx_ptr,
    # sizes
    M, K, N0, N1, N2, R0, R1, R2, n_words0, n_words1, n_words2,
    # strides: per member U (m, r), A (r, k), dy (m, n), W (n, k), keep-bits row; then dx
    stride_u0m, stride_u0r, stride_a0r, stride_a0k, stride_dy0m, stride_dy0n, stride_w0n, stride_w0k, stride_b0m,
    stride_u1m, stride_u1r, stride_a1r, stride_a1k, stride_dy1m, stride_dy1n, stride_w1n, stride_w1k, stride_b1m,
    stride_u2m, stride_u2r, stride_a2r, stride_a2k, stride_dy2m, stride_dy2n, stride_w2n, stride_w2k, stride_b2m,
    stride_dxm, stride_dxk,
    # adapter scales s_i/(1-p_i)
    c0, c1, c2,
    # meta
    NUM_MEMBERS: tl.constexpr,
    HAS_DROPOUT0: tl.constexpr, HAS_DROPOUT1: tl.constexpr, HAS_DROPOUT2: tl.constexpr,
    EVEN_N0: tl.constexpr, EVEN_N1: tl.constexpr, EVEN_N2: tl.constexpr,
    EVEN_R0: tl.constexpr, EVEN_R1: tl.constexpr, EVEN_R2: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_F, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_F + tl.arange(0, BLOCK_F)
    rows_in = (rows % M).to(OFFSET_DTYPE)
    cols_in = (cols % K).to(OFFSET_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    # members in a fixed order: the same sums every run
    acc = _member_dx_terms(acc, rows, rows_in, cols_in, pid_k * BLOCK_F, u0_ptr, a0_ptr, dy0_ptr, w0_ptr, bits0_ptr,
                           M, N0, R0, n_words0, stride_u0m, stride_u0r, stride_a0r, stride_a0k,
                           stride_dy0m, stride_dy0n, stride_w0n, stride_w0k, stride_b0m, c0,
                           HAS_DROPOUT0, EVEN_N0, EVEN_R0, OFFSET_DTYPE, DOT_DTYPE, INPUT_PRECISION,
                           BLOCK_M, BLOCK_F, BLOCK_RED, BLOCK_R)
    if NUM_MEMBERS > 1:
        acc = _member_dx_terms(acc, rows, rows_in, cols_in, pid_k * BLOCK_F, u1_ptr, a1_ptr, dy1_ptr, w1_ptr,
                               bits1_ptr, M, N1, R1, n_words1, stride_u1m, stride_u1r, stride_a1r, stride_a1k,
                               stride_dy1m, stride_dy1n, stride_w1n, stride_w1k, stride_b1m, c1,
                               HAS_DROPOUT1, EVEN_N1, EVEN_R1, OFFSET_DTYPE, DOT_DTYPE, INPUT_PRECISION,
                               BLOCK_M, BLOCK_F, BLOCK_RED, BLOCK_R)
    if NUM_MEMBERS > 2:
        acc = _member_dx_terms(acc, rows, rows_in, cols_in, pid_k * BLOCK_F, u2_ptr, a2_ptr, dy2_ptr, w2_ptr,
                               bits2_ptr, M, N2, R2, n_words2, stride_u2m, stride_u2r, stride_a2r, stride_a2k,
                               stride_dy2m, stride_dy2n, stride_w2n, stride_w2k, stride_b2m, c2,
                               HAS_DROPOUT2, EVEN_N2, EVEN_R2, OFFSET_DTYPE, DOT_DTYPE, INPUT_PRECISION,
                               BLOCK_M, BLOCK_F, BLOCK_RED, BLOCK_R)
    out_ptrs = dx_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_dxm + cols.to(OFFSET_DTYPE)[None, :] * stride_dxk)
    tl.store(out_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < K)[None, :])


# ----------------------------------------------------------------------------------------------
# GB3a: dA_i = s_i/(1-p_i) U_i^T (m_i x) for every member, one pass over x
# ----------------------------------------------------------------------------------------------
@triton.jit
def _member_da_step(acc, x, u_ptrs, ms, m_left, rows, row_ok, col0, bits_ptr, n_words, stride_bm,
                    HAS_DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """acc [BLOCK_P, BLOCK_Q] += U tile^T @ keep(x tile) for one member (its mask read from its
    keep-bits; the masked x tile is the MMA's B operand, as in B3)."""
    if EVEN_M:
        ut = tl.load(u_ptrs)
    else:
        ut = tl.load(u_ptrs, mask=(ms < m_left)[None, :], other=0.0)
    if HAS_DROPOUT:
        x = apply_keep(x, keep_from_bits(bits_ptr, rows, row_ok, col0, n_words, stride_bm, BLOCK_M, BLOCK_Q))
    return tl.dot(ut.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _group_da_kernel(
    # pointers: x [M, K]; per member i: U_i [M, R_i], keep-bits_i (None without dropout, HAS_DROPOUT_i),
    # out_i [SPLITS?, R_i, K] (row stride and column stride shared). Members past NUM_MEMBERS are None
    x_ptr, u0_ptr, bits0_ptr, out0_ptr, u1_ptr, bits1_ptr, out1_ptr, u2_ptr, bits2_ptr, out2_ptr,
    # sizes (every R_i <= BLOCK_P: one rank tile a member); M split into chunks of m_chunk rows
    M, K, R0, R1, R2, n_words, m_chunk,
    # strides
    stride_xm, stride_xk, stride_u0m, stride_u0r, stride_u1m, stride_u1r, stride_u2m, stride_u2r, stride_bm,
    stride_o0s, stride_o1s, stride_o2s, stride_or, stride_ok,
    # s_i/(1-p_i)
    c0, c1, c2,
    # meta
    NUM_MEMBERS: tl.constexpr,
    HAS_DROPOUT0: tl.constexpr, HAS_DROPOUT1: tl.constexpr, HAS_DROPOUT2: tl.constexpr, EVEN_M: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_q = tl.cdiv(K, BLOCK_Q)
    split = pid // num_pid_q
    pid_q = pid % num_pid_q
    cols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ranks = tl.arange(0, BLOCK_P)
    ms = tl.arange(0, BLOCK_M)
    m_lo = split * m_chunk
    m_hi = min(m_lo + m_chunk, M)
    # U is read transposed ([P, M] tiles); ranks and columns wrapped inside (never stored)
    x_ptrs = x_ptr + ((m_lo + ms).to(OFFSET_DTYPE)[:, None] * stride_xm + (cols % K).to(OFFSET_DTYPE)[None, :] * stride_xk)
    u0_ptrs = u0_ptr + ((ranks % R0).to(OFFSET_DTYPE)[:, None] * stride_u0r + (m_lo + ms).to(OFFSET_DTYPE)[None, :] * stride_u0m)
    acc0 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    if NUM_MEMBERS > 1:
        u1_ptrs = u1_ptr + ((ranks % R1).to(OFFSET_DTYPE)[:, None] * stride_u1r
                            + (m_lo + ms).to(OFFSET_DTYPE)[None, :] * stride_u1m)
        acc1 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    if NUM_MEMBERS > 2:
        u2_ptrs = u2_ptr + ((ranks % R2).to(OFFSET_DTYPE)[:, None] * stride_u2r
                            + (m_lo + ms).to(OFFSET_DTYPE)[None, :] * stride_u2m)
        acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, m_hi - m_lo, BLOCK_M):
        m_left = m_hi - m_lo - m0
        if EVEN_M:  # the x tile, loaded once for every member
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(ms < m_left)[:, None], other=0.0)
        rows = (m_lo + m0 + ms).to(tl.int64)
        row_ok = rows < m_hi
        acc0 = _member_da_step(acc0, x, u0_ptrs, ms, m_left, rows, row_ok, pid_q * BLOCK_Q, bits0_ptr, n_words,
                               stride_bm, HAS_DROPOUT0, EVEN_M, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_Q)
        u0_ptrs += tl.cast(BLOCK_M * stride_u0m, OFFSET_DTYPE)
        if NUM_MEMBERS > 1:
            acc1 = _member_da_step(acc1, x, u1_ptrs, ms, m_left, rows, row_ok, pid_q * BLOCK_Q, bits1_ptr, n_words,
                                   stride_bm, HAS_DROPOUT1, EVEN_M, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_Q)
            u1_ptrs += tl.cast(BLOCK_M * stride_u1m, OFFSET_DTYPE)
        if NUM_MEMBERS > 2:
            acc2 = _member_da_step(acc2, x, u2_ptrs, ms, m_left, rows, row_ok, pid_q * BLOCK_Q, bits2_ptr, n_words,
                                   stride_bm, HAS_DROPOUT2, EVEN_M, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_Q)
            u2_ptrs += tl.cast(BLOCK_M * stride_u2m, OFFSET_DTYPE)
        x_ptrs += tl.cast(BLOCK_M * stride_xm, OFFSET_DTYPE)
    col_ok = (cols < K)[None, :]
    offs = ranks.to(OFFSET_DTYPE)[:, None] * stride_or + cols.to(OFFSET_DTYPE)[None, :] * stride_ok
    tl.store(out0_ptr + split.to(tl.int64) * stride_o0s + offs, (acc0 * c0).to(out0_ptr.dtype.element_ty),
             mask=(ranks < R0)[:, None] & col_ok)
    if NUM_MEMBERS > 1:
        tl.store(out1_ptr + split.to(tl.int64) * stride_o1s + offs, (acc1 * c1).to(out1_ptr.dtype.element_ty),
                 mask=(ranks < R1)[:, None] & col_ok)
    if NUM_MEMBERS > 2:
        tl.store(out2_ptr + split.to(tl.int64) * stride_o2s + offs, (acc2 * c2).to(out2_ptr.dtype.element_ty),
                 mask=(ranks < R2)[:, None] & col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _padded(per_member: List[tuple], width: int) -> list:
    """The members' argument tuples flattened, padded with Nones / zeros to MAX_MEMBERS members
    (a padded member is never touched: NUM_MEMBERS prunes its code)."""
    out = []
    for i in range(MAX_MEMBERS):
        out += list(per_member[i]) if i < len(per_member) else [None] * width
    return out


def _zeros_for_absent(values: List, n: int, fill=0) -> list:
    return [values[i] if i < n else fill for i in range(MAX_MEMBERS)]


def _fuses(n: int, M: int) -> bool:
    """Whether the fused launches take a group of n members on M rows (else: the single op's
    launchers member by member)."""
    return 1 <= n <= MAX_MEMBERS and M > 0


def _forward_fuses(weights, lora_Bs) -> bool:
    """GF2 picks a member's tensors by scalar branches, so they must have one type across members
    (one dtype of W, one of B) and unit column strides (the kernel assumes them)."""
    return (len({W.dtype for W in weights}) == 1 and len({B.dtype for B in lora_Bs}) == 1
            and all(W.stride(1) == 1 or W.shape[1] <= 1 for W in weights)
            and all(B.stride(1) == 1 or B.shape[1] <= 1 for B in lora_Bs))


def _group_shrink(x2d, lora_As, ps: List[float], seeds):
    """GF1: every member's T (column blocks of one stacked [M, sum r_i] tensor, returned as views) and
    mask state, in one pass over x where every member's rank fits one rank tile (and the config lets
    F1 draw the mask); otherwise F1 per member. Returns (T [M, sum r_i], [T_i], [mask state_i])."""
    n = len(lora_As)
    M, K = x2d.shape
    Rs = [A.shape[0] for A in lora_As]
    dropout = [p > 0.0 for p in ps]
    cfg = shrink_masked_config(M, K, max(Rs), x2d.dtype, cuda_arch(x2d.device))
    # one rank tile a member (each x element visited, and drawn, once), at most 64 wide: three 128-wide
    # accumulators and three members' Philox spill on sm_80; with dropout the reduction tile must be
    # whole keep-bits words, and the config must let F1 draw the mask
    one_pass = (max(Rs) <= cfg.BLOCK_R <= 64 and K > 0
                and (not any(dropout) or (cfg.BLOCK_RED % 32 == 0 and cfg.DRAW_BITS)))
    if not one_pass:
        Ts, states = [], []
        for i in range(n):  # F1: w_view[k, r] = A[r, k]
            T, bits = _shrink(x2d, (lora_As[i].stride(1), lora_As[i].stride(0)), lora_As[i], Rs[i], x2d.dtype,
                              seed=seeds[i] if dropout[i] else None, p=ps[i])
            Ts.append(T)
            states.append(bits if bits is not None else x2d.new_empty((0,), dtype=torch.int32))
        return _cat(Ts), Ts, states
    # three members' accumulators and Philox draws in one program: twice F1's warps keep them in
    # registers (4 warps spill on sm_80 and sm_90)
    cfg = replace(cfg, num_warps=max(cfg.num_warps, 8))
    T = torch.empty((M, sum(Rs)), dtype=x2d.dtype, device=x2d.device)
    offs = [0]
    for R in Rs:
        offs.append(offs[-1] + R)
    Ts = [T[:, offs[i]:offs[i + 1]] for i in range(n)]
    n_words = keep_bits_words(K)
    bits = [torch.empty((M, n_words), dtype=torch.int32, device=x2d.device) if dropout[i] else None for i in range(n)]
    stride_bm = next((b.stride(0) for b in bits if b is not None), 0)
    pointers = _padded([(lora_As[i], Ts[i], seeds[i] if dropout[i] else None, bits[i]) for i in range(n)], 4)
    a_strides = [s for i in range(MAX_MEMBERS) for s in ((lora_As[i].stride(0), lora_As[i].stride(1)) if i < n
                                                         else (0, 0))]
    launch(_group_shrink_kernel, (_cdiv(M, cfg.BLOCK_M),),
           (x2d, *pointers, M, K, *_zeros_for_absent(Rs, n), n_words,
            x2d.stride(0), x2d.stride(1), *a_strides, T.stride(0), stride_bm,
            *_zeros_for_absent([drop_threshold(p) if p > 0.0 else 0 for p in ps], n),
            *_zeros_for_absent([1.0 / (1.0 - p) for p in ps], n, 1.0)),
           dict(NUM_MEMBERS=n, **{f"HAS_DROPOUT{i}": i < n and dropout[i] for i in range(MAX_MEMBERS)},
                EVEN_K=K % cfg.BLOCK_RED == 0, OFFSET_DTYPE=_offset_dtype(x2d, *lora_As, T), **_meta(x2d.dtype),
                BLOCK_M=cfg.BLOCK_M, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R),
           cfg.launch_kwargs())
    return T, Ts, [b if b is not None else x2d.new_empty((0,), dtype=torch.int32) for b in bits]


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def group_forward(x2d, weights, lora_As, lora_Bs, biases, scalings: List[float], ps: List[float], seeds):
    """GF1 (every member's T in one pass over x, see :func:`_group_shrink`), then GF2 for every
    member's y in one launch. Returns (ys [M, N_i], T [M, sum r_i]
    in x's dtype, each member's mask state as :func:`lora_forward` returns it)."""
    n = len(weights)
    M, K = x2d.shape
    if not (_fuses(n, M) and _forward_fuses(weights, lora_Bs)):
        outs = [lora_forward(x2d, weights[i], lora_As[i], lora_Bs[i], biases[i], scalings[i], ps[i], seeds[i])
                for i in range(n)]
        return [o[0] for o in outs], _cat([o[1] for o in outs]), [o[2] for o in outs]
    T, Ts, states = _group_shrink(x2d, lora_As, ps, seeds)
    ys = [torch.empty((M, W.shape[0]), dtype=x2d.dtype, device=x2d.device) for W in weights]
    Ns, Rs = [W.shape[0] for W in weights], [A.shape[0] for A in lora_As]
    if sum(Ns) > 0:
        cfg = dual_gemm_config(M, sum(Ns), K, max(Rs), x2d.dtype, cuda_arch(x2d.device))
        biases = [b.contiguous() if b is not None else None for b in biases]  # read with unit stride
        tiles = sum(_cdiv(N, cfg.BLOCK_F) for N in Ns)
        pointers = _padded([(Ts[i], lora_Bs[i], weights[i], biases[i], ys[i]) for i in range(n)], 5)
        strides = _padded([(Ts[i].stride(0), lora_Bs[i].stride(0), weights[i].stride(0), ys[i].stride(0))
                           for i in range(n)], 4)
        strides = [0 if s is None else s for s in strides]
        launch(_group_dual_gemm_kernel, (_cdiv(M, cfg.BLOCK_M) * tiles,),
               (x2d, *pointers, M, K, *_zeros_for_absent(Ns, n), *_zeros_for_absent(Rs, n),
                x2d.stride(0), x2d.stride(1), *strides, *_zeros_for_absent([float(s) for s in scalings], n, 0.0)),
               dict(NUM_MEMBERS=n,
                    **{f"HAS_BIAS{i}": i < n and biases[i] is not None for i in range(MAX_MEMBERS)},
                    EVEN_R=all(R % cfg.BLOCK_R == 0 for R in Rs), EVEN_K=K % cfg.BLOCK_RED == 0,
                    OFFSET_DTYPE=_offset_dtype(x2d, *Ts, *lora_Bs, *weights, *ys), **_meta(x2d.dtype),
                    BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
                    GROUP_M=cfg.GROUP_M),
               cfg.launch_kwargs())
    return ys, T, states


def _group_dx(dys, Us, lora_As, weights, scalings: List[float], ps: List[float], keep_bits: List[Optional[torch.Tensor]],
             M: int, K: int, dtype):
    """GB2: dx [M, K] = sum_i dy_i W_i + s_i/(1-p_i) m_i (U_i A_i) in one launch. Tiles: the DoRA dx
    kernel's (``dora_gemm_config``), which is sized for two fp32 accumulators a tile, as here (dx and
    one member's masked rank term)."""
    n = len(weights)
    dx = torch.empty((M, K), dtype=dtype, device=dys[0].device)
    if dx.numel() == 0:
        return dx
    Ns, Rs = [W.shape[0] for W in weights], [A.shape[0] for A in lora_As]
    cfg = dora_gemm_config(M, K, sum(Ns), max(Rs), dtype, cuda_arch(dx.device))
    pointers = _padded([(Us[i], lora_As[i], dys[i], weights[i], keep_bits[i]) for i in range(n)], 5)
    strides = []
    for i in range(MAX_MEMBERS):
        if i >= n:
            strides += [0] * 9
            continue
        strides += [Us[i].stride(0), Us[i].stride(1), lora_As[i].stride(0), lora_As[i].stride(1),
                    dys[i].stride(0), dys[i].stride(1), weights[i].stride(0), weights[i].stride(1),
                    _bits_strides(keep_bits[i])[1]]
    n_words = [_bits_strides(keep_bits[i])[0] for i in range(n)]
    scales = [scalings[i] / (1.0 - ps[i]) for i in range(n)]
    launch(_group_dx_kernel, (_cdiv(M, cfg.BLOCK_M) * _cdiv(K, cfg.BLOCK_F),),
           (*pointers, dx, M, K, *_zeros_for_absent(Ns, n), *_zeros_for_absent(Rs, n),
            *_zeros_for_absent(n_words, n), *strides, dx.stride(0), dx.stride(1),
            *_zeros_for_absent(scales, n, 0.0)),
           dict(NUM_MEMBERS=n,
                **{f"HAS_DROPOUT{i}": i < n and keep_bits[i] is not None for i in range(MAX_MEMBERS)},
                **{f"EVEN_N{i}": i >= n or Ns[i] % cfg.BLOCK_RED == 0 for i in range(MAX_MEMBERS)},
                **{f"EVEN_R{i}": i >= n or Rs[i] % cfg.BLOCK_R == 0 for i in range(MAX_MEMBERS)},
                OFFSET_DTYPE=_offset_dtype(*Us, *lora_As, *dys, *weights, dx), **_meta(dtype),
                BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
                GROUP_M=cfg.GROUP_M),
           cfg.launch_kwargs())
    return dx


def _group_da(Us, x2d, lora_As, scalings: List[float], ps: List[float], keep_bits, members: List[int]):
    """GB3a: {member: dA_i} for the given members (ONE pass over x), or None
    where the launch does not apply (a rank beyond one rank tile of at most 64, adapters of different
    dtypes): then B3 per member. Each member's dA is its own tensor (a custom op's outputs never alias). Deterministic split-M as B3 (fp32 partials summed in order)."""
    M, K = x2d.shape
    Rs = [lora_As[i].shape[0] for i in members]
    a_dtype = lora_As[members[0]].dtype
    arch = cuda_arch(x2d.device)
    cfg = grads_config(M, 0, K, max(Rs), x2d.dtype, arch)
    if not (max(Rs) <= cfg.BLOCK_R <= 64 and K > 0 and all(lora_As[i].dtype == a_dtype for i in members)):
        return None
    # three [rank tile, BLOCK_Q] accumulators a program: B3's column tiles halved (64), and 32 where
    # the products' operands sit in registers: fp32 (IEEE dots; 64 spills on sm_90 with dropout) and
    # sm_80 with dropout (mma.sync: 255 registers and 8 B of stack at 64, three members; 180 at 32)
    bits = [keep_bits[i] for i in members]
    narrow = x2d.dtype == torch.float32 or (arch < 90 and any(b is not None for b in bits))
    block_q = min(cfg.BLOCK_F, 32 if narrow else 64)
    # and at most 64 rows a step: B3's 128-row tuner alternative spills here (three members with
    # dropout on sm_90, 16-bit: the full static report)
    block_m = min(cfg.BLOCK_M, 64)
    tiles = _cdiv(K, block_q)
    num_splits = split_m_for(M, tiles, block_m, num_sms(x2d.device))
    m_chunk = _cdiv(_cdiv(M, num_splits), block_m) * block_m
    num_splits = _cdiv(M, m_chunk)
    outs = [torch.empty((R, K) if num_splits == 1 else (num_splits, R, K),
                        dtype=a_dtype if num_splits == 1 else torch.float32, device=x2d.device) for R in Rs]
    n = len(members)
    n_words, stride_bm = next((_bits_strides(b) for b in bits if b is not None), (0, 0))
    pointers = _padded([(Us[i], bits[j], outs[j]) for j, i in enumerate(members)], 3)
    u_strides = [s for j in range(MAX_MEMBERS) for s in ((Us[members[j]].stride(0), Us[members[j]].stride(1))
                                                         if j < n else (0, 0))]
    launch(_group_da_kernel, (tiles * num_splits,),
           (x2d, *pointers, M, K, *_zeros_for_absent(Rs, n), n_words, m_chunk,
            x2d.stride(0), x2d.stride(1), *u_strides, stride_bm,
            *_zeros_for_absent([o.stride(0) if num_splits > 1 else 0 for o in outs], n), K, 1,
            *_zeros_for_absent([scalings[i] / (1.0 - ps[i]) for i in members], n, 0.0)),
           dict(NUM_MEMBERS=n, **{f"HAS_DROPOUT{j}": j < n and bits[j] is not None for j in range(MAX_MEMBERS)},
                EVEN_M=M % block_m == 0, OFFSET_DTYPE=_offset_dtype(x2d, *(Us[i] for i in members), *outs),
                **_meta(x2d.dtype), BLOCK_M=block_m, BLOCK_P=cfg.BLOCK_R, BLOCK_Q=block_q),
           cfg.launch_kwargs())
    if num_splits > 1:  # each member's partials summed in order (a launch each)
        outs = [_sum_splits(o.view(num_splits, R * K), a_dtype).view(R, K) for o, R in zip(outs, Rs)]
    return dict(zip(members, outs))


def group_backward(dys, x2d, weights, lora_As, lora_Bs, T, scalings: List[float], ps: List[float], mask_states,
                   need_dx: bool, need_dAs: List[bool], need_dBs: List[bool], need_dbs: List[bool]):
    """B1 per member, GB2 for dx in one launch, B3 per member. Returns (dx | None, [dA_i | None],
    [dB_i | None], [db_i fp32 | None])."""
    n = len(weights)
    M, K = x2d.shape
    offs = [0]
    for A in lora_As:
        offs.append(offs[-1] + A.shape[0])
    Ts = [T[:, offs[i]:offs[i + 1]] for i in range(n)]
    if not _fuses(n, M):
        dx, dAs, dBs, dbs = None, [], [], []
        for i in range(n):
            dx_i, dA, dB, db = lora_backward(dys[i], x2d, weights[i], lora_As[i], lora_Bs[i], Ts[i], scalings[i],
                                             ps[i], mask_states[i], need_dx, need_dAs[i], need_dBs[i], need_dbs[i])
            dx = dx_i if dx is None else dx.add_(dx_i)
            dAs.append(dA)
            dBs.append(dB)
            dbs.append(db)
        return dx, dAs, dBs, dbs
    keep_bits = [_as_keep_bits(mask_states[i], M, K, ps[i]) for i in range(n)]
    # B1: w_view[n, r] = B[n, r]
    Us = [_shrink(dys[i], (lora_Bs[i].stride(0), lora_Bs[i].stride(1)), lora_Bs[i], lora_As[i].shape[0],
                  x2d.dtype)[0] if (need_dx or need_dAs[i]) else None for i in range(n)]
    dx = _group_dx(dys, Us, lora_As, weights, scalings, ps, keep_bits, M, K, x2d.dtype) if need_dx else None
    members_dA = [i for i in range(n) if need_dAs[i]]
    fused_dA = _group_da(Us, x2d, lora_As, scalings, ps, keep_bits, members_dA) if members_dA else None
    dAs, dBs, dbs = [], [], []
    for i in range(n):  # B3; db is summed by dB's launch, which reads dy anyway
        dA = dB = db = None
        need_dA = need_dAs[i] and fused_dA is None
        if need_dA or need_dBs[i]:
            grads = _lora_grads(Us[i], x2d, dys[i], Ts[i], scalings[i], ps[i], keep_bits[i], lora_As[i].dtype,
                                need_dA, need_dBs[i], need_db=need_dbs[i])
            dA, dB = grads[:2]
        if fused_dA is not None and need_dAs[i]:
            dA = fused_dA[i]
            db = grads[2] if need_dbs[i] else None
        if need_dbs[i] and db is None:
            db = dys[i].sum(0, dtype=torch.float32)
        dAs.append(dA)
        dBs.append(dB)
        dbs.append(db)
    return dx, dAs, dBs, dbs
