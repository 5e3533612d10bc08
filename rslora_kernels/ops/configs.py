"""Tile configurations: a pure function of (problem sizes, dtype, GPU arch).

Each launch of the Triton backend asks one function here for its config. ``candidate_configs``
lists every config the functions can return, so the static kernel report can compile them all.
In the interpreter, tiles are chosen for interpreter speed (bigger tiles = fewer numpy calls).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch

from .._runtime import interpreting
from .tuning import tuned_config

__all__ = ["TileConfig", "dual_gemm_config", "shrink_config", "grads_config", "split_m_for", "candidate_configs"]


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int      # rows of x / dy per tile
    BLOCK_F: int      # output features per tile (N for F2, K for B2, K or N for B3)
    BLOCK_RED: int    # reduction tile over K (F1, F2) or N (B1, B2)
    BLOCK_R: int      # rank tile
    GROUP_M: int = 8  # grouped program ordering for L2 reuse (dual GEMMs)
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self):
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def as_dict(self):
        return asdict(self)


def _rank_tile(r: int, cap: int) -> int:
    """Smallest power of two >= r, clamped to [16, cap] (tl.dot needs >= 16)."""
    t = 16
    while t < r and t < cap:
        t *= 2
    return t


def _wide(dtype: torch.dtype) -> bool:
    """fp32 tiles are kept small: with torch's default "highest" matmul precision tl.dot runs as
    IEEE FMAs, which hold whole operand slices in registers. The sizes below are the largest that
    compile without spills for sm_80 and sm_90 (``python -m benchmarks.static_report``)."""
    return dtype == torch.float32


def dual_gemm_config(M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """F2 (y) and B2 (dx): an [M, F] output tile, reduced over r then over K (or N)."""
    if (tuned := tuned_config("dual_gemm", M, N, K, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 64, 64, 64, GROUP_M=4)
    if _wide(dtype):
        return TileConfig(64, 32, 16, 16, GROUP_M=8, num_warps=4, num_stages=3)
    return TileConfig(128, 128, 64, 64, GROUP_M=8, num_warps=8, num_stages=3)


def shrink_config(M: int, red: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """F1 (T = drop(x) A^T) and B1 (U = dy B): an [M, r] output tile reduced over K (or N)."""
    if (tuned := tuned_config("shrink", M, 0, red, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 0, 64, _rank_tile(r, 64))
    if _wide(dtype):
        return TileConfig(64, 0, 16, _rank_tile(r, 64), num_warps=4, num_stages=2)
    return TileConfig(64, 0, 64, _rank_tile(r, 128), num_warps=4, num_stages=3)


def grads_config(M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> TileConfig:
    """B3 (dA [r, K] and dB [N, r]): tiles [BLOCK_R, BLOCK_F] / [BLOCK_F, BLOCK_R] reduced over M."""
    if (tuned := tuned_config("grads", M, N, K, r, dtype, arch)) is not None: return TileConfig(**tuned)  # noqa: E701
    if interpreting():
        return TileConfig(64, 64, 0, _rank_tile(r, 64))
    if _wide(dtype):
        return TileConfig(32, 64, 0, _rank_tile(r, 32), num_warps=8, num_stages=3)
    return TileConfig(64, 128, 0, _rank_tile(r, 128), num_warps=8, num_stages=3)


def split_m_for(M: int, tiles: int, block_m: int, sms: int) -> int:
    """How many M-chunks B3 splits its reduction into: enough programs to fill the GPU
    (about two per SM) while every chunk keeps at least two M-tiles of work."""
    m_tiles = -(-M // block_m)
    want = -(-2 * sms // max(tiles, 1))
    return max(1, min(want, m_tiles // 2))


def candidate_configs(dtype: torch.dtype, arch: int):
    """Every (kernel family, config) the dispatcher can return for ``dtype`` on ``arch``."""
    out = set()
    for r in (1, 16, 32, 64, 128, 256, 4096):
        out.add(("dual_gemm", dual_gemm_config(4096, 4096, 4096, r, dtype, arch)))
        out.add(("shrink", shrink_config(4096, 4096, r, dtype, arch)))
        out.add(("grads", grads_config(4096, 4096, 4096, r, dtype, arch)))
    return sorted(out, key=lambda kc: (kc[0], str(kc[1])))
