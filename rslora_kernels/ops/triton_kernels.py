"""Triton kernels of the fused LoRA linear op and their launchers.

Reading order: the three kernels, then the host launchers. The dropout stream's Triton functions
(Philox4x32-10, the keep-mask of a tile) live in :mod:`rslora_kernels.dropout.kernels`.

    forward   F1  T  = drop(x) A^T                          _shrink_kernel
              F2  y  = x W^T + s T B^T + b                  _dual_gemm_kernel
    backward  B1  U  = dy B,  db = sum_M dy                 _shrink_kernel (column sums on)
              B2  dx = dy W + s/(1-p) * mask * (U A)        _dual_gemm_kernel (mask on)
              B3  dA = s/(1-p) U^T (x*mask),  dB = s dy^T T _lora_grads_kernel (one grouped launch)

Every kernel takes full strides (only the pointer arithmetic cares), masks ragged edges (no size
needs to be a multiple of a tile), loops over the rank in tiles (any r), accumulates in fp32 and
uses 64-bit row offsets. This module imports Triton; the package imports it lazily so that
``TRITON_INTERPRET`` is read when the kernels are first used, never at package import.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._runtime import cuda_arch, interpreting, num_sms
from ..dropout.kernels import keep_mask_tile, load_seed
from ..dropout.stream import drop_threshold
from .configs import dual_gemm_config, grads_config, shrink_config, split_m_for


# ----------------------------------------------------------------------------------------------
# F1 / B1: out[M, R] = in[M, RED] @ w[RED, R]  (dropout on `in` for F1, column sums for B1)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    # pointers: in [M, RED] is x (F1) or dy (B1); w [RED, R] is A^T (F1) or B (B1); out is T or U
    in_ptr, w_ptr, out_ptr, colsum_ptr, seed_ptr,
    # sizes
    M, RED, R,
    # strides
    stride_im, stride_ired, stride_wred, stride_wr, stride_om, stride_or, stride_cs,
    # dropout: keep iff draw >= threshold; kept inputs scaled by out_scale = 1/(1-p) in fp32
    drop_threshold, out_scale,
    # meta
    HAS_DROPOUT: tl.constexpr, COLSUM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < M
    rank_ok = ranks < R
    if HAS_DROPOUT:
        seed_lo, seed_hi = load_seed(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for red0 in range(0, RED, BLOCK_RED):
        cols = red0 + tl.arange(0, BLOCK_RED).to(tl.int64)
        col_ok = cols < RED
        a = tl.load(in_ptr + rows[:, None] * stride_im + cols[None, :] * stride_ired,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        if COLSUM:
            if pid_r == 0:  # one program row per M-tile writes the partial bias grad
                tl.store(colsum_ptr + pid_m * stride_cs + cols, tl.sum(a.to(tl.float32), axis=0), mask=col_ok)
        if HAS_DROPOUT:
            keep = keep_mask_tile(seed_lo, seed_hi, rows, red0, drop_threshold, BLOCK_M, BLOCK_RED)
            a = tl.where(keep, a, 0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + cols[:, None] * stride_wred + ranks[None, :] * stride_wr,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * out_scale
    tl.store(out_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


# ----------------------------------------------------------------------------------------------
# F2 / B2: out[M, F] = adapter_scale * keep?(lo[M, R] @ hi[R, F]) + in[M, RED] @ w[RED, F] + bias
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dual_gemm_kernel(
    # pointers. F2: lo=T, hi=B^T, in=x, w=W^T, bias.  B2: lo=U, hi=A, in=dy, w=W, mask on.
    lo_ptr, hi_ptr, in_ptr, w_ptr, bias_ptr, out_ptr, seed_ptr,
    # sizes
    M, F, RED, R,
    # strides
    stride_lom, stride_lor, stride_hir, stride_hif,
    stride_im, stride_ired, stride_wred, stride_wf, stride_om, stride_of,
    # adapter scale (s, or s/(1-p) in B2) and dropout threshold
    adapter_scale, drop_threshold,
    # meta
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-tiles sweep the F-tiles together so W tiles stay in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_f = tl.cdiv(F, BLOCK_F)
    pids_per_group = GROUP_M * num_pid_f
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % pids_per_group) % group_rows)
    pid_f = (pid % pids_per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    feats = (pid_f * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    row_ok = rows < M
    feat_ok = feats < F

    # adapter term first, so the scale and the dropout mask touch one fp32 tile
    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rank_ok = ranks < R
        lo = tl.load(lo_ptr + rows[:, None] * stride_lom + ranks[None, :] * stride_lor,
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(DOT_DTYPE)
        hi = tl.load(hi_ptr + ranks[:, None] * stride_hir + feats[None, :] * stride_hif,
                     mask=rank_ok[:, None] & feat_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(lo, hi, acc, input_precision=INPUT_PRECISION)
    acc = acc * adapter_scale
    if HAS_DROPOUT:
        seed_lo, seed_hi = load_seed(seed_ptr)
        keep = keep_mask_tile(seed_lo, seed_hi, rows, pid_f * BLOCK_F, drop_threshold, BLOCK_M, BLOCK_F)
        acc = tl.where(keep, acc, 0.0)

    # base term into the same accumulator
    for red0 in range(0, RED, BLOCK_RED):
        reds = red0 + tl.arange(0, BLOCK_RED).to(tl.int64)
        red_ok = reds < RED
        a = tl.load(in_ptr + rows[:, None] * stride_im + reds[None, :] * stride_ired,
                    mask=row_ok[:, None] & red_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + reds[:, None] * stride_wred + feats[None, :] * stride_wf,
                    mask=red_ok[:, None] & feat_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + feats[None, :] * stride_of,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & feat_ok[None, :])


# ----------------------------------------------------------------------------------------------
# B3: dA = scale_a * U^T (x*mask) and dB = scale_b * dy^T T, one grouped launch, no atomics
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mtm_tile(
    acc, l_ptr, stride_lm, stride_lp, r_ptr, stride_rm, stride_rq,
    offs_p, offs_q, q0, P, Q, m_lo, m_hi,
    seed_ptr, drop_threshold,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """acc[P-tile, Q-tile] += sum over m in [m_lo, m_hi) of l[m, p] * keep?(r[m, q])."""
    p_ok = offs_p < P
    q_ok = offs_q < Q
    if HAS_DROPOUT:
        seed_lo, seed_hi = load_seed(seed_ptr)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = ms < m_hi
        lt = tl.load(l_ptr + ms[None, :] * stride_lm + offs_p[:, None] * stride_lp,
                     mask=p_ok[:, None] & m_ok[None, :], other=0.0).to(DOT_DTYPE)
        rt = tl.load(r_ptr + ms[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                     mask=m_ok[:, None] & q_ok[None, :], other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            keep = keep_mask_tile(seed_lo, seed_hi, ms, q0, drop_threshold, BLOCK_M, BLOCK_Q)
            rt = tl.where(keep, rt, 0.0).to(DOT_DTYPE)
        acc = tl.dot(lt, rt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _lora_grads_kernel(
    # pointers: inputs, then outputs dA [SPLIT?, R, K] and dB [SPLIT?, N, R]
    u_ptr, x_ptr, dy_ptr, t_ptr, da_ptr, db_ptr, seed_ptr,
    # sizes; the M reduction is split into num_splits chunks of m_chunk rows
    M, N, K, R, m_chunk, num_splits, n_da_programs,
    # strides
    stride_um, stride_ur, stride_xm, stride_xk, stride_dym, stride_dyn, stride_tm, stride_tr,
    stride_das, stride_dar, stride_dak, stride_dbs, stride_dbn, stride_dbr,
    # scales: scale_a = s/(1-p), scale_b = s
    scale_a, scale_b, drop_threshold,
    # meta
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    # the two branches name their accumulators apart: the compiler merges same-named values
    # across an if/else and rejects tiles of different shapes ([R, F] vs [F, R])
    if pid < n_da_programs:
        # dA tile [BLOCK_R, BLOCK_F] over (rank, K)
        split = pid % num_splits
        tile = pid // num_splits
        tiles_k = tl.cdiv(K, BLOCK_F)
        offs_r = ((tile // tiles_k) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        k0 = (tile % tiles_k) * BLOCK_F
        offs_k = (k0 + tl.arange(0, BLOCK_F)).to(tl.int64)
        m_lo = split * m_chunk
        acc_a = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
        acc_a = _mtm_tile(acc_a, u_ptr, stride_um, stride_ur, x_ptr, stride_xm, stride_xk,
                        offs_r, offs_k, k0, R, K, m_lo, min(m_lo + m_chunk, M),
                        seed_ptr, drop_threshold, HAS_DROPOUT, DOT_DTYPE, INPUT_PRECISION,
                        BLOCK_M, BLOCK_R, BLOCK_F)
        acc_a = acc_a * scale_a
        tl.store(da_ptr + split * stride_das + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
                 acc_a.to(da_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & (offs_k < K)[None, :])
    else:
        # dB tile [BLOCK_F, BLOCK_R] over (N, rank)
        pid_b = pid - n_da_programs
        split = pid_b % num_splits
        tile = pid_b // num_splits
        tiles_r = tl.cdiv(R, BLOCK_R)
        offs_n = ((tile // tiles_r) * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
        r0 = (tile % tiles_r) * BLOCK_R
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        m_lo = split * m_chunk
        acc_b = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
        acc_b = _mtm_tile(acc_b, dy_ptr, stride_dym, stride_dyn, t_ptr, stride_tm, stride_tr,
                        offs_n, offs_r, r0, N, R, m_lo, min(m_lo + m_chunk, M),
                        seed_ptr, drop_threshold, False, DOT_DTYPE, INPUT_PRECISION,
                        BLOCK_M, BLOCK_F, BLOCK_R)
        acc_b = acc_b * scale_b
        tl.store(db_ptr + split * stride_dbs + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                 acc_b.to(db_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_r < R)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot. The interpreter computes 16-bit dots wrongly (bf16) or in 16-bit
    (fp16), so it gets fp32 operands: products of 16-bit values are exact in fp32 either way."""
    return tl.float32 if interpreting() else _TL_DTYPES[dtype]


def _input_precision(dtype: torch.dtype) -> Optional[str]:
    """fp32 follows torch's matmul precision setting (IEEE by default, TF32 when allowed)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _meta(dtype: torch.dtype):
    return {"DOT_DTYPE": _dot_dtype(dtype), "INPUT_PRECISION": _input_precision(dtype)}


def _shrink(inp: torch.Tensor, w_strides, w: torch.Tensor, R: int, out_dtype, *, seed=None, p=0.0, colsum=False):
    """out[M, R] = keep?(inp)[M, RED] @ w_view[RED, R] / (1-p); optional fp32 column-sum partials."""
    M, RED = inp.shape
    cfg = shrink_config(M, RED, R, inp.dtype, cuda_arch(inp.device))
    out = torch.empty((M, R), dtype=out_dtype, device=inp.device)
    grid_m = triton.cdiv(M, cfg.BLOCK_M)
    parts = torch.empty((grid_m, RED) if colsum else (1, 1), dtype=torch.float32, device=inp.device)
    has_dropout = p > 0.0
    _shrink_kernel[(grid_m, triton.cdiv(R, cfg.BLOCK_R))](
        inp, w, out, parts, seed if has_dropout else out,
        M, RED, R,
        inp.stride(0), inp.stride(1), w_strides[0], w_strides[1], out.stride(0), out.stride(1), parts.stride(0),
        drop_threshold(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=has_dropout, COLSUM=colsum, **_meta(inp.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R, **cfg.launch_kwargs(),
    )
    return out, (parts if colsum else None)


def _dual_gemm(lo, hi, hi_strides, inp, w, w_strides, F: int, adapter_scale: float, out_dtype,
               *, bias=None, seed=None, p=0.0):
    """out[M, F] = adapter_scale * keep?(lo @ hi_view) + inp @ w_view (+ bias)."""
    M, R = lo.shape
    RED = inp.shape[1]
    out = torch.empty((M, F), dtype=out_dtype, device=inp.device)
    if out.numel() == 0:
        return out
    cfg = dual_gemm_config(M, F, RED, R, inp.dtype, cuda_arch(inp.device))
    has_dropout = p > 0.0
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(F, cfg.BLOCK_F),)
    _dual_gemm_kernel[grid](
        lo, hi, inp, w, bias if bias is not None else out, out, seed if has_dropout else out,
        M, F, RED, R,
        lo.stride(0), lo.stride(1), hi_strides[0], hi_strides[1],
        inp.stride(0), inp.stride(1), w_strides[0], w_strides[1], out.stride(0), out.stride(1),
        adapter_scale, drop_threshold(p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, **_meta(inp.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_RED=cfg.BLOCK_RED, BLOCK_R=cfg.BLOCK_R,
        GROUP_M=cfg.GROUP_M, **cfg.launch_kwargs(),
    )
    return out


def _lora_grads(U, x2d, dy, T, scaling: float, p: float, seed, a_dtype, need_dA: bool, need_dB: bool,
                num_splits: Optional[int] = None):
    """dA [r, K] and dB [N, r] in one launch; split-M partials are summed in a fixed order."""
    M, K = x2d.shape
    N = dy.shape[1]
    R = T.shape[1]
    dev = x2d.device
    cfg = grads_config(M, N, K, R, x2d.dtype, cuda_arch(dev))
    da_tiles = triton.cdiv(R, cfg.BLOCK_R) * triton.cdiv(K, cfg.BLOCK_F) if need_dA else 0
    db_tiles = triton.cdiv(N, cfg.BLOCK_F) * triton.cdiv(R, cfg.BLOCK_R) if need_dB else 0
    if num_splits is None:
        num_splits = split_m_for(M, da_tiles + db_tiles, cfg.BLOCK_M, num_sms(dev))
    m_chunk = triton.cdiv(triton.cdiv(M, num_splits), cfg.BLOCK_M) * cfg.BLOCK_M
    num_splits = triton.cdiv(M, m_chunk)

    def out(shape):
        if num_splits == 1:
            return torch.empty(shape, dtype=a_dtype, device=dev)
        return torch.empty((num_splits,) + shape, dtype=torch.float32, device=dev)

    dA = out((R, K)) if need_dA else None
    dB = out((N, R)) if need_dB else None

    def strides3(t):  # (split, row, col) strides; a split stride of 0 when writing the result directly
        return (0, 0, 0) if t is None else ((0,) + t.stride() if t.dim() == 2 else t.stride())

    has_dropout = p > 0.0
    grid = ((da_tiles + db_tiles) * num_splits,)
    _lora_grads_kernel[grid](
        U if need_dA else T, x2d, dy, T, dA if need_dA else T, dB if need_dB else T, seed if has_dropout else T,
        M, N, K, R, m_chunk, num_splits, da_tiles * num_splits,
        *(U.stride() if need_dA else (0, 0)), x2d.stride(0), x2d.stride(1), dy.stride(0), dy.stride(1),
        T.stride(0), T.stride(1), *strides3(dA), *strides3(dB),
        scaling / (1.0 - p), scaling, drop_threshold(p),
        HAS_DROPOUT=has_dropout, **_meta(x2d.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_F=cfg.BLOCK_F, BLOCK_R=cfg.BLOCK_R, **cfg.launch_kwargs(),
    )
    if num_splits > 1:
        dA = dA.sum(0).to(a_dtype) if need_dA else None
        dB = dB.sum(0).to(a_dtype) if need_dB else None
    return dA, dB


def lora_forward(x2d, weight, lora_A, lora_B, bias, scaling: float, p: float, seed):
    """F1 + F2. x2d [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None,
    seed: 0-dim int64 tensor on x's device. Returns (y [M, N], T [M, r]) in x's dtype."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        return x2d.new_empty((0, N)), x2d.new_empty((0, R))
    # F1: w_view[k, r] = A[r, k]
    T, _ = _shrink(x2d, (lora_A.stride(1), lora_A.stride(0)), lora_A, R, x2d.dtype, seed=seed, p=p)
    # F2: hi_view[r, n] = B[n, r]; w_view[k, n] = W[n, k]
    y = _dual_gemm(T, lora_B, (lora_B.stride(1), lora_B.stride(0)), x2d, weight, (weight.stride(1), weight.stride(0)),
                   N, scaling, x2d.dtype, bias=bias)
    return y, T


def lora_backward(dy, x2d, weight, lora_A, lora_B, T, scaling: float, p: float, seed,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool):
    """B1 + B2 + B3. dy [M, N]; returns (dx [M, K] | None, dA | None, dB | None, db [N] fp32 | None)."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dev = x2d.device
    if M == 0:
        zeros = lambda *s, dt=lora_A.dtype: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        return (x2d.new_empty((0, K)) if need_dx else None, zeros(R, K) if need_dA else None,
                zeros(N, R) if need_dB else None, zeros(N, dt=torch.float32) if need_db else None)
    U = db = None
    if need_dx or need_dA:
        # B1: w_view[n, r] = B[n, r]
        U, parts = _shrink(dy, (lora_B.stride(0), lora_B.stride(1)), lora_B, R, x2d.dtype, colsum=need_db)
        db = parts.sum(0) if need_db else None
    elif need_db:
        db = dy.sum(0, dtype=torch.float32)
    dx = None
    if need_dx:
        # B2: hi_view[r, k] = A[r, k]; w_view[n, k] = W[n, k]
        dx = _dual_gemm(U, lora_A, (lora_A.stride(0), lora_A.stride(1)), dy, weight, (weight.stride(0), weight.stride(1)),
                        K, scaling / (1.0 - p), x2d.dtype, seed=seed, p=p)
    dA = dB = None
    if need_dA or need_dB:
        dA, dB = _lora_grads(U, x2d, dy, T, scaling, p, seed, lora_A.dtype, need_dA, need_dB)
    return dx, dA, dB, db
