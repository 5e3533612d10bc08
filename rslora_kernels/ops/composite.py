"""The "composite" backend: vendor GEMMs (torch.mm/addmm) with minimal glue, Unsloth-style.

    forward    y  = addmm(b, x, W^T)                    base GEMM with the bias fused in
               T  = drop(x) A^T                         drop(x) is a transient, freed right away
               y += s T B^T                             addmm_ in place: no second M x N tensor
    backward   U  = dy B                                once, shared by dx and dA
               G  = U A;  G *= mask * s/(1-p)           and drop(x) from the same mask, in one pass
               dx = G + dy W                            addmm_ into G in place
               dA = U^T (s drop(x)),  dB = s dy^T T,  db = sum_M dy     (s rides on drop(x) with dropout)

Saved for backward (by :class:`~rslora_kernels.ops.lora_linear.LoRALinearFunction`): x, T and the
seed (this backend's mask state); the dropout mask is regenerated from the seed (the project's Philox stream,
:mod:`rslora_kernels.dropout`): on the CPU by the C++ extension in ``rslora_kernels/csrc/``, on CUDA by a small
Triton kernel. The default backend on the CPU; on a GPU the baseline the Triton kernels must beat.

Adapters may be wider than x (fp32 ``lora_A``/``lora_B`` with bf16 x): the adapter GEMMs run in x's
dtype (A and B are cast, like the Triton kernels do) and dA/dB come back in the adapters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._runtime import shared_tensor
from ..dropout import dropout_scale, dropout_scale_, dropout_scale_pair_
from .lora_linear import FLOAT_DTYPES, register_backend

__all__ = ["composite_forward", "composite_forward_dropped", "composite_backward", "composite_dora_backward_dropout", "addmm_scaled_"]


def addmm_scaled_(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``out += alpha * (a @ b)`` in place. BLAS skips the product when alpha is 0, which would hide
    a NaN/Inf of ``a`` or ``b`` that the reference propagates (0 * NaN = NaN): at 0 it is formed."""
    if alpha == 0.0:
        return out.add_(torch.mm(a, b).mul_(0.0))
    return out.addmm_(a, b, alpha=alpha)


def _no_mask_state(device: torch.device) -> Tensor:
    """The mask state without dropout: a 0-dim int64 zero per device that nothing reads or writes
    (backward needs no mask), shared instead of a copy of the seed per call."""
    return shared_tensor(device, "composite no mask", lambda: torch.zeros((), dtype=torch.int64, device=device))


def composite_forward(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                      scaling: float, p: float, seed: Tensor):
    """x2d [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None, seed 0-dim int64.
    Returns (y [M, N], T [M, r]) in x's dtype and the mask state: with dropout a copy of the seed (a
    custom op's output may not alias its input), from which backward regenerates the mask."""
    return composite_forward_dropped(x2d, weight, lora_A, lora_B, bias, scaling, p, seed)[:3]


def composite_forward_dropped(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                              scaling: float, p: float, seed: Tensor):
    """:func:`composite_forward`, also returning drop(x) (x itself without dropout) and B in x's
    dtype, for a caller with another product of them (DoRA's ``drop(x) W^T + s T B^T``)."""
    dtype = x2d.dtype
    A = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)  # the cast only for wider adapters
    B = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
    y = F.linear(x2d, weight, bias)  # addmm with the bias fused in (mm without one)
    if p > 0.0:
        dropped = dropout_scale(x2d, seed, p, 1.0 / (1.0 - p))
        state = seed.clone()
    else:
        dropped = x2d
        state = _no_mask_state(x2d.device)
    T = F.linear(dropped, A)
    addmm_scaled_(y, T, B.t(), scaling)
    return y, T, state, dropped, B


def composite_backward(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor,
                       scaling: float, p: float, seed: Tensor,
                       need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool):
    """dy [M, N]. Returns (dx [M, K] | None, dA [r, K] | None, dB [N, r] | None, db [N] (at least fp32) | None);
    dx in x's dtype, dA/dB in the adapters' dtype."""
    dtype = x2d.dtype
    same = lora_A.dtype == dtype  # adapters in x's dtype: no casts, and the scale rides on the GEMMs
    A = lora_A if same else lora_A.to(dtype)
    U = torch.mm(dy, lora_B if same else lora_B.to(dtype)) if (need_dx or need_dA) else None  # [M, r], once
    dx = dA = dB = db = None
    dropped = None
    if need_dx:
        dx = torch.mm(U, A)  # becomes dx in place: the only M x K tensor of the dx path
        if p > 0.0:
            if need_dA:
                dropped = dropout_scale_pair_(dx, scaling / (1.0 - p), x2d, scaling / (1.0 - p), seed, p)
            else:
                dropout_scale_(dx, seed, p, scaling / (1.0 - p))
            dx.addmm_(dy, weight)
        elif scaling == 0.0:  # beta = 0 would drop dx's NaN/Inf (BLAS ignores C): scale it explicitly
            dx.mul_(0.0).addmm_(dy, weight)
        else:
            dx.addmm_(dy, weight, alpha=1.0, beta=scaling)
    if need_dA:
        if p > 0.0:  # s/(1-p) rides on the dropped x: no separate scaling pass
            if dropped is None:
                dropped = dropout_scale(x2d, seed, p, scaling / (1.0 - p))
            dA = torch.mm(U.t(), dropped)
            dA = dA if same else dA.to(lora_A.dtype)
        else:
            dA = _mm_scaled(U.t(), x2d, scaling, lora_A.dtype, same)
    if need_dB:
        dB = _mm_scaled(dy.t(), T, scaling, lora_B.dtype, same)
    if need_db:
        db = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32))
    return dx, dA, dB, db


def composite_dora_backward_dropout(dy: Tensor, g: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor,
                                    lora_B: Tensor, T: Tensor, scaling: float, p: float, seed: Tensor,
                                    need_dA: bool, need_dB: bool):
    """DoRA's dx, dA, dB with dropout (``rslora_kernels.ops.dora``), composite: with U = (g dy) B,

        dx = dy W + drop((g - 1) dy W + s U A),   dA = s U^T drop(x),   dB = s (g dy)^T T

    drop(t) = t * mask / (1 - p): the two masked terms under one mask in one pass (x's with them),
    the unmasked base GEMM added after. ``g`` [N] in fp32 (fp64). Returns (dx, dA | None, dB | None)."""
    dtype = x2d.dtype
    same = lora_A.dtype == dtype
    A = lora_A if same else lora_A.to(dtype)
    # g dy and (g - 1) dy formed in g's precision and rounded once to x's dtype (as the reference's
    # type promotion does; rounding g first doubles dB's error with 16-bit x)
    dy_g = (dy * g).to(dtype)
    U = torch.mm(dy_g, lora_B if same else lora_B.to(dtype))
    inner = torch.mm((dy * (g - 1)).to(dtype), weight)  # (g - 1) dy W, masked below
    addmm_scaled_(inner, U, A, scaling)                # + s U A
    dropped = None
    if need_dA:
        dropped = dropout_scale_pair_(inner, 1.0 / (1.0 - p), x2d, scaling / (1.0 - p), seed, p)
    else:
        dropout_scale_(inner, seed, p, 1.0 / (1.0 - p))
    dx = inner.addmm_(dy, weight)
    dA = dB = None
    if need_dA:
        dA = torch.mm(U.t(), dropped)
        dA = dA if same else dA.to(lora_A.dtype)
    if need_dB:
        dB = _mm_scaled(dy_g.t(), T, scaling, lora_B.dtype, same)
    return dx, dA, dB


def _mm_scaled(a: Tensor, b: Tensor, scaling: float, out_dtype: torch.dtype, same: bool) -> Tensor:
    """``scaling * (a @ b)`` in ``out_dtype``. In x's dtype: one GEMM with the scale as its alpha (no
    separate scaling pass; at 0 the product is formed and scaled, keeping NaN/Inf as the reference
    does). Wider adapters: cast before scaling, so the scale costs no second low-precision rounding."""
    if same and scaling != 0.0:
        return torch.addmm(_zero(a), a, b, beta=0.0, alpha=scaling)  # beta = 0: the zero is not read
    return torch.mm(a, b).to(out_dtype).mul_(scaling)


_ZERO_KINDS = {dt: f"zero {dt}" for dt in FLOAT_DTYPES}  # shared_tensor's kind per dtype, formatted once


def _zero(like: Tensor) -> Tensor:
    """A 0-dim zero of ``like``'s dtype and device that nothing writes: the input a beta = 0 addmm ignores."""
    return shared_tensor(like.device, _ZERO_KINDS[like.dtype],
                         lambda: torch.zeros((), dtype=like.dtype, device=like.device))


register_backend("composite", composite_forward, composite_backward, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
