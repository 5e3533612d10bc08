"""Triton kernels of the fused LoRA linear op and their launchers.

Reading order: the kernels (two helpers shared by the GEMM kernels first), then the host
launchers. The dropout stream's Triton functions (Philox, the keep-bits pass, packing and
unpacking, applying the mask as a multiply) live in :mod:`rslora_kernels.dropout.kernels`.

    forward   F1  T  = drop(x) A^T, keep-bits of x          _shrink_kernel (draws the bits when one
                                                            rank tile covers r; else a pass first:
                                                            dropout.kernels._keep_bits_kernel)
              F2  y  = x W^T + s T B^T + b                  _dual_gemm_kernel
    backward  B1  U  = dy B                                 _shrink_kernel
              B2  dx = dy W + s/(1-p) * mask * (U A)        _dual_gemm_kernel (mask on)
              B3  dA = s/(1-p) U^T (x*mask)                 _m_reduce_kernel (mask on)
                  dB = s dy^T T,  db = sum_M dy             _m_reduce_kernel (column sums on)
                  (split over M: partials summed in order)  _sum_splits_kernel

DoRA's kernels with dropout (its F2 and B2 with two accumulators) are in
:mod:`rslora_kernels.ops.dora_kernels`, the group op's in :mod:`rslora_kernels.ops.group_kernels`;
both run F1, B1 and B3 from here and share the GEMM helpers and launch plans below.

The mask is drawn once per step (one Philox call per 8 elements of x), in F1 or the bits pass; B2 and
B3 read the bits.

Every kernel takes full strides (only the pointer arithmetic cares) and works for any sizes (no
size needs to be a multiple of a tile), loops over the rank in tiles (any r) and accumulates in
fp32. The hot loops are written like Triton's tutorial matmul: pointer tiles advanced by a step,
rows and columns outside the matrix wrapped back inside (``% M``) so that loads need a mask only
along the reduction, and none at all when the launcher says the reduction divides the tile
(``EVEN_*``). In-tile offsets are 32-bit when every tensor spans < 2^31 elements, 64-bit otherwise
(``OFFSET_DTYPE``, chosen by the launcher). This module imports Triton; the package imports it
lazily so that ``TRITON_INTERPRET`` is read when the kernels are first used, never at package import.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from .._launch import BoundLaunch, launch, planned
from .._runtime import cuda_arch, interpreting, num_sms, shared_tensor
from ..dropout.kernels import (apply_keep, keep_bits_triton, keep_bits_words, keep_factor, keep_from_bits,
                               keep_mask_tile, load_seed, store_keep_bits)
from ..dropout.stream import drop_threshold
from .configs import dual_gemm_config, grads_config, shrink_config, shrink_masked_config, split_count, split_m_for
from .tuning import configs_forced, plan_forced, tuned_plan

# a split of a shrink's reduction keeps at least this many tile steps (a pipeline's worth of loads)
_SHRINK_MIN_STEPS = 4


# ----------------------------------------------------------------------------------------------
# F1 / B1: out[M, R] = keep?(in[M, RED]) @ w[RED, R]  (dropout on `in` for F1)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    # pointers: in [M, RED] is x (F1) or dy (B1); w [RED, R] is A^T (F1) or B (B1); out is T or U.
    # keep_bits [M, n_words] (F1 with dropout: read, or written with GEN_BITS) and seed (GEN_BITS)
    # may be None
    # with a split reduction, out is [splits, M, R] fp32 partials (summed in order afterwards)
    in_ptr, w_ptr, out_ptr, keep_bits_ptr, seed_ptr,
    # sizes; the reduction is split into chunks of red_chunk (a multiple of BLOCK_RED), one a split
    M, RED, R, n_words, red_chunk,
    # strides
    stride_im, stride_ired, stride_wred, stride_wr, stride_os, stride_om, stride_or, stride_bm,
    # dropout: the stream's threshold (GEN_BITS); kept inputs scaled by out_scale = 1/(1-p) in fp32
    threshold, out_scale,
    # meta
    # GEN_BITS: draw the mask here (Philox) and store it as keep-bits for backward, instead of reading
    # bits drawn by a pass before; the launcher sets it only when one rank tile covers r, so that
    # every element of `in` is visited, and drawn, once
    # RANK_MAJOR: accumulate out^T = w^T keep(in)^T, so that the masked tile is the MMA's B operand,
    # which goes through shared memory (a masked A operand is fed from registers, and ptxas then
    # serializes the wgmma, C7515); the rank tile is the MMA's M side then (>= 64 for wgmma)
    HAS_DROPOUT: tl.constexpr, GEN_BITS: tl.constexpr, RANK_MAJOR: tl.constexpr, EVEN_RED: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # rank tiles fastest: the programs of one row tile run together and share its `in` tiles in L2;
    # the split of the reduction slowest
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    num_pid_mr = tl.cdiv(M, BLOCK_M) * num_pid_r
    split = pid // num_pid_mr
    pid_m = (pid % num_pid_mr) // num_pid_r
    pid_r = pid % num_pid_r
    red_lo = split * red_chunk
    red_hi = min(red_lo + red_chunk, RED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    reds = tl.arange(0, BLOCK_RED)
    # wrapped inside the matrix: loads need no row or rank mask (those lanes are never stored)
    in_ptrs = in_ptr + ((rows % M).to(OFFSET_DTYPE)[:, None] * stride_im
                        + (red_lo + reds).to(OFFSET_DTYPE)[None, :] * stride_ired)
    w_ptrs = w_ptr + ((red_lo + reds).to(OFFSET_DTYPE)[:, None] * stride_wred
                      + (ranks % R).to(OFFSET_DTYPE)[None, :] * stride_wr)
    in_step = tl.cast(BLOCK_RED * stride_ired, OFFSET_DTYPE)
    w_step = tl.cast(BLOCK_RED * stride_wred, OFFSET_DTYPE)
    if GEN_BITS:
        seed_lo, seed_hi = load_seed(seed_ptr)

    if RANK_MAJOR:
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for red0 in range(red_lo, red_hi, BLOCK_RED):  # red0: this tile's first column of `in`
        if EVEN_RED:
            a = tl.load(in_ptrs)
            w = tl.load(w_ptrs)
        else:  # chunks are whole tiles: only the last one of the reduction is partial
            a = tl.load(in_ptrs, mask=reds[None, :] < RED - red0, other=0.0)
            w = tl.load(w_ptrs, mask=reds[:, None] < RED - red0, other=0.0)
        if HAS_DROPOUT:
            if GEN_BITS:
                keep = keep_mask_tile(seed_lo, seed_hi, rows.to(tl.int64), red0, threshold, BLOCK_M, BLOCK_RED)
                store_keep_bits(keep_bits_ptr, keep, rows.to(tl.int64), rows < M, red0, RED, n_words, stride_bm,
                                BLOCK_M, BLOCK_RED)
            else:
                keep = keep_from_bits(keep_bits_ptr, rows.to(tl.int64), rows < M, red0, n_words, stride_bm,
                                      BLOCK_M, BLOCK_RED)
            a = apply_keep(a, keep)
        if RANK_MAJOR:
            acc = tl.dot(tl.trans(w.to(DOT_DTYPE)), tl.trans(a.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        in_ptrs += in_step
        w_ptrs += w_step
    if HAS_DROPOUT:
        acc = acc * out_scale
    out_ptr += split.to(tl.int64) * stride_os
    if RANK_MAJOR:
        out_ptrs = out_ptr + (ranks.to(OFFSET_DTYPE)[:, None] * stride_or + rows.to(OFFSET_DTYPE)[None, :] * stride_om)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(ranks < R)[:, None] & (rows < M)[None, :])
    else:
        out_ptrs = out_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_om + ranks.to(OFFSET_DTYPE)[None, :] * stride_or)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (ranks < R)[None, :])


# ----------------------------------------------------------------------------------------------
# Shared by the GEMM kernels below (F2/B2) and those of dora_kernels.py (DF2, DB2) and group_kernels.py
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(M, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: GROUP_M row tiles sweep the column
    tiles together, so that the column tiles' operand (W) stays in L2 while they share it."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_f = tl.cdiv(F, BLOCK_F)
    pids_per_group = GROUP_M * num_pid_f
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % pids_per_group) % group_rows), (pid % pids_per_group) // group_rows


@triton.jit
def _rank_term(acc, a_ptr, stride_ax, stride_ar, xs, b_ptr, stride_br, stride_by, ys, R,
               OFFSET_DTYPE: tl.constexpr, EVEN_R: tl.constexpr, DOT_DTYPE: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + a[xs, :R] @ b[:R, ys], over the rank in BLOCK_R tiles (ranks past R read as 0); xs, ys:
    in-matrix row / column indices (OFFSET_DTYPE) of a [X, R] and b [R, Y]. The group kernels run
    their base terms (x W^T, dy W) through it too, the reduction (K or N) in the rank's place."""
    ranks = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + (xs[:, None] * stride_ax + ranks.to(OFFSET_DTYPE)[None, :] * stride_ar)
    b_ptrs = b_ptr + (ranks.to(OFFSET_DTYPE)[:, None] * stride_br + ys[None, :] * stride_by)
    for r0 in range(0, R, BLOCK_R):
        if EVEN_R:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ranks[None, :] < R - r0, other=0.0)
            b = tl.load(b_ptrs, mask=ranks[:, None] < R - r0, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        a_ptrs += tl.cast(BLOCK_R * stride_ar, OFFSET_DTYPE)
        b_ptrs += tl.cast(BLOCK_R * stride_br, OFFSET_DTYPE)
    return acc


# ----------------------------------------------------------------------------------------------
# F2 / B2: out[M, F] = adapter_scale * keep?(t[M, R] @ bt[R, F]) + in[M, RED] @ w[RED, F] + bias
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dual_gemm_kernel(
    # pointers. F2: t=T, bt=B^T, in=x, w=W^T, bias.  B2: t=U, bt=A, in=dy, w=W, keep_bits.
    # bias and keep_bits may be None (HAS_BIAS, HAS_DROPOUT)
    t_ptr, bt_ptr, in_ptr, w_ptr, bias_ptr, keep_bits_ptr, out_ptr,
    # sizes
    M, F, RED, R, n_words,
    # strides
    stride_tm, stride_tr, stride_btr, stride_btf,
    stride_im, stride_ired, stride_wred, stride_wf, stride_bm, stride_om, stride_of,
    # adapter scale (s, or s/(1-p) in B2)
    adapter_scale,
    # meta
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_RED: tl.constexpr, EVEN_R: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_f = _grouped_tile(M, F, BLOCK_M, BLOCK_F, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    # wrapped inside the matrix: loads need no row or feature mask (those lanes are never stored)
    rows_in = (rows % M).to(OFFSET_DTYPE)
    feats_in = (feats % F).to(OFFSET_DTYPE)

    # adapter term first, so the scale and the dropout mask touch one fp32 tile
    acc = _rank_term(tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32), t_ptr, stride_tm, stride_tr, rows_in,
                     bt_ptr, stride_btr, stride_btf, feats_in, R,
                     OFFSET_DTYPE, EVEN_R, DOT_DTYPE, INPUT_PRECISION, BLOCK_R) * adapter_scale
    if HAS_DROPOUT:
        keep = keep_from_bits(keep_bits_ptr, rows.to(tl.int64), rows < M, pid_f * BLOCK_F, n_words, stride_bm,
                              BLOCK_M, BLOCK_F)
        acc = apply_keep(acc, keep)

    # base term into the same accumulator: the hot loop
    reds = tl.arange(0, BLOCK_RED)
    in_ptrs = in_ptr + (rows_in[:, None] * stride_im + reds.to(OFFSET_DTYPE)[None, :] * stride_ired)
    w_ptrs = w_ptr + (reds.to(OFFSET_DTYPE)[:, None] * stride_wred + feats_in[None, :] * stride_wf)
    in_step = tl.cast(BLOCK_RED * stride_ired, OFFSET_DTYPE)
    w_step = tl.cast(BLOCK_RED * stride_wred, OFFSET_DTYPE)
    for red0 in range(0, RED, BLOCK_RED):
        if EVEN_RED:
            a = tl.load(in_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(in_ptrs, mask=reds[None, :] < RED - red0, other=0.0)
            w = tl.load(w_ptrs, mask=reds[:, None] < RED - red0, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        in_ptrs += in_step
        w_ptrs += w_step

    # epilogue: per-column terms, then the store
    feat_ok = feats < F
    if HAS_BIAS:
        acc += tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_om + feats.to(OFFSET_DTYPE)[None, :] * stride_of)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & feat_ok[None, :])


# ----------------------------------------------------------------------------------------------
# B3: out[P, Q] = scale * sum over m of l[m, p] * keep?(r[m, q])
#     dA [r, K]: l = U, r = x (mask on);   dB [N, r]: l = dy, r = T (column sums of dy: db)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _m_reduce_kernel(
    # pointers: l [M, P], r [M, Q], keep_bits (None without dropout), out [SPLITS?, P, Q],
    # colsum [SPLITS?, P] (fp32 column sums of l, the bias grad in dB's launch; None when not wanted)
    l_ptr, r_ptr, keep_bits_ptr, out_ptr, colsum_ptr,
    # sizes; the M reduction is split into num_splits chunks of m_chunk rows (a multiple of BLOCK_M)
    M, P, Q, n_words, m_chunk,
    # strides
    stride_lm, stride_lp, stride_rm, stride_rq, stride_bm, stride_os, stride_op, stride_oq, stride_cs,
    scale,
    # meta. The mask falls on r, the MMA's B operand, which goes through shared memory (a masked A
    # operand is fed from registers and ptxas serializes the wgmma, C7515). RANK_AXIS: which of P
    # (0, dA) and Q (1, dB) is the rank; its tiles run fastest, so the programs that read one tile
    # of x (dy) run together (L2)
    HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr, COLSUM_MMA: tl.constexpr, EVEN_M: tl.constexpr,
    RANK_AXIS: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    tiles = num_pid_p * num_pid_q
    split = pid // tiles
    if RANK_AXIS == 0:
        pid_p = pid % num_pid_p
        pid_q = (pid % tiles) // num_pid_p
    else:
        pid_q = pid % num_pid_q
        pid_p = (pid % tiles) // num_pid_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_lo = split * m_chunk
    m_hi = min(m_lo + m_chunk, M)
    ms = tl.arange(0, BLOCK_M)
    # l is read transposed ([P, M] tiles); p and q are wrapped inside the matrix (never stored),
    # m is masked unless M divides into whole tiles
    l_ptrs = l_ptr + ((offs_p % P).to(OFFSET_DTYPE)[:, None] * stride_lp + (m_lo + ms).to(OFFSET_DTYPE)[None, :] * stride_lm)
    r_ptrs = r_ptr + ((m_lo + ms).to(OFFSET_DTYPE)[:, None] * stride_rm + (offs_q % Q).to(OFFSET_DTYPE)[None, :] * stride_rq)
    l_step = tl.cast(BLOCK_M * stride_lm, OFFSET_DTYPE)
    r_step = tl.cast(BLOCK_M * stride_rm, OFFSET_DTYPE)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    # column sums of l: with 16-bit operands one more (narrow) MMA on the same l tile, l^T @ ones
    # (products by 1 are exact, sums in fp32); fp32 operands would be rounded to TF32 there, so they
    # are summed elementwise in the loop and across rows once after it
    if COLSUM:
        if COLSUM_MMA:
            col_acc = tl.zeros((BLOCK_P, 16), dtype=tl.float32)
            ones = tl.full((BLOCK_M, 16), 1.0, dtype=DOT_DTYPE)
        else:
            col_acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for m0 in range(0, m_hi - m_lo, BLOCK_M):
        if EVEN_M:
            lt = tl.load(l_ptrs)
            rm = tl.load(r_ptrs)
        else:
            lt = tl.load(l_ptrs, mask=(ms < m_hi - m_lo - m0)[None, :], other=0.0)
            rm = tl.load(r_ptrs, mask=(ms < m_hi - m_lo - m0)[:, None], other=0.0)
        if HAS_DROPOUT:
            rows = (m_lo + m0 + ms).to(tl.int64)
            keep = keep_from_bits(keep_bits_ptr, rows, rows < m_hi, pid_q * BLOCK_Q, n_words, stride_bm,
                                  BLOCK_M, BLOCK_Q)
            rm = apply_keep(rm, keep)
        if COLSUM:
            if COLSUM_MMA:
                col_acc = tl.dot(lt.to(DOT_DTYPE), ones, col_acc)
            else:
                col_acc += lt.to(tl.float32)
        acc = tl.dot(lt.to(DOT_DTYPE), rm.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        l_ptrs += l_step
        r_ptrs += r_step
    if COLSUM:
        if pid_q == 0:  # one rank tile per column tile writes the column sums
            if COLSUM_MMA:
                col_sum = tl.max(col_acc, axis=1)  # 16 equal columns
            else:
                col_sum = tl.sum(col_acc, axis=1)
            tl.store(colsum_ptr + split.to(tl.int64) * stride_cs + offs_p, col_sum, mask=offs_p < P)
    acc = acc * scale
    out_ptrs = out_ptr + split.to(tl.int64) * stride_os + (offs_p.to(OFFSET_DTYPE)[:, None] * stride_op
                                                          + offs_q.to(OFFSET_DTYPE)[None, :] * stride_oq)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_p < P)[:, None] & (offs_q < Q)[None, :])


@triton.jit
def _sum_splits_kernel(
    # pointers: part [S, n] fp32 (row stride stride_s, unit column stride), out [n] contiguous
    part_ptr, out_ptr,
    # sizes, strides
    S, n, stride_s,
    # meta
    BLOCK: tl.constexpr,
):
    """B3's split-M epilogue: out = sum over s of part[s] in fp32, s = 0, 1, ... in order (so the
    result is the same every run), stored once in out's dtype: one launch instead of a sum and a cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, S):  # the pointer steps row by row: 64-bit addresses, however large S * stride_s
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += stride_s
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Plan "rank_mm" (the rank GEMMs in cuBLAS): drop(x) = x * keep / (1-p) in x's dtype, from the bits
# ----------------------------------------------------------------------------------------------
@triton.jit
def _drop_by_bits_kernel(
    # pointers: x [M, K], keep_bits [M, n_words], out [M, K] in x's dtype
    x_ptr, keep_bits_ptr, out_ptr,
    # sizes
    M, K, n_words,
    # strides
    stride_xm, stride_xk, stride_bm, stride_om, stride_ok,
    # 1/(1-p), applied in fp32 before the one rounding to out's dtype
    keep_scale,
    # meta
    OFFSET_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    rows = (pid // num_pid_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % num_pid_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_xm + cols.to(OFFSET_DTYPE)[None, :] * stride_xk),
                mask=inside, other=0.0)
    keep = keep_from_bits(keep_bits_ptr, rows.to(tl.int64), rows < M, (pid % num_pid_k) * BLOCK_K, n_words, stride_bm,
                          BLOCK_M, BLOCK_K)
    # x * factor, not a select on x: an Inf or NaN at a dropped position gives NaN, as the reference's x * mask
    dropped = x.to(tl.float32) * keep_factor(keep, keep_scale)
    tl.store(out_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_om + cols.to(OFFSET_DTYPE)[None, :] * stride_ok),
             dropped.to(out_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` is a constexpr function: slow to call from the host)."""
    return -(-a // b)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot. The interpreter computes 16-bit dots wrongly (bf16) or in 16-bit
    (fp16), so it gets fp32 operands: products of 16-bit values are exact in fp32 either way."""
    return tl.float32 if interpreting() else _TL_DTYPES[dtype]


def _matmul_precision(dtype: torch.dtype) -> Optional[str]:
    """torch's fp32 matmul precision setting for fp32 operands (part of a launch plan's key: it can
    change between calls), None for 16-bit ones."""
    return torch.get_float32_matmul_precision() if dtype == torch.float32 else None


def _meta(dtype: torch.dtype, precision: Optional[str] = None):
    """DOT_DTYPE and INPUT_PRECISION: fp32 follows ``precision`` (IEEE for "highest", TF32 otherwise),
    torch's setting read now when None (a launch plan passes the one its key holds)."""
    if precision is None:
        precision = _matmul_precision(dtype)
    return {"DOT_DTYPE": _dot_dtype(dtype),
            "INPUT_PRECISION": None if precision is None else "ieee" if precision == "highest" else "tf32"}


def _bits_strides(keep_bits):
    """(words per row, row stride) of the keep-bits, or (0, 0) without dropout."""
    return (keep_bits.shape[1], keep_bits.stride(0)) if keep_bits is not None else (0, 0)


def _offset_dtype(*tensors):
    """tl.int32 for in-tile offsets when every tensor (None: skipped) spans fewer than 2^31 elements
    (its largest offset, strides included), tl.int64 otherwise."""
    return _layouts_offset_dtype(*[_layout(t) for t in tensors if t is not None])


def _layout(t: torch.Tensor):
    """(shape, strides): what a launch plan knows of a tensor."""
    return t.shape, t.stride()


def _contiguous(*shape: int):
    """The layout of ``torch.empty(shape)`` (row-major; a size-0 or size-1 dim does not stretch strides)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(shape), tuple(reversed(strides))


def _layouts_offset_dtype(*layouts):
    """:func:`_offset_dtype` from (shape, strides) pairs."""
    for shape, strides in layouts:
        if 0 in shape:
            continue
        if sum((n - 1) * abs(st) for n, st in zip(shape, strides)) + 1 >= 2**31:
            return tl.int64
    return tl.int32


# Launch plans (docs/kernels.md, "Host work per launch"): each launcher's work that depends only on its
# call's signature -- the tile config, grid, constexprs, launch options, the sizes and strides it
# passes, the shapes it allocates -- is a plan object computed once per signature by the plan cache
# of rslora_kernels._launch; a call then allocates and launches (``plan.run``). The op-level plans
# (:func:`lora_forward`, :func:`lora_backward`) hold their launchers' plans, so a fused step looks
# up two plans, not one per launch
def _plan(make):
    return planned(make, uncached_while=configs_forced)


def _op_plan(make):
    # the op's plan also fixes the "fused"/"rank_mm" choice, which the tuner forces per run
    return planned(make, uncached_while=lambda: configs_forced() or plan_forced())


@dataclasses.dataclass
class _SumPlan:
    """:func:`_sum_splits` for [S, n] fp32 partials in a contiguous buffer."""
    launch: BoundLaunch
    n: int
    out_dtype: torch.dtype
    device: torch.device

    def run(self, part: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.n,), dtype=self.out_dtype, device=self.device)
        self.launch((part, out))
        return out


_SUM_BLOCK = 1024


@_plan
def _sum_plan(S, n, stride_s, out_dtype, device):
    return _SumPlan(BoundLaunch(_sum_splits_kernel, (_cdiv(n, _SUM_BLOCK),), (S, n, stride_s), dict(BLOCK=_SUM_BLOCK),
                                {"num_warps": 4}), n, out_dtype, device)


def _sum_splits(part: torch.Tensor, out_dtype) -> torch.Tensor:
    """[S, n] fp32 partial sums (unit column stride) -> [n] in ``out_dtype``, summed in order."""
    S, n = part.shape
    return _sum_plan(S, n, part.stride(0), out_dtype, part.device).run(part)


@dataclasses.dataclass
class _ShrinkPlan:
    """F1 / B1 for one signature: see :func:`_shrink`."""
    launch: BoundLaunch
    M: int
    RED: int
    R: int
    p: float
    device: torch.device
    out_shape: tuple           # (M, R), or (splits, M, R) fp32 partials
    out_dtype: torch.dtype     # what the launch writes
    bits_shape: Optional[tuple]  # the keep-bits' shape with dropout, else None
    gen_bits: bool             # the launch draws the keep-bits (else a pass before it does)
    sums: Optional[_SumPlan]   # the partials' sum, when the reduction is split

    def run(self, inp: torch.Tensor, w: torch.Tensor, seed: Optional[torch.Tensor]):
        keep_bits = None
        if self.bits_shape is not None:
            keep_bits = (torch.empty(self.bits_shape, dtype=torch.int32, device=self.device) if self.gen_bits
                         else keep_bits_triton(seed, self.M, self.RED, self.p))
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        self.launch((inp, w, out, keep_bits, seed if self.gen_bits else None))
        if self.sums is not None:
            out = self.sums.run(out.view(self.out_shape[0], self.M * self.R)).view(self.M, self.R)
        return out, keep_bits


def _shrink(inp: torch.Tensor, w_strides, w: torch.Tensor, R: int, out_dtype, *, seed=None, p=0.0,
            num_splits: Optional[int] = None):
    """out[M, R] = keep?(inp)[M, RED] @ w_view[RED, R] / (1-p), with dropout when ``seed`` is given
    (F1); ``w_strides`` are w_view's. Returns (out, keep-bits of inp | None).

    The keep-bits are drawn by this launch, while it holds the tiles of inp, when one rank tile
    covers r and the reduction tile is whole words (then each element is visited once) unless the
    config says ``DRAW_BITS=False``; otherwise by the keep-bits pass first, and read here.

    With the config's ``SPLIT_PER_SM`` (or ``num_splits``, for tests) the reduction is split into
    chunks of whole tiles, one program per (chunk, row tile, rank tile): fp32 partials, summed in
    order by :func:`_sum_splits` (deterministic; no atomics)."""
    M, RED = inp.shape
    dt = inp.dtype
    plan = _shrink_plan(M, RED, R, dt, out_dtype, inp.device, seed is not None, p, _matmul_precision(dt),
                        _layout(inp), ((RED, R), tuple(w_strides)), num_splits)
    return plan.run(inp, w, seed)


@_plan
def _shrink_plan(M, RED, R, dtype, out_dtype, device, dropout, p, precision, inp_layout, w_layout, num_splits):
    """The :class:`_ShrinkPlan` of a call; ``w_layout`` is w_view's ([RED, R] and its strides)."""
    cfg = (shrink_masked_config if dropout else shrink_config)(M, RED, R, dtype, cuda_arch(device))
    gen_bits = dropout and cfg.DRAW_BITS and R <= cfg.BLOCK_R and cfg.BLOCK_RED % 32 == 0
    tiles = _cdiv(M, cfg.BLOCK_M) * _cdiv(R, cfg.BLOCK_R)
    steps = _cdiv(RED, cfg.BLOCK_RED)
    if num_splits is None:
        num_splits = split_count(steps, tiles, cfg.SPLIT_PER_SM, num_sms(device), _SHRINK_MIN_STEPS)
    red_chunk = max(_cdiv(steps, max(num_splits, 1)), 1) * cfg.BLOCK_RED
    num_splits = max(_cdiv(RED, red_chunk), 1)
    out_shape, out_strides = _contiguous(M, R) if num_splits == 1 else _contiguous(num_splits, M, R)
    bits_shape = (M, keep_bits_words(RED)) if dropout else None
    n_words, stride_bm = (bits_shape[1], _contiguous(*bits_shape)[1][0]) if dropout else (0, 0)
    constexprs = dict(HAS_DROPOUT=dropout, GEN_BITS=gen_bits, RANK_MAJOR=dropout, EVEN_RED=RED % cfg.BLOCK_RED == 0,
                      OFFSET_DTYPE=_layouts_offset_dtype(inp_layout, w_layout, (out_shape, out_strides)),
                      **_meta(dtype, precision), BLOCK_M=cfg.BLOCK_M, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R)
    ints = (M, RED, R, n_words, red_chunk,
            *inp_layout[1], *w_layout[1], out_strides[0] if num_splits > 1 else 0, out_strides[-2], out_strides[-1],
            stride_bm, drop_threshold(p) if gen_bits else 0, 1.0 / (1.0 - p))
    return _ShrinkPlan(BoundLaunch(_shrink_kernel, (tiles * num_splits,), ints, constexprs, cfg.launch_kwargs()),
                       M, RED, R, p, device, out_shape, out_dtype if num_splits == 1 else torch.float32, bits_shape,
                       gen_bits, _sum_plan(num_splits, M * R, M * R, out_dtype, device) if num_splits > 1 else None)


@dataclasses.dataclass
class _DualGemmPlan:
    """F2 / B2 for one signature: see :func:`_dual_gemm`. ``launch`` None: an empty output."""
    launch: Optional[BoundLaunch]
    out_shape: tuple
    out_dtype: torch.dtype
    device: torch.device

    def run(self, t, bt, inp, w, bias, keep_bits, adapter_scale: float) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        if self.launch is not None:
            self.launch((t, bt, inp, w, bias, keep_bits, out), (adapter_scale,))
        return out


def _dual_gemm(t, bt, bt_strides, inp, w, w_strides, F: int, adapter_scale: float, out_dtype,
               *, bias=None, keep_bits=None):
    """out[M, F] = adapter_scale * keep?(t @ bt_view) + inp @ w_view (+ bias); ``bt_strides`` and
    ``w_strides`` are the views' ([R, F] and [RED, F])."""
    M, R = t.shape
    RED = inp.shape[1]
    dt = inp.dtype
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with unit stride
    plan = _dual_gemm_plan(M, F, RED, R, dt, out_dtype, inp.device, bias is not None, _bits_strides(keep_bits),
                           _matmul_precision(dt), _layout(t), ((R, F), tuple(bt_strides)), _layout(inp),
                           ((RED, F), tuple(w_strides)))
    return plan.run(t, bt, inp, w, bias, keep_bits, adapter_scale)


@_plan
def _dual_gemm_plan(M, F, RED, R, dtype, out_dtype, device, has_bias, bits_strides, precision, t_layout, bt_layout,
                    inp_layout, w_layout):
    """The :class:`_DualGemmPlan` of a call; ``bits_strides``: the keep-bits' (words per row, row
    stride), (0, 0) without dropout."""
    if M * F == 0:
        return _DualGemmPlan(None, (M, F), out_dtype, device)
    cfg = dual_gemm_config(M, F, RED, R, dtype, cuda_arch(device))
    out_layout = _contiguous(M, F)
    constexprs = dict(HAS_BIAS=has_bias, HAS_DROPOUT=bits_strides != (0, 0),
                      EVEN_RED=RED % cfg.BLOCK_RED == 0, EVEN_R=R % cfg.BLOCK_R == 0,
                      OFFSET_DTYPE=_layouts_offset_dtype(t_layout, bt_layout, inp_layout, w_layout, out_layout),
                      **_meta(dtype, precision),
                      BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
                      GROUP_M=cfg.GROUP_M)
    ints = (M, F, RED, R, bits_strides[0], *t_layout[1], *bt_layout[1], *inp_layout[1], *w_layout[1],
            bits_strides[1], *out_layout[1])
    grid = (_cdiv(M, cfg.BLOCK_M) * _cdiv(F, cfg.BLOCK_F),)
    return _DualGemmPlan(BoundLaunch(_dual_gemm_kernel, grid, ints, constexprs, cfg.launch_kwargs()),
                         (M, F), out_dtype, device)


def _as_keep_bits(mask_state, M: int, K: int, p: float):
    """The keep-bits of x [M, K] from a mask state: the bits themselves, or a 0-dim seed to pack them
    from (callers that start from a seed, like the split-M test); None without dropout."""
    if p == 0.0:
        return None
    if mask_state.dim() == 0:
        return keep_bits_triton(mask_state, M, K, p)
    if mask_state.dtype != torch.int32 or tuple(mask_state.shape) != (M, keep_bits_words(K)):
        raise ValueError(f"mask_state must be the forward's keep-bits, int32 [{M}, {keep_bits_words(K)}], "
                         f"got {mask_state.dtype} {tuple(mask_state.shape)}")
    return mask_state


@dataclasses.dataclass
class _MReducePlan:
    """One M-reduction for one signature: see :func:`_m_reduce`."""
    launch: BoundLaunch
    out_shape: tuple             # (P, Q), or (splits, P, Q) fp32 partials
    out_dtype: torch.dtype       # what the launch writes
    sums_shape: Optional[tuple]  # (splits, P) with column sums, else None
    device: torch.device
    P: int
    Q: int
    out_sum: Optional[_SumPlan]  # the partials' sums, when M is split
    colsum_sum: Optional[_SumPlan]

    def run(self, l, r, keep_bits, scale: float):
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        sums = None if self.sums_shape is None else torch.empty(self.sums_shape, dtype=torch.float32, device=self.device)
        self.launch((l, r, keep_bits, out, sums), (scale,))
        if self.out_sum is not None:
            out = self.out_sum.run(out.view(self.out_shape[0], self.P * self.Q)).view(self.P, self.Q)
        if sums is not None:
            sums = sums[0] if self.colsum_sum is None else self.colsum_sum.run(sums)
        return out, sums


@_plan
def _m_reduce_plan(M, P, Q, dtype, out_dtype, device, block_m, block_p, block_q, rank_axis, launch_kwargs, num_splits,
                   bits_strides, colsum, precision, l_layout, r_layout, split_per_sm):
    """The :class:`_MReducePlan` of a call; ``launch_kwargs`` as (name, value) pairs."""
    tiles = _cdiv(P, block_p) * _cdiv(Q, block_q)
    if num_splits is None:
        num_splits = split_m_for(M, tiles, block_m, num_sms(device), split_per_sm)
    m_chunk = _cdiv(_cdiv(M, num_splits), block_m) * block_m
    num_splits = _cdiv(M, m_chunk)
    out_shape, out_strides = _contiguous(P, Q) if num_splits == 1 else _contiguous(num_splits, P, Q)
    sums_shape, sums_strides = _contiguous(num_splits, P)
    constexprs = dict(HAS_DROPOUT=bits_strides != (0, 0), COLSUM=colsum, COLSUM_MMA=colsum and dtype != torch.float32,
                      EVEN_M=M % block_m == 0, RANK_AXIS=rank_axis,
                      OFFSET_DTYPE=_layouts_offset_dtype(l_layout, r_layout, (out_shape, out_strides)),
                      **_meta(dtype, precision), BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q)
    ints = (M, P, Q, bits_strides[0], m_chunk, *l_layout[1], *r_layout[1], bits_strides[1],
            out_strides[0] if num_splits > 1 else 0, out_strides[-2], out_strides[-1], sums_strides[0] if colsum else 0)
    split = num_splits > 1
    return _MReducePlan(BoundLaunch(_m_reduce_kernel, (tiles * num_splits,), ints, constexprs, dict(launch_kwargs)),
                        out_shape, torch.float32 if split else out_dtype, sums_shape if colsum else None, device, P, Q,
                        _sum_plan(num_splits, P * Q, P * Q, out_dtype, device) if split else None,
                        _sum_plan(num_splits, P, P, torch.float32, device) if split and colsum else None)


@_plan
def _grads_config(M, N, K, R, dtype, device):
    """B3's tile config (both launches take their tiles from it)."""
    cfg = grads_config(M, N, K, R, dtype, cuda_arch(device))
    if cfg.BLOCK_M > 64 and (N % 16 or K % 16):
        # 128 rows a step (a tuner alternative) hold ~255 registers on sm_90; where dy's or x's row
        # stride is not a multiple of 16 elements Triton gives it no divisibility hint and Triton
        # 3.6's ptxas spills (the full static report): 64 rows there
        cfg = dataclasses.replace(cfg, BLOCK_M=64)
    return cfg


@dataclasses.dataclass
class _GradsPlan:
    """B3 for one signature: see :func:`_lora_grads`. A plan is None where its grad is not needed."""
    dA: Optional[_MReducePlan]
    dB: Optional[_MReducePlan]

    def run(self, U, x2d, dy, T, keep_bits, scaling: float, p: float, a_dtype, dB_row_scale=None):
        """(dA | None, dB | None, db | None)."""
        dA = dB = db = None
        if self.dA is not None:
            dA, _ = self.dA.run(U, x2d, keep_bits, scaling / (1.0 - p))
        if self.dB is not None:
            dB, db = self.dB.run(dy, T, None, scaling)
            if dB_row_scale is not None:
                dB = (dB * dB_row_scale[:, None]).to(a_dtype)
        return dA, dB, db


@_plan
def _grads_plan(M, N, K, R, dtype, a_dtype, device, precision, u_layout, x_layout, dy_layout, t_layout, bits_strides,
                need_dA, need_dB, need_db, dB_fp32, num_splits):
    """The :class:`_GradsPlan` of a call (``dB_fp32``: dB is written in fp32, to be row-scaled)."""
    cfg = _grads_config(M, N, K, R, dtype, device)
    kwargs = tuple(cfg.launch_kwargs().items())
    # dA with dropout selects x's kept elements on top of the 128-row step of the tuner's alternative:
    # 229-255 registers on sm_90, and Triton 3.9's ptxas spilled 32-48 B (the full static report): 64
    da_block_m = min(cfg.BLOCK_M, 64) if bits_strides != (0, 0) else cfg.BLOCK_M
    dA = (_m_reduce_plan(M, R, K, dtype, a_dtype, device, da_block_m, cfg.BLOCK_R, cfg.BLOCK_F, 0, kwargs, num_splits,
                         bits_strides, False, precision, u_layout, x_layout, cfg.SPLIT_PER_SM) if need_dA else None)
    dB = (_m_reduce_plan(M, N, R, dtype, torch.float32 if dB_fp32 else a_dtype, device, cfg.BLOCK_M, cfg.BLOCK_F,
                         cfg.BLOCK_R, 1, kwargs, num_splits, (0, 0), need_db, precision, dy_layout, t_layout,
                         cfg.SPLIT_PER_SM) if need_dB else None)
    return _GradsPlan(dA, dB)


def _lora_grads(U, x2d, dy, T, scaling: float, p: float, mask_state, a_dtype, need_dA: bool, need_dB: bool,
                num_splits: Optional[int] = None, need_db: bool = False, dB_row_scale: Optional[torch.Tensor] = None):
    """B3: dA = s/(1-p) U^T drop(x) [r, K] and dB = s dy^T T [N, r], one launch each (an M-reduction:
    ``_m_reduce_kernel``, split over M when its tiles alone would not fill the GPU, fp32 partials
    summed in a fixed order); with ``need_db`` (and dB) also db = sum_M dy, summed while dB reads dy.
    ``mask_state``: the forward's keep-bits, or a 0-dim seed (see :func:`_as_keep_bits`).
    ``dB_row_scale`` [N] fp32 (DoRA's g): dB's rows are scaled by it in fp32 before the one rounding
    to the adapter's dtype. Returns (dA | None, dB | None), and db | None third with ``need_db``."""
    M, K = x2d.shape
    N, R = dy.shape[1], T.shape[1]
    keep_bits = _as_keep_bits(mask_state, M, K, p) if need_dA else None
    dt = x2d.dtype
    plan = _grads_plan(M, N, K, R, dt, a_dtype, x2d.device, _matmul_precision(dt),
                       _layout(U) if need_dA else None, _layout(x2d), _layout(dy), _layout(T), _bits_strides(keep_bits),
                       need_dA, need_dB, need_db, dB_row_scale is not None, num_splits)
    dA, dB, db = plan.run(U, x2d, dy, T, keep_bits, scaling, p, a_dtype, dB_row_scale)
    return (dA, dB, db) if need_db else (dA, dB)


# ----------------------------------------------------------------------------------------------
# Plan "rank_mm": T, U, dA, dB as cuBLAS GEMMs into preallocated outputs (tuning.tuned_plan)
# ----------------------------------------------------------------------------------------------
def _drop_by_bits(x2d, keep_bits, p: float):
    """drop(x) = x * keep / (1-p) in x's dtype, the mask read from the keep-bits (one pass over x)."""
    M, K = x2d.shape
    out = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    BLOCK_M, BLOCK_K = (64, 64) if interpreting() else (16, 256)  # 8 KiB of bf16 x a program on a GPU
    n_words, stride_bm = _bits_strides(keep_bits)
    launch(_drop_by_bits_kernel, (_cdiv(M, BLOCK_M) * _cdiv(K, BLOCK_K),),
           (x2d, keep_bits, out, M, K, n_words,
            x2d.stride(0), x2d.stride(1), stride_bm, out.stride(0), out.stride(1), 1.0 / (1.0 - p)),
           dict(OFFSET_DTYPE=_offset_dtype(x2d, out), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K), {"num_warps": 4})
    return out


def _scaled_mm(a, b, scale: float, out_dtype):
    """scale * a @ b by cuBLAS in a's dtype (scale applied in its epilogue, fp32), into a
    preallocated output; cast once to ``out_dtype`` if that differs."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    if scale == 1.0:
        torch.mm(a, b, out=out)
    else:  # beta = 0: out's contents are ignored (never propagated, NaN included)
        torch.addmm(out, a, b, beta=0.0, alpha=scale, out=out)
    return out if out_dtype == a.dtype else out.to(out_dtype)


def _shrink_mm(x2d, lora_A, seed, p: float):
    """F1 of plan "rank_mm": with dropout the keep-bits pass draws the mask and drop(x) is formed
    once in x's dtype; then T = drop(x) A^T by cuBLAS. Returns (T, keep-bits | None)."""
    M, K = x2d.shape
    keep_bits = keep_bits_triton(seed, M, K, p) if p > 0.0 else None
    dropped = _drop_by_bits(x2d, keep_bits, p) if keep_bits is not None else x2d
    return _scaled_mm(dropped, lora_A.to(x2d.dtype).t(), 1.0, x2d.dtype), keep_bits


def _lora_grads_mm(U, x2d, dy, T, scaling: float, p: float, keep_bits, a_dtype, need_dA: bool, need_dB: bool):
    """B3 of plan "rank_mm" (adapters in x's dtype): dA = s U^T drop(x) (drop(x) formed again from
    the forward's bits, in x's dtype) and dB = s dy^T T by cuBLAS. Returns (dA | None, dB | None)."""
    dA = dB = None
    if need_dA:
        dropped = _drop_by_bits(x2d, keep_bits, p) if keep_bits is not None else x2d
        dA = _scaled_mm(U.t(), dropped, scaling, a_dtype)
    if need_dB:
        dB = _scaled_mm(dy.t(), T, scaling, a_dtype)
    return dA, dB


def _no_keep_bits(device: torch.device) -> torch.Tensor:
    """The mask state without dropout: an empty int32 tensor, one per device (never written)."""
    return shared_tensor(device, "no keep-bits", lambda: torch.empty((0,), dtype=torch.int32, device=device))


@dataclasses.dataclass
class _ForwardPlan:
    """:func:`lora_forward` for one signature: F1 (``shrink``; None under plan "rank_mm") and F2."""
    shrink: Optional[_ShrinkPlan]
    dual: _DualGemmPlan
    copy_bias: bool  # the bias is not contiguous (F2 reads it with unit stride)

    def run(self, x2d, weight, lora_A, lora_B, bias, scaling: float, p: float, seed):
        if self.shrink is None:
            T, keep_bits = _shrink_mm(x2d, lora_A, seed, p)
        else:
            T, keep_bits = self.shrink.run(x2d, lora_A, seed if p > 0.0 else None)
        if self.copy_bias:
            bias = bias.contiguous()
        y = self.dual.run(T, lora_B, x2d, weight, bias, None, scaling)
        return y, T, keep_bits if keep_bits is not None else _no_keep_bits(x2d.device)


@_op_plan
def _forward_plan(M, K, N, R, dtype, device, x_strides, w_strides, a_strides, b_strides, bias_strides, p, precision):
    """The :class:`_ForwardPlan` of a call (``bias_strides`` None: no bias)."""
    t_layout = _contiguous(M, R)  # T as F1 (or cuBLAS) writes it
    shrink = None
    if tuned_plan(device, dtype, M, N, K, R) != "rank_mm":  # F1: w_view[k, r] = A[r, k]
        shrink = _shrink_plan(M, K, R, dtype, dtype, device, p > 0.0, p, precision, ((M, K), x_strides),
                              ((K, R), a_strides[::-1]), None)
    # F2: bt_view[r, n] = B[n, r]; w_view[k, n] = W[n, k]
    dual = _dual_gemm_plan(M, N, K, R, dtype, dtype, device, bias_strides is not None, (0, 0), precision, t_layout,
                           ((R, N), b_strides[::-1]), ((M, K), x_strides), ((K, N), w_strides[::-1]))
    return _ForwardPlan(shrink, dual, bias_strides is not None and bias_strides != (1,))


def lora_forward(x2d, weight, lora_A, lora_B, bias, scaling: float, p: float, seed):
    """F1 + F2 (with dropout F1 draws the keep-bits, or a keep-bits pass before it does; see
    :func:`_shrink`). x2d [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None,
    seed: 0-dim int64 tensor on x's device.

    Returns (y [M, N], T [M, r]) in x's dtype and the mask state for :func:`lora_backward`: the
    keep-bits int32 [M, ceil(K/32)] (M*K/8 bytes; the mask was drawn once, here) with
    dropout, an empty int32 tensor without."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        mask_state = keep_bits_triton(seed, 0, K, p) if p > 0.0 else x2d.new_empty((0,), dtype=torch.int32)
        return x2d.new_empty((0, N)), x2d.new_empty((0, R)), mask_state
    dt = x2d.dtype
    plan = _forward_plan(M, K, N, R, dt, x2d.device, x2d.stride(), weight.stride(), lora_A.stride(), lora_B.stride(),
                         None if bias is None else bias.stride(), p, _matmul_precision(dt))
    return plan.run(x2d, weight, lora_A, lora_B, bias, scaling, p, seed)


@dataclasses.dataclass
class _BackwardPlan:
    """:func:`lora_backward` for one signature: B1 (``shrink``; None under plan "rank_mm" or when
    U is not needed), B2 (``dual``; None without dx), B3 (``grads``; None under "rank_mm" with
    adapters in x's dtype, or when neither dA nor dB is needed)."""
    rank_mm: bool
    shrink: Optional[_ShrinkPlan]
    dual: Optional[_DualGemmPlan]
    grads: Optional[_GradsPlan]
    need_U: bool
    need_dA: bool
    need_dB: bool
    need_db: bool

    def run(self, dy, x2d, weight, lora_A, lora_B, T, scaling: float, p: float, keep_bits):
        U = None
        if self.need_U:  # B1: w_view[n, r] = B[n, r]
            U = (self.shrink.run(dy, lora_B, None)[0] if self.shrink is not None
                 else _scaled_mm(dy, lora_B.to(x2d.dtype), 1.0, x2d.dtype))
        # B2: bt_view[r, k] = A[r, k]; w_view[n, k] = W[n, k]
        dx = self.dual.run(U, lora_A, dy, weight, None, keep_bits, scaling / (1.0 - p)) if self.dual is not None else None
        dA = dB = db = None
        if self.grads is not None:  # B3; db is summed by dB's launch, which reads dy anyway
            dA, dB, db = self.grads.run(U, x2d, dy, T, keep_bits, scaling, p, lora_A.dtype)
        elif self.rank_mm and (self.need_dA or self.need_dB):
            dA, dB = _lora_grads_mm(U, x2d, dy, T, scaling, p, keep_bits, lora_A.dtype, self.need_dA, self.need_dB)
        if self.need_db and db is None:
            db = dy.sum(0, dtype=torch.float32)
        return dx, dA, dB, db


@_op_plan
def _backward_plan(M, K, N, R, dtype, a_dtype, device, dy_strides, x_strides, w_strides, a_strides, b_strides,
                   t_strides, bits_strides, precision, need_dx, need_dA, need_dB, need_db):
    """The :class:`_BackwardPlan` of a call (``bits_strides`` (0, 0): no dropout)."""
    rank_mm = tuned_plan(device, dtype, M, N, K, R) == "rank_mm"
    need_U = need_dx or need_dA
    u_layout = _contiguous(M, R)  # U as B1 (or cuBLAS) writes it
    shrink = (_shrink_plan(M, N, R, dtype, dtype, device, False, 0.0, precision, ((M, N), dy_strides),
                           ((N, R), b_strides), None) if need_U and not rank_mm else None)
    dual = (_dual_gemm_plan(M, K, N, R, dtype, dtype, device, False, bits_strides, precision, u_layout,
                            ((R, K), a_strides), ((M, N), dy_strides), ((N, K), w_strides)) if need_dx else None)
    # adapters in another dtype than x (PEFT's fp32 adapters): B3's fp32 accumulators write dA and
    # dB in theirs, where a cuBLAS GEMM in x's dtype would round them to x's first
    grads = None
    if (need_dA or need_dB) and not (rank_mm and a_dtype == dtype):
        grads = _grads_plan(M, N, K, R, dtype, a_dtype, device, precision, u_layout if need_dA else None,
                            ((M, K), x_strides), ((M, N), dy_strides), ((M, R), t_strides), bits_strides,
                            need_dA, need_dB, need_db, False, None)
    return _BackwardPlan(rank_mm, shrink, dual, grads, need_U, need_dA, need_dB, need_db)


def lora_backward(dy, x2d, weight, lora_A, lora_B, T, scaling: float, p: float, mask_state,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool):
    """B1 + B2 + B3. dy [M, N], mask_state: the forward's (the dropout mask is read, never regenerated).
    Returns (dx [M, K] | None, dA | None, dB | None, db [N] fp32 | None)."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        dev = x2d.device
        zeros = lambda *s, dt=lora_A.dtype: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        return (x2d.new_empty((0, K)) if need_dx else None, zeros(R, K) if need_dA else None,
                zeros(N, R) if need_dB else None, zeros(N, dt=torch.float32) if need_db else None)
    keep_bits = _as_keep_bits(mask_state, M, K, p)
    dt = x2d.dtype
    plan = _backward_plan(M, K, N, R, dt, lora_A.dtype, x2d.device, dy.stride(), x2d.stride(), weight.stride(),
                          lora_A.stride(), lora_B.stride(), T.stride(), _bits_strides(keep_bits), _matmul_precision(dt),
                          need_dx, need_dA, need_dB, need_db)
    return plan.run(dy, x2d, weight, lora_A, lora_B, T, scaling, p, keep_bits)
