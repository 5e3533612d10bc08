"""Triton kernels of DoRA with dropout (:mod:`rslora_kernels.ops.dora`) and their launchers.

    forward   F1  T  = drop(x) A^T, keep-bits of x          _shrink_kernel (triton_kernels)
              DF2 z  = s T B^T + drop(x) W^T,               _dora_fwd_kernel: two fp32 accumulators
                  y  = s T B^T + x W^T + (g-1) z + b        over the same W tiles
    backward  B1  U  = (g dy) B                             _shrink_kernel, B's rows scaled by g
              DB2 dx = dy W + mask/(1-p) *                  _dora_dx_kernel (likewise)
                       (s U A + dy diag(g-1) W)
              B3  dA, dB (rows scaled by g), db             _m_reduce_kernel (triton_kernels)

``g = m / ||W + s B A||`` per output row. F1, B1 and B3, the GEMM helpers (``_grouped_tile``,
``_rank_term``) and the launch-plan helpers are those of :mod:`rslora_kernels.ops.triton_kernels`;
this module holds what only DoRA runs. Tiles: ``dora_gemm_config`` (docs/kernels.md). Without
dropout DoRA needs no kernel of its own (docs/dora.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._runtime import cuda_arch
from ..dropout.kernels import keep_bits_triton, keep_factor, keep_from_bits
from .configs import dora_gemm_config
from .triton_kernels import (_as_keep_bits, _bits_strides, _cdiv, _contiguous, _grouped_tile, _layout,
                             _layouts_offset_dtype, _lora_grads, _matmul_precision, _meta, _plan, _rank_term, _shrink,
                             lora_backward)

__all__ = ["dora_forward_dropout", "dora_backward_dropout"]


# ----------------------------------------------------------------------------------------------
# DoRA with dropout: two fp32 accumulators over the same W tiles (rslora_kernels.ops.dora)
#   DF2: y = x W^T + b + (g-1) * z,  z = drop(x) W^T + s T B^T       _dora_fwd_kernel
#   DB2: dx = dy W + mask/(1-p) * (s U A + dy diag(g-1) W)           _dora_dx_kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dora_fwd_kernel(
    # pointers: T [M, R], B [N, R], x [M, K], W [N, K], bias [N] (None without), g [N] fp32,
    # keep_bits [M, n_words]; outputs y and z [M, N]
    t_ptr, b_ptr, x_ptr, w_ptr, bias_ptr, g_ptr, keep_bits_ptr, y_ptr, z_ptr,
    # sizes
    M, N, K, R, n_words,
    # strides
    stride_tm, stride_tr, stride_bn, stride_br, stride_xm, stride_xk, stride_wn, stride_wk, stride_bm,
    stride_ym, stride_yn, stride_zm, stride_zn,
    # s, and the scale of kept elements of x, 1/(1-p)
    adapter_scale, keep_scale,
    # meta. Both accumulators are transposed ([N, M] tiles: W is the MMA's A operand, x and drop(x)
    # its B operand), so that the x tile masked in registers goes through shared memory (a masked A
    # operand is fed from registers and ptxas serializes the wgmma, C7515)
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_R: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_F, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = pid_n * BLOCK_F + tl.arange(0, BLOCK_F)
    rows_in = (rows % M).to(OFFSET_DTYPE)
    feats_in = (feats % N).to(OFFSET_DTYPE)

    # the rank term s B T^T, which y and z share
    zt = _rank_term(tl.zeros((BLOCK_F, BLOCK_M), dtype=tl.float32), b_ptr, stride_bn, stride_br, feats_in,
                    t_ptr, stride_tr, stride_tm, rows_in, R,
                    OFFSET_DTYPE, EVEN_R, DOT_DTYPE, INPUT_PRECISION, BLOCK_R) * adapter_scale
    yt = zt

    # x W^T into y, drop(x) W^T into z: each W tile loaded once for both (the hot loop)
    reds = tl.arange(0, BLOCK_RED)
    w_ptrs = w_ptr + (feats_in[:, None] * stride_wn + reds.to(OFFSET_DTYPE)[None, :] * stride_wk)
    x_ptrs = x_ptr + (rows_in[:, None] * stride_xm + reds.to(OFFSET_DTYPE)[None, :] * stride_xk)
    for k0 in range(0, K, BLOCK_RED):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            w = tl.load(w_ptrs, mask=reds[None, :] < K - k0, other=0.0)
            x = tl.load(x_ptrs, mask=reds[None, :] < K - k0, other=0.0)
        keep = keep_from_bits(keep_bits_ptr, rows.to(tl.int64), rows < M, k0, n_words, stride_bm, BLOCK_M, BLOCK_RED)
        dropped = x.to(tl.float32) * keep_factor(keep, keep_scale)
        yt = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), yt, input_precision=INPUT_PRECISION)
        zt = tl.dot(w.to(DOT_DTYPE), tl.trans(dropped.to(DOT_DTYPE)), zt, input_precision=INPUT_PRECISION)
        w_ptrs += tl.cast(BLOCK_RED * stride_wk, OFFSET_DTYPE)
        x_ptrs += tl.cast(BLOCK_RED * stride_xk, OFFSET_DTYPE)

    # epilogue: y = (x W^T + s T B^T) + (g - 1) z + b
    feat_ok = feats < N
    g = tl.load(g_ptr + feats, mask=feat_ok, other=1.0)
    yt += (g - 1.0)[:, None] * zt
    if HAS_BIAS:
        yt += tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[:, None]
    inside = feat_ok[:, None] & (rows < M)[None, :]
    rows_out = rows.to(OFFSET_DTYPE)[None, :]
    feats_out = feats.to(OFFSET_DTYPE)[:, None]
    tl.store(z_ptr + (rows_out * stride_zm + feats_out * stride_zn), zt.to(z_ptr.dtype.element_ty), mask=inside)
    tl.store(y_ptr + (rows_out * stride_ym + feats_out * stride_yn), yt.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dora_dx_kernel(
    # pointers: U [M, R] (of g * dy), A [R, K], dy [M, N], W [N, K], c [N] fp32 (g - 1),
    # keep_bits [M, n_words]; output dx [M, K]
    u_ptr, a_ptr, dy_ptr, w_ptr, c_ptr, keep_bits_ptr, dx_ptr,
    # sizes
    M, K, N, R, n_words,
    # strides
    stride_um, stride_ur, stride_ar, stride_ak, stride_dym, stride_dyn, stride_wn, stride_wk, stride_bm,
    stride_dxm, stride_dxk,
    # s, and the scale of kept elements, 1/(1-p)
    adapter_scale, keep_scale,
    # meta. The rows of W scaled by c in registers are the MMA's B operand (through shared memory)
    EVEN_N: tl.constexpr, EVEN_R: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_F, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_F + tl.arange(0, BLOCK_F)
    rows_in = (rows % M).to(OFFSET_DTYPE)
    cols_in = (cols % K).to(OFFSET_DTYPE)

    # the masked accumulator starts with the rank term s U A
    masked = _rank_term(tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32), u_ptr, stride_um, stride_ur, rows_in,
                        a_ptr, stride_ar, stride_ak, cols_in, R,
                        OFFSET_DTYPE, EVEN_R, DOT_DTYPE, INPUT_PRECISION, BLOCK_R) * adapter_scale

    # dy W (unmasked) and dy diag(g - 1) W (masked): each dy and W tile loaded once for both
    plain = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    reds = tl.arange(0, BLOCK_RED)
    dy_ptrs = dy_ptr + (rows_in[:, None] * stride_dym + reds.to(OFFSET_DTYPE)[None, :] * stride_dyn)
    w_ptrs = w_ptr + (reds.to(OFFSET_DTYPE)[:, None] * stride_wn + cols_in[None, :] * stride_wk)
    for n0 in range(0, N, BLOCK_RED):
        if EVEN_N:
            dy = tl.load(dy_ptrs)
            w = tl.load(w_ptrs)
            c = tl.load(c_ptr + n0 + reds)
        else:
            dy = tl.load(dy_ptrs, mask=reds[None, :] < N - n0, other=0.0)
            w = tl.load(w_ptrs, mask=reds[:, None] < N - n0, other=0.0)
            c = tl.load(c_ptr + n0 + reds, mask=reds < N - n0, other=0.0)
        plain = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), plain, input_precision=INPUT_PRECISION)
        scaled = (w.to(tl.float32) * c[:, None]).to(DOT_DTYPE)
        masked = tl.dot(dy.to(DOT_DTYPE), scaled, masked, input_precision=INPUT_PRECISION)
        dy_ptrs += tl.cast(BLOCK_RED * stride_dyn, OFFSET_DTYPE)
        w_ptrs += tl.cast(BLOCK_RED * stride_wn, OFFSET_DTYPE)

    keep = keep_from_bits(keep_bits_ptr, rows.to(tl.int64), rows < M, pid_k * BLOCK_F, n_words, stride_bm,
                          BLOCK_M, BLOCK_F)
    dx = plain + masked * keep_factor(keep, keep_scale)
    out_ptrs = dx_ptr + (rows.to(OFFSET_DTYPE)[:, None] * stride_dxm + cols.to(OFFSET_DTYPE)[None, :] * stride_dxk)
    tl.store(out_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < K)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers: F1, DF2; B1, DB2, B3
# ----------------------------------------------------------------------------------------------
def dora_forward_dropout(x2d, weight, lora_A, lora_B, bias, g, scaling: float, p: float, seed):
    """DoRA's forward with dropout (p > 0): F1 (T = drop(x) A^T, and the keep-bits), then one launch
    for y = x W^T + b + (g-1) z and z = drop(x) W^T + s T B^T. ``g`` [N] fp32 = m / w.
    Returns (y, z, T, keep-bits)."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        empty = x2d.new_empty((0, N))
        return empty, empty.clone(), x2d.new_empty((0, R)), keep_bits_triton(seed, 0, K, p)
    T, keep_bits = _shrink(x2d, (lora_A.stride(1), lora_A.stride(0)), lora_A, R, x2d.dtype, seed=seed, p=p)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    z = torch.empty_like(y)
    if y.numel() == 0:
        return y, z, T, keep_bits
    g = g.to(torch.float32).contiguous()  # g and the bias are read with unit stride
    bias = bias.contiguous() if bias is not None else None
    dt = x2d.dtype
    grid, constexprs, options = _dora_fwd_plan(M, N, K, R, dt, x2d.device, bias is not None, _matmul_precision(dt),
                                               _layout(T), _layout(lora_B), _layout(x2d), _layout(weight))
    n_words, stride_bm = _bits_strides(keep_bits)
    launch(_dora_fwd_kernel, grid,
           (T, lora_B, x2d, weight, bias, g, keep_bits, y, z,
            M, N, K, R, n_words,
            T.stride(0), T.stride(1), lora_B.stride(0), lora_B.stride(1), x2d.stride(0), x2d.stride(1),
            weight.stride(0), weight.stride(1), stride_bm, y.stride(0), y.stride(1), z.stride(0), z.stride(1),
            scaling, 1.0 / (1.0 - p)),
           constexprs, options)
    return y, z, T, keep_bits


@_plan
def _dora_fwd_plan(M, N, K, R, dtype, device, has_bias, precision, t_layout, b_layout, x_layout, w_layout):
    """(grid, constexprs, launch options) of DoRA's forward launch with dropout (y and z, both [M, N])."""
    cfg = dora_gemm_config(M, N, K, R, dtype, cuda_arch(device))
    constexprs = dict(HAS_BIAS=has_bias, EVEN_K=K % cfg.BLOCK_RED == 0, EVEN_R=R % cfg.BLOCK_R == 0,
                      OFFSET_DTYPE=_layouts_offset_dtype(t_layout, b_layout, x_layout, w_layout, _contiguous(M, N)),
                      **_meta(dtype, precision),
                      BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
                      GROUP_M=cfg.GROUP_M)
    return (_cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_F),), constexprs, cfg.launch_kwargs()


@_plan
def _dora_dx_plan(M, K, N, R, dtype, device, precision, u_layout, a_layout, dy_layout, w_layout):
    """(grid, constexprs, launch options) of DoRA's dx launch with dropout (dx [M, K])."""
    cfg = dora_gemm_config(M, K, N, R, dtype, cuda_arch(device))
    constexprs = dict(EVEN_N=N % cfg.BLOCK_RED == 0, EVEN_R=R % cfg.BLOCK_R == 0,
                      OFFSET_DTYPE=_layouts_offset_dtype(u_layout, a_layout, dy_layout, w_layout, _contiguous(M, K)),
                      **_meta(dtype, precision),
                      BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
                      GROUP_M=cfg.GROUP_M)
    return (_cdiv(M, cfg.BLOCK_M) * _cdiv(K, cfg.BLOCK_F),), constexprs, cfg.launch_kwargs()


def dora_backward_dropout(dy, x2d, weight, lora_A, lora_B, T, g, scaling: float, p: float, keep_bits,
                          need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool):
    """DoRA's backward with dropout, without forming g * dy: B1 on dy with B's rows scaled by g
    (U = (g dy) B), DB2 for dx = dy W + mask/(1-p) * (s U A + dy diag(g-1) W), B3 with dB's rows
    scaled by g (and db = sum_M dy). Returns (dx, dA, dB, db), None where not needed."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        return lora_backward(dy, x2d, weight, lora_A, lora_B, T, scaling, p, keep_bits,
                             need_dx, need_dA, need_dB, need_db)
    keep_bits = _as_keep_bits(keep_bits, M, K, p)
    U = None
    if need_dx or need_dA:
        B_g = lora_B.to(torch.float32) * g[:, None]  # [N, r]: F1's operand, rounded to x's dtype there
        U = _shrink(dy, (B_g.stride(0), B_g.stride(1)), B_g, R, x2d.dtype)[0]
    dx = None
    if need_dx:
        dx = torch.empty((M, K), dtype=x2d.dtype, device=x2d.device)
        if dx.numel() > 0:
            c = (g.to(torch.float32) - 1.0).contiguous()  # read with unit stride
            dt = x2d.dtype
            grid, constexprs, options = _dora_dx_plan(M, K, N, R, dt, x2d.device, _matmul_precision(dt),
                                                      _layout(U), _layout(lora_A), _layout(dy), _layout(weight))
            n_words, stride_bm = _bits_strides(keep_bits)
            launch(_dora_dx_kernel, grid,
                   (U, lora_A, dy, weight, c, keep_bits, dx,
                    M, K, N, R, n_words,
                    U.stride(0), U.stride(1), lora_A.stride(0), lora_A.stride(1), dy.stride(0), dy.stride(1),
                    weight.stride(0), weight.stride(1), stride_bm, dx.stride(0), dx.stride(1),
                    scaling, 1.0 / (1.0 - p)),
                   constexprs, options)
    dA = dB = db = None
    if need_dA or need_dB:
        grads = _lora_grads(U, x2d, dy, T, scaling, p, keep_bits, lora_A.dtype, need_dA, need_dB,
                            need_db=need_db, dB_row_scale=g)
        dA, dB = grads[:2]
        db = grads[2] if need_db else None
    if need_db and db is None:
        db = dy.sum(0, dtype=torch.float32)
    return dx, dA, dB, db
