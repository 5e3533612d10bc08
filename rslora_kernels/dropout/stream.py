"""The definition of the project's dropout stream, ``philox4x32-7-u16``, and its PyTorch implementation
(the executable form of the definition).

The normative text, with the reasons for each choice, is docs/design.md ("Dropout stream
specification"); every implementation -- Triton (kernels.py), C++ (rslora_kernels/csrc/philox_dropout.cpp,
loaded by csrc.py) and the PyTorch one below -- follows it bit for bit; the constants are defined here only:

* x is viewed as ``[M, K]`` (``row`` runs over all leading dims in logical order).
* key     = (seed mod 2^32, seed >> 32)                  with 0 <= seed < 2^63
* counter = (col >> 3, row mod 2^32, row >> 32, 0)
* one Philox4x32-7 call yields four 32-bit words, eight 16-bit lanes: element (row, col) takes lane
  ``j = col & 7``, bits ``16*(j & 1)`` .. ``16*(j & 1) + 15`` of word ``j >> 1``.
* the element is kept iff ``lane >= threshold(p)``, ``threshold(p) = round(p * 2^16)`` (nearest
  integer, ties to even; 0 .. 65536), so ``P(drop) = threshold / 2^16``: p quantized to a multiple
  of 2^-16, ``p = 0`` keeps everything and ``p >= 1 - 2^-17`` drops everything. Kept elements are
  scaled by ``1 / (1 - p)`` of the caller's p (not the quantized one), as PEFT and the reference do.

Counters are 64-bit rows and 32-bit column groups, so nothing overflows for M*K beyond 2^31.
Philox is from Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["STREAM_VERSION", "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS", "LANE_BITS",
           "LANES_PER_CALL", "SEED_BOUND", "philox4x32", "drop_threshold", "draw_seed", "as_seed_int",
           "check_dropout_p", "keep_mask_torch"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 7
LANE_BITS = 16  # bits of Philox output per keep decision
LANES_PER_CALL = 4 * 32 // LANE_BITS  # elements served by one Philox4x32 call: columns 8g .. 8g+7
# The stream's name: a seed means the same mask wherever this name is the same.
STREAM_VERSION = f"philox4x32-{PHILOX_ROUNDS}-u{LANE_BITS}"
SEED_BOUND = 2**63  # seeds are non-negative int64 values
_U32 = 0xFFFFFFFF


def drop_threshold(p: float) -> int:
    """Integer threshold in [0, 2^16]: an element is dropped iff its 16-bit lane is below it.

    ``round(p * 2^16)``, ties to even: p * 2^16 is exact in a double and Python's round is exact,
    so the C++ copy (which rounds the same way) gets the same integer for every p."""
    return round(float(p) * 2.0**LANE_BITS)


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


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[Union[int, torch.Tensor]],
               rounds: int = PHILOX_ROUNDS):
    """Philox4x32-``rounds`` (the stream's 7 by default) on uint32 values stored in int64 tensors
    (broadcasting).

    ``counter``: four tensors; ``key``: two ints or tensors. Returns four int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _U32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _U32 for k in key)
    for i in range(rounds):
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
    groups = (cols + LANES_PER_CALL - 1) // LANES_PER_CALL
    row = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)[:, None]
    grp = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    out = philox4x32((grp, row & _U32, row >> 32, zero), (seed & _U32, seed >> 32))
    words = torch.stack(torch.broadcast_tensors(*out), dim=-1)  # [rows, groups, 4]
    lanes = torch.stack([words & 0xFFFF, words >> LANE_BITS], dim=-1)  # lane 2w + h: half h of word w
    lanes = lanes.reshape(rows, groups * LANES_PER_CALL)[:, :cols]
    return lanes >= drop_threshold(p)
