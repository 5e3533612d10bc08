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
from torch import Tensor

from ..dropout import dropout_scale, dropout_scale_, dropout_scale_pair_
from .lora_linear import FLOAT_DTYPES, register_backend

__all__ = ["composite_forward", "composite_backward", "addmm_scaled_"]


def addmm_scaled_(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``out += alpha * (a @ b)`` in place. BLAS skips the product when alpha is 0, which would hide
    a NaN/Inf of ``a`` or ``b`` that the reference propagates (0 * NaN = NaN): at 0 it is formed."""
    if alpha == 0.0:
        return out.add_(torch.mm(a, b).mul_(0.0))
    return out.addmm_(a, b, alpha=alpha)


def composite_forward(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                      scaling: float, p: float, seed: Tensor):
    """x2d [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None, seed 0-dim int64.
    Returns (y [M, N], T [M, r]) in x's dtype and the mask state: a copy of the seed (a custom op's
    output may not alias its input), from which backward regenerates the mask."""
    dtype = x2d.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)  # no copy when the adapters are in x's dtype
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
    if p > 0.0:
        T = torch.mm(dropout_scale(x2d, seed, p, 1.0 / (1.0 - p)), A.t())  # the dropped x dies here
    else:
        T = torch.mm(x2d, A.t())
    addmm_scaled_(y, T, B.t(), scaling)
    return y, T, seed.clone()


def composite_backward(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor,
                       scaling: float, p: float, seed: Tensor,
                       need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool):
    """dy [M, N]. Returns (dx [M, K] | None, dA [r, K] | None, dB [N, r] | None, db [N] (at least fp32) | None);
    dx in x's dtype, dA/dB in the adapters' dtype."""
    dtype = x2d.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    U = torch.mm(dy, B) if (need_dx or need_dA) else None  # [M, r], computed once
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
            dA = torch.mm(U.t(), dropped).to(lora_A.dtype)
        else:  # cast before scaling: with wider (fp32) adapters the scale costs no second low-precision rounding
            dA = torch.mm(U.t(), x2d).to(lora_A.dtype).mul_(scaling)
    if need_dB:
        dB = torch.mm(dy.t(), T).to(lora_B.dtype).mul_(scaling)
    if need_db:
        db = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32))
    return dx, dA, dB, db


register_backend("composite", composite_forward, composite_backward, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
