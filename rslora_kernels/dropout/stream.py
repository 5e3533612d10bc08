"""The definition of the project's dropout stream, Philox4x32-10 keyed by (seed, row, col), and its
PyTorch implementation (the executable form of the definition).

Definition (every implementation -- Triton (kernels.py), C++ (csrc/philox_dropout.cpp, loaded by
csrc.py) and the PyTorch one below -- follows it bit for bit; the constants are defined here only):

* x is viewed as ``[M, K]`` (``row`` runs over all leading dims in logical order).
* key     = (seed mod 2^32, seed >> 32)                  with 0 <= seed < 2^63
* counter = (col >> 2, row mod 2^32, row >> 32, 0)
* the four 32-bit outputs of one Philox4x32-10 call serve columns ``4*(col>>2) + j``, j = 0..3;
  element (row, col) takes output ``j = col & 3``.
* the element is kept iff ``output >= threshold(p)`` with ``threshold(p) = floor(p * 2^32)``,
  so ``P(keep) = 1 - threshold / 2^32`` and ``p = 0`` keeps everything.

Counters are 64-bit rows and 32-bit column groups, so nothing overflows for M*K beyond 2^31.
Philox is from Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS", "SEED_BOUND",
           "philox4x32_10", "drop_threshold", "draw_seed", "as_seed_int", "check_dropout_p", "keep_mask_torch"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_BOUND = 2**63  # seeds are non-negative int64 values
_U32 = 0xFFFFFFFF


def drop_threshold(p: float) -> int:
    """Integer threshold: an element is dropped iff its 32-bit draw is below it."""
    return min(int(math.floor(float(p) * 2.0**32)), 2**32 - 1)


def draw_seed(device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """A fresh seed from torch's default generator (so ``torch.manual_seed`` makes runs repeat).

    Returned as a 0-dim int64 tensor on ``device`` so that it can travel through
    ``torch.compile`` graphs without a host sync.
    """
    return torch.randint(0, SEED_BOUND - 1, (), dtype=torch.int64, device=device)


def _mulhilo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 tensors."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + (p_hi << 16)) & _U32  # int64 wrap-around keeps the low 32 bits right
    return hi, lo


def philox4x32_10(counter: Sequence[torch.Tensor], key: Sequence[Union[int, torch.Tensor]]):
    """Philox4x32-10 on uint32 values stored in int64 tensors (broadcasting).

    ``counter``: four tensors; ``key``: two ints or tensors. Returns four int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _U32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _U32 for k in key)
    for i in range(PHILOX_ROUNDS):
        if i > 0:
            k0 = (k0 + PHILOX_W0) & _U32
            k1 = (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def as_seed_int(seed: Union[int, torch.Tensor]) -> int:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int or a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


def check_dropout_p(p: float) -> float:
    """Validate a dropout probability; returns it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def keep_mask_torch(seed: int, rows: int, cols: int, p: float, row_offset: int = 0) -> torch.Tensor:
    """The stream computed with PyTorch integer ops: bool [rows, cols] keep mask (rows from ``row_offset``).

    ``seed`` may be an int (computed on the CPU) or a 0-dim int64 tensor (computed on its device,
    with no host sync: this is what lets the reference backend's dropout trace under torch.compile).
    """
    device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    groups = (cols + 3) // 4
    row = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)[:, None]
    grp = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    out = philox4x32_10((grp, row & _U32, row >> 32, zero), (seed & _U32, seed >> 32))
    draws = torch.stack(torch.broadcast_tensors(*out), dim=-1).reshape(rows, groups * 4)[:, :cols]
    return draws >= drop_threshold(p)
