"""Tile configurations: the measured table of the current GPU where it has an entry
(:mod:`rslora_kernels.ops.tuning`), else rules that depend on the problem sizes, dtype and GPU arch.

Each launch of the Triton backend asks one function here for its config. ``candidate_configs``
lists every config the functions can return (at most 8 per kernel family), so the static kernel
report can compile them all and a tuner can time them. The rules, by what they depend on:

* dtype: fp32 tiles are small (IEEE fp32 dots are FMAs that hold operand slices in registers);
  16-bit tiles are sized for tensor cores.
* arch: sm_90 (H100, 227 KiB shared memory, warpgroup MMA) takes 128x256 output tiles for the dual
  GEMMs; sm_80 (A100, 163 KiB) keeps 128x128.
* sizes: the larger tiles only where they still give every SM a program (``_fills``); the rank
  tile follows r (the smallest power of two >= r, capped).

In the interpreter, tiles are chosen for interpreter speed (bigger tiles = fewer numpy calls).
Every sm_90 16-bit config here compiles without spills or serialized wgmma (ptxas C7515) under
Triton 3.6 and 3.9: ``python -m benchmarks.static_report --arch 90``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .._runtime import interpreting
from .tuning import rules_only, tuned_config

__all__ = ["TileConfig", "dual_gemm_config", "dora_gemm_config", "shrink_config", "shrink_masked_config",
           "grads_config", "split_count", "split_m_for", "candidate_configs"]

# SMs of the GPU each arch's rules are sized for (A100, H100 SXM)
_SMS = {80: 108, 90: 132}


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int      # rows of x / dy per tile
    BLOCK_F: int      # output features per tile (N for F2, K for B2, K or N for B3)
    BLOCK_RED: int    # reduction tile over K (F1, F2) or N (B1, B2)
    BLOCK_R: int      # rank tile
    GROUP_M: int = 8  # grouped program ordering for L2 reuse (dual GEMMs)
    num_warps: int = 4
    num_stages: int = 3
    # F1 with dropout (shrink_masked): F1 draws the mask itself when one rank tile covers r and
    # BLOCK_RED is whole 32-bit words; off, a keep-bits pass draws it first. The rules always
    # allow it; the off variants are candidates for the tuner to measure against
    DRAW_BITS: bool = True
    # shrinks (F1, B1) and B3: split the reduction (K or N; M for B3) into chunks, fp32 partials
    # summed in a fixed order, until the launch has about SPLIT_PER_SM programs per SM (0: never
    # split). A streaming launch needs bytes in flight, and its tiles alone give about one CTA per SM
    SPLIT_PER_SM: int = 0

    def launch_kwargs(self):
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def _rank_tile(r: int, cap: int) -> int:
    """Smallest power of two >= r, clamped to [16, cap] (tl.dot needs >= 16)."""
    t = 16
    while t < r and t < cap:
        t *= 2
    return t


def _is_fp32(dtype: torch.dtype) -> bool:
    """fp32 tiles are kept small: with torch's default "highest" matmul precision tl.dot runs as
    IEEE FMAs, which hold whole operand slices in registers. The sizes below are the largest that
    compile without spills for sm_80 and sm_90 (``python -m benchmarks.static_report``)."""
    return dtype == torch.float32


def _fills(arch: int, tiles: int) -> bool:
    """Whether ``tiles`` programs give every SM of ``arch`` at least one."""
    return tiles >= _SMS.get(arch, 132)


def dual_gemm_config(M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """F2 (y) and B2 (dx): an [M, F] output tile (F = N, or K for B2), reduced over r then over K
    (or N). Called with (M, F, RED, r)."""
    if (tuned := tuned_config("dual_gemm", M, N, K, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 64, 64, _rank_tile(r, 64), GROUP_M=4)
    if _is_fp32(dtype):
        return TileConfig(64, 32, 16, 16, GROUP_M=8, num_warps=4, num_stages=3)
    rank_tile = _rank_tile(r, 64)
    if arch >= 90 and _fills(arch, -(-M // 128) * -(-N // 256)):
        # 48 KiB a stage: 3 stages = 144 KiB, one CTA per SM by design (the tile is the reuse)
        return TileConfig(128, 256, 64, rank_tile, GROUP_M=8, num_warps=8, num_stages=3)
    return TileConfig(128, 128, 64, rank_tile, GROUP_M=8, num_warps=8, num_stages=3)


def dora_gemm_config(M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """DoRA with dropout, forward (y and z, tiles [BLOCK_F of N, BLOCK_M]) and dx (tiles [BLOCK_M,
    BLOCK_F of K]): two fp32 accumulators a tile, so sm_90 takes 128x128 where F2/B2 take 128x256
    (the same registers), and sm_80, whose mma.sync operands need more registers, 128x64 (128x128
    spills there). Called with (M, F, RED, r)."""
    if (tuned := tuned_config("dora_gemm", M, N, K, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 64, 64, _rank_tile(r, 64), GROUP_M=4)
    if _is_fp32(dtype):  # 64 on the MMA's M side of both accumulators (TF32 warpgroup MMA); 8 warps: IEEE FMAs
        return TileConfig(64, 64, 16, 16, GROUP_M=8, num_warps=8, num_stages=3)
    return TileConfig(128, 128 if arch >= 90 else 64, 64, _rank_tile(r, 64), GROUP_M=8, num_warps=8, num_stages=3)


def shrink_config(M: int, red: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """F1 without dropout (T = x A^T) and B1 (U = dy B): an [M, r] output tile reduced over K (or N)."""
    if (tuned := tuned_config("shrink", M, 0, red, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    return _shrink_rule(M, r, dtype, arch, masked=False)


def shrink_masked_config(M: int, red: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """F1 with dropout: the kernel accumulates T^T (the masked x tile is the MMA's B operand), whose
    rank side is the warpgroup MMA's M side, so the rank tile is at least 64."""
    if (tuned := tuned_config("shrink_masked", M, 0, red, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    return _shrink_rule(M, r, dtype, arch, masked=True)


def _shrink_rule(M: int, r: int, dtype: torch.dtype, arch: int, masked: bool) -> TileConfig:
    if interpreting():
        return TileConfig(64, 0, 64, _rank_tile(r, 64))
    if _is_fp32(dtype):
        return TileConfig(64, 0, 16, max(_rank_tile(r, 64), 64 if masked else 16), num_warps=4, num_stages=2)
    rank_tile = max(_rank_tile(r, 128), 64 if masked else 16)
    if rank_tile == 128 and _fills(arch, -(-M // 128) * -(-r // 128)):
        # large ranks: 128x128 tiles, 8 warps, 32 KiB a stage (two CTAs per SM). On sm_80, drawing
        # the mask here on top of the mma.sync operands spills (255 registers): the bits pass draws it
        return TileConfig(128, 0, 64, 128, num_warps=8, num_stages=3, DRAW_BITS=arch >= 90)
    if rank_tile <= 64:
        # one rank tile: the launch streams x (dy) once at r FLOP a byte, so its speed is the bytes
        # in flight. M/64 row tiles alone are about one CTA per SM with 8 KiB stages: ~16 KiB ahead
        # per SM, ~2 MiB on the GPU, under the ~4 MiB an HBM3 GPU needs in flight (bandwidth x
        # latency, 4.8 TB/s x ~0.8 us); the H200 measured ~40 %. 128-wide reduction tiles (16 KiB of
        # x a stage, 2-3 CTAs per SM) and a split of the reduction to ~8 programs per SM (1024 at
        # M = 8192, K = 4096) keep ~10x that in flight; the fp32 partials cost 8 B per split and
        # output element (4 MiB at r = 16, against 64 MiB of x). F1 drawing the mask holds Philox's
        # state too: at 64 x 128 on 4 warps that spills, so it takes 32 rows and twice the programs
        # (2048 at M = 8192, K = 4096: vLLM's tuned H100 shrink there, 32 x 128 steps, split 8)
        # On sm_80, whose mma.sync holds the operands in registers, 64 x 128 steps spill: 64-wide
        # there, and 8 warps at the 64-wide rank tile (4 spill a few bytes there)
        if masked:
            return TileConfig(32, 0, 128, rank_tile, num_warps=4, num_stages=3, SPLIT_PER_SM=16)
        if arch < 90:
            return TileConfig(64, 0, 64, rank_tile, num_warps=8 if rank_tile == 64 else 4, num_stages=3, SPLIT_PER_SM=8)
        return TileConfig(64, 0, 128, rank_tile, num_warps=4, num_stages=3, SPLIT_PER_SM=8)
    # a 64 x 128 fp32 accumulator on 4 warps leaves ptxas too few registers to pipeline the wgmma
    return TileConfig(64, 0, 64, rank_tile, num_warps=8, num_stages=3)


def grads_config(M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """B3 (dA [r, K] and dB [N, r], one launch each): tiles [BLOCK_F, BLOCK_R] (dA^T and dB)
    reduced over M in BLOCK_M steps."""
    if (tuned := tuned_config("grads", M, N, K, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 64, 0, _rank_tile(r, 64), SPLIT_PER_SM=2)
    if _is_fp32(dtype):  # the rank tile is dA's MMA M side here too (TF32 warpgroup MMA: >= 64)
        return TileConfig(32, 64, 0, 64, num_warps=8, num_stages=3, SPLIT_PER_SM=2)
    # the rank is dA's warpgroup-MMA M side: at least 64. 64 x (128 + rank tile) x 2 B a stage:
    # 3 stages = 96 KiB at r >= 128 (two CTAs per SM). sm_90: 4 warps (with 8, Triton 3.6's ptxas
    # serializes the wgmma of the split-M variants, C7515); sm_80: 8 warps (with 4, mma.sync spills)
    # split-M to two programs per SM: one wave of the two CTAs an SM holds
    return TileConfig(64, 128, 0, max(_rank_tile(r, 128), 64), num_warps=4 if arch >= 90 else 8, num_stages=3,
                      SPLIT_PER_SM=2)


def split_count(steps: int, tiles: int, per_sm: int, sms: int, min_steps: int) -> int:
    """Into how many chunks a launch of ``tiles`` output tiles splits its reduction of ``steps``
    tile steps: as many as keep the programs at or under ``per_sm`` per SM (whole waves when
    per_sm is a multiple of the CTAs an SM holds), every chunk at least ``min_steps`` steps long;
    1 with ``per_sm`` 0."""
    return max(1, min(per_sm * sms // max(tiles, 1), steps // min_steps))


def split_m_for(M: int, tiles: int, block_m: int, sms: int, per_sm: int = 2) -> int:
    """How many M-chunks B3 splits its reduction into (:func:`split_count`): every chunk keeps at
    least two M-tiles of work."""
    return split_count(-(-M // block_m), tiles, per_sm, sms, 2)


def _measured_alternatives(family: str, cfg: TileConfig, dtype: torch.dtype, arch: int):
    """Configs the rules never return but the tuner times against the rules' ``cfg`` (so a tuned
    table may pick them): F1 leaving the mask to the keep-bits pass (``DRAW_BITS`` off); and, for
    the small-rank shrinks and B3's reductions on sm_90 in 16-bit, other amounts of bytes in
    flight. The rules' split-K shrinks (:func:`_shrink_rule`) are timed against the unsplit 64 x 64
    tiles (about one program per SM: on the H200, F1 + B1 so streamed 128 MiB in 0.073 ms, about
    40 % of the bandwidth; benchmarks/results/2026-11-27_h200_step_profile.md), F1 with dropout also
    against 64 x 64 steps split to 8 programs per SM; B3 (dA, dB: 128 MiB in 0.052 ms there, about half the
    bandwidth) against a fourth stage, a split to 8 programs per SM and 128-row steps."""
    out = []
    if family == "shrink_masked" and cfg.BLOCK_RED % 32 == 0 and cfg.DRAW_BITS:
        out.append(replace(cfg, DRAW_BITS=False))
    sm90_16bit = arch >= 90 and dtype != torch.float32
    if sm90_16bit and family in ("shrink", "shrink_masked") and cfg.SPLIT_PER_SM and cfg.BLOCK_R == 64:
        # (the 64-wide rank tile covers every small r in one tile; the bytes of x in flight do not
        # depend on it) the tiles without the split (one CTA per SM, 64-wide steps), and for F1 with
        # dropout the other split: 64 x 64 steps split to 8 a SM (64 x 128 spills there). B1 and F1
        # without dropout put the row tile on the MMA's M side: 32 rows would get no wgmma on sm_90
        # (and spilled under Triton 3.6), so they have no 32-row alternative
        out.append(replace(cfg, BLOCK_M=64, BLOCK_RED=64, SPLIT_PER_SM=0))
        if family == "shrink_masked":
            out.append(replace(cfg, BLOCK_M=64, BLOCK_RED=64, SPLIT_PER_SM=8))
    if family == "grads" and arch >= 90 and dtype != torch.float32:
        out += [replace(cfg, num_stages=4), replace(cfg, SPLIT_PER_SM=8)]
        if cfg.BLOCK_R <= 64:  # with the 128-wide rank tile, 128-row steps spill
            out.append(replace(cfg, BLOCK_M=128))
    return out


def candidate_configs(dtype: torch.dtype, arch: int):
    """Every (kernel family, config) the dispatcher can return for ``dtype`` on ``arch``; families:
    "dual_gemm", "shrink", "shrink_masked" (F1 with dropout), "grads", "dora_gemm"; family ``f`` is what
    ``f_config`` returns: the rules' configs and the alternatives a tuned table may pick
    (:func:`_measured_alternatives`)."""
    out = set()
    with rules_only():  # the rules' set: a committed table only ever picks among these
        for M in (512, 8192):
            for N in (1024, 4096):
                for r in (1, 16, 32, 64, 128, 256, 4096):
                    out.add(("dual_gemm", dual_gemm_config(M, N, N, r, dtype, arch)))
                    out.add(("shrink", shrink_config(M, N, r, dtype, arch)))
                    out.add(("shrink_masked", shrink_masked_config(M, N, r, dtype, arch)))
                    out.add(("grads", grads_config(M, N, N, r, dtype, arch)))
                    out.add(("dora_gemm", dora_gemm_config(M, N, N, r, dtype, arch)))
    out |= {(family, alt) for family, cfg in out for alt in _measured_alternatives(family, cfg, dtype, arch)}
    return sorted(out, key=lambda kc: (kc[0], str(kc[1])))
