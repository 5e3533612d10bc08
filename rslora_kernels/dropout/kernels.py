"""Triton implementation of the dropout stream (definition: :mod:`rslora_kernels.dropout.stream`).

``philox_rounds``, ``load_seed`` and ``keep_mask_tile`` generate a tile of the mask and ``store_keep_bits``
packs a tile into the keep-bits, which the LoRA kernels (``rslora_kernels.ops.triton_kernels``) read
tile by tile with ``keep_from_bits``; ``apply_keep`` and ``keep_factor`` apply a tile of the mask as
a multiply, never a select, so that an Inf or NaN at a dropped position gives NaN, as the reference's
``x * mask / (1 - p)`` does. The LoRA forward's F1 generates and stores them itself when it
visits each element of x once; otherwise ``_keep_bits_kernel`` (``keep_bits_triton``) does, first;
``_mask_kernel`` writes a whole bool mask (``keep_mask_triton``) and ``_dropout_scale_kernel`` drops and
scales a tensor, or two under one mask (``dropout_scale_triton``, ``dropout_scale_pair_triton``: the
composite backend's dropout on CUDA).

Keep-bits: an int32 tensor [M, ceil(K/32)], bit j of word w of row m is the keep decision of element
(m, 32*w + j) (bits past column K are 0). M*K/8 bytes, 1/16 of a bf16 x: the fused forward writes it
once (the mask is drawn once per step), and backward reads it instead of regenerating the mask. This
module imports Triton: the package imports it lazily, on first use.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._launch import launch
from .stream import (LANE_BITS, LANES_PER_CALL, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1,
                     drop_threshold)

__all__ = ["philox_rounds", "load_seed", "keep_mask_tile", "keep_from_bits", "store_keep_bits", "apply_keep",
           "keep_factor", "keep_bits_words", "keep_bits_triton", "keep_mask_triton", "dropout_scale_triton",
           "dropout_scale_pair_triton"]

BITS_PER_WORD = 32

# jit functions may only read globals that are constexpr
_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
_LANE_BITS = tl.constexpr(LANE_BITS)
_LANES = tl.constexpr(LANES_PER_CALL)


# ----------------------------------------------------------------------------------------------
# The stream, tile by tile
# ----------------------------------------------------------------------------------------------
@triton.jit
def philox_rounds(c0, c1, c2, c3, k0, k1):
    """The stream's Philox rounds (PHILOX_ROUNDS) on uint32 counters (any shape) with a uint32 key."""
    for i in tl.static_range(_ROUNDS):
        if i > 0:  # bump the key between rounds (Weyl sequence)
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def load_seed(seed_ptr):
    """The int64 seed at ``seed_ptr`` as the two uint32 words of the Philox key (low, high)."""
    seed = tl.load(seed_ptr)
    return (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def keep_mask_tile(seed_lo, seed_hi, rows, col0, threshold,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask [BLOCK_ROWS, BLOCK_COLS] for int64 ``rows`` and columns col0 + arange(BLOCK_COLS).

    ``col0`` and BLOCK_COLS are multiples of 8: one Philox call yields the eight 16-bit lanes of
    columns 8g .. 8g+7, kept iff lane >= ``threshold`` (in [0, 2^16]).
    """
    GROUPS: tl.constexpr = BLOCK_COLS // _LANES
    shape: tl.constexpr = (BLOCK_ROWS, GROUPS)
    grp = (tl.arange(0, GROUPS) + col0 // _LANES).to(tl.uint32)
    c0 = tl.broadcast_to(grp[None, :], shape)
    c1 = tl.broadcast_to((rows & 0xFFFFFFFF).to(tl.uint32)[:, None], shape)
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32)[:, None], shape)
    c3 = tl.zeros(shape, dtype=tl.uint32)
    o0, o1, o2, o3 = philox_rounds(c0, c1, c2, c3, seed_lo, seed_hi)
    # interleave: word w of group g at position 4g + w, then its low and high halves at lanes
    # 8g + 2w and 8g + 2w + 1 (the last join is the fastest-varying axis of the reshape)
    words = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_ROWS, BLOCK_COLS // 2))
    lanes = tl.reshape(tl.join(words & 0xFFFF, words >> _LANE_BITS), (BLOCK_ROWS, BLOCK_COLS))
    return lanes.to(tl.int32) >= threshold  # lanes < 2^16: the cast is exact, the compare 32-bit


@triton.jit
def keep_from_bits(bits_ptr, rows, row_ok, col0, n_words, stride_bm,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask [BLOCK_ROWS, BLOCK_COLS] of ``rows`` and columns col0 + arange(BLOCK_COLS), read from
    the keep-bits (``n_words`` int32 words per row, row stride ``stride_bm``); rows not ``row_ok``
    and columns past the last word read as dropped.

    With BLOCK_COLS a multiple of 32 (then col0 is one too) each row's words are loaded once,
    contiguously, and spread to their 32 columns; otherwise each column loads its own word.
    """
    if BLOCK_COLS % 32 == 0:
        WORDS: tl.constexpr = BLOCK_COLS // 32
        word = col0 // 32 + tl.arange(0, WORDS)
        words = tl.load(bits_ptr + rows[:, None] * stride_bm + word[None, :],
                        mask=row_ok[:, None] & (word < n_words)[None, :], other=0)
        # bit 8g + i of a word: one shift per byte, then a test of bit i against a constant
        byte = words[:, :, None, None] >> (8 * tl.arange(0, 4))[None, None, :, None]
        keep = (byte & (1 << tl.arange(0, 8))[None, None, None, :]) != 0
        return tl.reshape(keep, (BLOCK_ROWS, BLOCK_COLS))
    else:
        cols = col0 + tl.arange(0, BLOCK_COLS)
        words = tl.load(bits_ptr + rows[:, None] * stride_bm + (cols // 32)[None, :],
                        mask=row_ok[:, None] & (cols // 32 < n_words)[None, :], other=0)
        return ((words >> (cols % 32)[None, :]) & 1) != 0


@triton.jit
def store_keep_bits(bits_ptr, keep, rows, row_ok, col0, n_cols, n_words, stride_bm,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Pack the keep-mask tile ``keep`` [BLOCK_ROWS, BLOCK_COLS] of ``rows`` (int64) and columns
    col0 + arange(BLOCK_COLS) into its words of the keep-bits and store them (rows ``row_ok`` only);
    columns from ``n_cols`` on are stored as dropped. BLOCK_COLS and col0 are multiples of 32."""
    WORDS: tl.constexpr = BLOCK_COLS // 32
    keep = keep & ((col0 + tl.arange(0, BLOCK_COLS)) < n_cols)[None, :]
    bit = tl.reshape(keep.to(tl.int32), (BLOCK_ROWS, WORDS, 32)) << tl.arange(0, 32)[None, None, :]
    words = tl.sum(bit, axis=2)  # distinct bits: the sum is their OR (bit 31 wraps to the sign bit)
    word = col0 // 32 + tl.arange(0, WORDS)
    tl.store(bits_ptr + rows[:, None] * stride_bm + word[None, :], words,
             mask=row_ok[:, None] & (word < n_words)[None, :])


@triton.jit
def apply_keep(x, keep):
    """x with its dropped elements multiplied by 0 (keep a bool tile of x's shape): an Inf or NaN there
    becomes NaN and a finite value a signed zero, bit for bit the reference's ``x * mask``; a plain
    select would hide a non-finite value as 0. Written as a select between x and x * 0 rather than
    x * keep.to(float): the same values, but a [128, 256] fp32 tile of 0/1 factors cost B2 (dx with
    dropout) ~45 registers on sm_90 and spilled it (the full static report)."""
    return tl.where(keep, x, x * 0.0)


@triton.jit
def keep_factor(keep, scale):
    """The per-element dropout factor, ``scale`` where kept and 0 where dropped (fp32), to multiply
    by (``x * keep_factor(keep, 1/(1-p))``): a select of constants and one multiply, like
    ``apply_keep``, so non-finite values at dropped positions give NaN."""
    return tl.where(keep, scale, 0.0)


@triton.jit
def _keep_bits_kernel(seed_ptr, bits_ptr, M, K, n_words, stride_bm, threshold,
                      BLOCK_M: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    """bits[M, n_words] = the stream's keep-mask of x [M, K], packed 32 columns to an int32 word."""
    BLOCK_K: tl.constexpr = BLOCK_WORDS * 32
    seed_lo, seed_hi = load_seed(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_K
    keep = keep_mask_tile(seed_lo, seed_hi, rows, col0, threshold, BLOCK_M, BLOCK_K)
    store_keep_bits(bits_ptr, keep, rows, rows < M, col0, K, n_words, stride_bm, BLOCK_M, BLOCK_K)


@triton.jit
def _mask_kernel(out_ptr, seed_ptr, M, K, stride_om, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, K] (uint8) = keep-mask of the stream; used by ``dropout_mask`` and the tests."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = keep_mask_tile(seed_lo, seed_hi, rows, col0, threshold, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], keep.to(tl.uint8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


@triton.jit
def _dropout_scale_kernel(
    # pointers: out = x * keep * scale; with HAS_PAIR also out2 = x2 * keep * scale2 from
    # the same mask (x2, out2 None otherwise). An output may alias its input.
    x_ptr, out_ptr, x2_ptr, out2_ptr, seed_ptr,
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk, stride_om, stride_ok, stride_x2m, stride_x2k, stride_o2m, stride_o2k,
    # the stream's threshold, the scales
    threshold, scale, scale2,
    # meta
    HAS_PAIR: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 x
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The composite backend's dropout: one tensor, or two under one mask (its backward's dx and
    x, so that Philox runs once for both)."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    keep = keep_mask_tile(seed_lo, seed_hi, rows, col0, threshold, BLOCK_M, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=inside, other=0.0)
    out = x.to(COMPUTE_DTYPE) * keep_factor(keep, scale).to(COMPUTE_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok, out.to(out_ptr.dtype.element_ty), mask=inside)
    if HAS_PAIR:
        x2 = tl.load(x2_ptr + rows[:, None] * stride_x2m + cols[None, :] * stride_x2k, mask=inside, other=0.0)
        out2 = x2.to(COMPUTE_DTYPE) * keep_factor(keep, scale2).to(COMPUTE_DTYPE)
        tl.store(out2_ptr + rows[:, None] * stride_o2m + cols[None, :] * stride_o2k,
                 out2.to(out2_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def keep_bits_words(cols: int) -> int:
    """int32 words per row of the keep-bits of a [rows, cols] tensor."""
    return -(-cols // BITS_PER_WORD)


def keep_bits_triton(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Keep-bits (int32 [rows, ceil(cols/32)], see the module docstring) of the stream for a
    [rows, cols] input; ``seed`` a 0-dim int64 tensor on the target device (read by the kernel)."""
    n_words = keep_bits_words(cols)
    bits = torch.empty((rows, n_words), dtype=torch.int32, device=seed.device)
    if bits.numel() == 0:
        return bits
    BLOCK_M, BLOCK_WORDS = 32, 4
    launch(_keep_bits_kernel, (-(-rows // BLOCK_M), -(-n_words // BLOCK_WORDS)),
           (seed, bits, rows, cols, n_words, bits.stride(0), drop_threshold(p)),
           dict(BLOCK_M=BLOCK_M, BLOCK_WORDS=BLOCK_WORDS), {})
    return bits


def keep_mask_triton(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """Bool keep-mask [rows, cols] of the stream, computed by the Triton mask kernel."""
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    if out.numel() == 0:
        return out.bool()
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    BLOCK_M, BLOCK_K = 32, 64
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_K))
    _mask_kernel[grid](out, seed_t, rows, cols, out.stride(0), drop_threshold(p), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out.bool()


def dropout_scale_triton(x2d: torch.Tensor, seed: torch.Tensor, p: float, scale: float,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2d * keep * scale for x2d [M, K] (any strides), seed a 0-dim int64 tensor on x's device
    (read by the kernel: no host sync). Writes into ``out`` (may be x2d itself) or a new tensor."""
    if out is None:
        out = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    _launch_dropout_scale(x2d, out, None, None, seed, p, scale, 0.0)
    return out


def dropout_scale_pair_triton(g: torch.Tensor, g_scale: float, x2d: torch.Tensor, x_scale: float,
                              seed: torch.Tensor, p: float) -> torch.Tensor:
    """``g *= keep * g_scale`` in place and return ``x2d * keep * x_scale``, one launch and one
    Philox pass for both (g and x2d [M, K], any strides)."""
    dropped = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    _launch_dropout_scale(g, g, x2d, dropped, seed, p, g_scale, x_scale)
    return dropped


def _launch_dropout_scale(x, out, x2, out2, seed, p: float, scale: float, scale2: float) -> None:
    if out.numel() == 0:
        return
    BLOCK_M, BLOCK_K = 32, 64
    pair = x2 is not None
    launch(_dropout_scale_kernel, (-(-x.shape[0] // BLOCK_M), -(-x.shape[1] // BLOCK_K)),
           (x, out, x2, out2, seed, x.shape[0], x.shape[1],
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            x2.stride(0) if pair else 0, x2.stride(1) if pair else 0,
            out2.stride(0) if pair else 0, out2.stride(1) if pair else 0,
            drop_threshold(p), scale, scale2),
           dict(HAS_PAIR=pair, COMPUTE_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
                BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K), {})
