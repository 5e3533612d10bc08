"""DoRA (weight-decomposed LoRA) on the fused LoRA path, with PEFT's semantics and no [N, K] matrix.

With magnitude ``m [N]``, scale ``s``, the row norms ``w_n = || W_n + s B_n A ||`` (detached: no
gradient flows through them, as in PEFT and section 4.3 of the DoRA paper) and ``g = m / w``:

    dropout off  y = g * (x W^T + s (x A^T) B^T) + b
    dropout on   y = x W^T + b + (g - 1) * (xd W^T) + g * s * (xd A^T) B^T,     xd = drop(x)

Row norms without the [N, K] matrix ``W + s B A`` (:func:`dora_row_norms`)::

    w_n = ||W_n|| sqrt(1 + t_n / ||W_n||^2),     t_n = 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T

one [N, r] product ``W A^T``, one [r, r] product ``A A^T``, in fp32 (fp64 for fp64 inputs);
``||W_n||`` is taken as PEFT's forward takes it (``torch.linalg.norm`` of W's rows in the adapters'
dtype) and cached per frozen weight. At B = 0, t = 0 and ``w`` is that norm bit for bit: where the
magnitude was initialised with that call, ``g = m / w`` is exactly 1 and a fresh adapter is the
base layer, as in PEFT (docs/dora.md, "Row norms").
Cancellation: when ``W_n + s B_n A`` is much smaller than its parts, ``1 + t_n / ||W_n||^2``
cancels and the relative error grows to about ``eps * ||W_n||^2 / w_n^2``; a row that cancels
exactly reads 0 (clamped, never negative), so ``g`` is inf there, as ``m / 0`` is in PEFT.

Forward, built on the LoRA op's own custom ops (``rslora_kernels::lora_linear_fwd/bwd``: whatever
backend they dispatch to, with their dropout and their saved mask state), ``lora(x) = x W^T +
s (drop(x) A^T) B^T``::

    dropout off  y, T = lora(x) + b;   z = y - b;   y += (g - 1) * z     one base GEMM (no bias: y = g * z)
    dropout on   y, T = lora(x) + b  (T = drop(x) A^T);   z = drop(x) W^T + s T B^T
                 y += (g - 1) * z                                    two base GEMMs (as PEFT)

Backward with ``dy_g = dy * g`` (the LoRA backward run on ``dy_g``)::

    dx, dA, dB   = lora_backward(dy_g)                  dropout off: that is all of dx
    dropout on   dx += (1 - mask/(1-p)) * ((dy - dy_g) W)     the x W^T and (g-1) xd W^T terms
    dm = sum_M(dy * z) / w,   db = sum_M dy

The Triton backend with dropout runs each direction's two base GEMMs in one launch instead, two
accumulators over the same W tiles (``dora_kernels.dora_forward_dropout`` / ``dora_backward_dropout``:
y and z from x and drop(x) in registers; dx from dy, with W's rows scaled by g - 1 in registers
for the masked term and U = dy (g B), so that neither drop(x) nor g * dy is formed).

Saved for backward: x (a view), T [M, r], z [M, N], w [N], the seed and the LoRA op's mask state;
never an [N, K] tensor nor a second copy of x. Elsewhere the column scales (``* g``, ``(g - 1) *``),
the dropout-on extra GEMMs and the ``dm`` reduction are torch ops; ``dm`` is one on every backend.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._launch import call_signature, recall, remember
from .._validate import validate_inputs, validate_magnitude
from ..dropout import dropout_scale, keep_mask_torch
from ..scaling import fold_scaling
from .composite import addmm_scaled_, composite_dora_backward_dropout, composite_forward_dropped
from .autotune import Problem
from .custom_op import custom_op
from .first_order import first_order_only
from .lora_linear import lora_linear_bwd, lora_linear_fwd, registered_backends, resolve_backend_planned, seed_tensor

__all__ = ["dora_linear", "DoRALinearFunction", "dora_row_norms", "dora_merge_", "clear_norm_cache"]

_NORM_CHUNK = 1 << 22  # elements of W upcast at a time (16 MiB in fp32)


# ----------------------------------------------------------------------------------------------
# Row norms of W + s B A
# ----------------------------------------------------------------------------------------------
def _acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ||W_n|| of frozen weights: id(base tensor) -> (weakref to it, key, norms). The key holds the data
# pointer, the version counter (bumped by in-place writes, shared by views), shape, strides, dtype.
_NORMS: Dict[int, Tuple[weakref.ref, tuple, Tensor]] = {}


def clear_norm_cache() -> None:
    """Forget every cached ``||W_n||`` (needed only after writing a weight through ``.data``,
    which PyTorch's version counter does not see)."""
    _NORMS.clear()


def _weight_norms(weight: Tensor, norm_dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """``||W_n||`` as PEFT's DoRA forward takes it -- ``torch.linalg.norm`` of W's rows in the
    adapters' dtype (PEFT casts x, and W with it, to lora_A's dtype), one call on the whole matrix --
    then cast to ``acc``, and cached. When the magnitude was initialised in that dtype (an fp32
    model; adapters in W's dtype; rk.LoRALinear) it is that very norm, so at B = 0 ``g = m / w`` is
    exactly 1. W wider-cast once per weight: an [N, K] temporary at the first call, not per step."""
    base = weight._base if weight._base is not None else weight
    cacheable = not weight.is_inference()
    if cacheable:
        key = (weight.data_ptr(), base._version, tuple(weight.shape), weight.stride(), weight.dtype, norm_dtype, acc)
        entry = _NORMS.get(id(base))
        if entry is not None and entry[0]() is base and entry[1] == key:
            return entry[2]
    out = torch.linalg.norm(weight.to(norm_dtype), dim=1).to(acc)  # PEFT's call, on the same values
    if cacheable:
        ident = id(base)
        _NORMS[ident] = (weakref.ref(base, lambda _, k=ident: _NORMS.pop(k, None)), key, out)
    return out


def dora_row_norms(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``|| W_n + s B_n A ||_2`` for every row n, in fp32 (fp64 for fp64 inputs), without forming
    the [N, K] matrix: ``||W_n|| sqrt(1 + t_n / ||W_n||^2)`` with ``t_n = 2 s B_n . (W A^T)_n +
    s^2 B_n (A A^T) B_n^T`` (``sqrt(t_n)`` for a zero row). ``||W_n||`` is PEFT's, in the
    adapters' dtype (see :func:`_weight_norms`), so the result is exactly PEFT's at B = 0. Detached."""
    with torch.no_grad():
        acc = _acc_dtype(weight, lora_A)
        N, K = weight.shape
        A, B = lora_A.to(acc), lora_B.to(acc)
        WA = torch.empty((N, A.shape[0]), dtype=acc, device=weight.device)
        rows = max(1, _NORM_CHUNK // max(K, 1))
        for n0 in range(0, N, rows):  # W A^T with W upcast a chunk at a time (a view when W is in acc)
            torch.mm(weight[n0:n0 + rows].to(acc), A.t(), out=WA[n0:n0 + rows])
        # B_n . (2 s (W A^T)_n + s^2 (B A A^T)_n): one [N, r] tensor, one row-wise dot
        if scaling == 0.0:  # BLAS would ignore WA and the product: keep the NaN/Inf of the reference's 0 * B A
            cross = torch.addmm(WA, B, A @ A.t()).mul_(0.0)
        else:
            cross = torch.addmm(WA, B, A @ A.t(), beta=2.0 * scaling, alpha=scaling * scaling)
        t = torch.linalg.vecdot(B, cross, dim=1)
        norm_w = _weight_norms(weight, lora_A.dtype, acc)
        # t / ||W||^2 as two divisions: ||W||^2 itself may overflow or underflow where the ratio does not
        rel = t.div(norm_w).div_(norm_w).add_(1.0).clamp_min_(0.0).sqrt_()
        return torch.where(norm_w > 0, norm_w * rel, t.clamp_min(0.0).sqrt())


# ----------------------------------------------------------------------------------------------
# Forward and backward on top of the LoRA op
# ----------------------------------------------------------------------------------------------
def dora_forward(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 bias: Optional[Tensor], scaling: float, p: float, seed: Tensor, backend: str):
    """Returns (y [M, N], z [M, N], T [M, r], w [N] fp32/fp64, the LoRA op's mask state); z as in
    the module docstring."""
    w = dora_row_norms(weight, lora_A, lora_B, scaling)
    g = magnitude.to(w.dtype) / w  # column scales are formed in fp32, then rounded once to x's dtype
    if p == 0.0:
        if bias is None:
            z, T, state = lora_linear_fwd(x2d, weight, lora_A, lora_B, None, scaling, 0.0, seed, backend)
            return z * g.to(x2d.dtype), z, T, w, state
        # the bias in the LoRA op's GEMM, as PEFT's base layer adds it, then y += (g - 1) * (y - b) (PEFT's
        # own form): at B = 0, g is exactly 1 and y is the LoRA op's (the base layer's) output bit for bit
        y, T, state = lora_linear_fwd(x2d, weight, lora_A, lora_B, bias, scaling, 0.0, seed, backend)
        z = y - bias
        y.addcmul_(z, (g - 1).to(x2d.dtype))
        return y, z, T, w, state
    if backend == "triton":  # both base GEMMs in one launch, over the same W tiles
        from .dora_kernels import dora_forward_dropout
        y, z, T, state = dora_forward_dropout(x2d, weight, lora_A, lora_B, bias, g, scaling, p, seed)
        return y, z, T, w, state
    if backend == "composite":  # one drop(x) for T and z (the LoRA op's forward would make its own)
        y, T, state, dropped, B = composite_forward_dropped(x2d, weight, lora_A, lora_B, bias, scaling, p, seed)
        z = F.linear(dropped, weight)
        del dropped
        addmm_scaled_(z, T, B.t(), scaling)                                  # z = xd W^T + s T B^T
        y.addcmul_(z, (g - 1).to(x2d.dtype))
        return y, z, T, w, state
    # the LoRA op on x itself (its dropout, its saved state), then the second base GEMM on drop(x)
    y, T, state = lora_linear_fwd(x2d, weight, lora_A, lora_B, bias, scaling, p, seed, backend)  # x W^T + b + s T B^T
    z = torch.mm(dropout_scale(x2d, seed, p, 1.0 / (1.0 - p)), weight.t())  # the dropped x dies here
    addmm_scaled_(z, T, lora_B.to(x2d.dtype).t(), scaling)                   # z = xd W^T + s T B^T
    y.addcmul_(z, (g - 1).to(x2d.dtype))
    return y, z, T, w, state


def dora_backward(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor, z: Tensor,
                  w: Tensor, magnitude: Tensor, scaling: float, p: float, seed: Tensor, state: Tensor, backend: str,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_dm: bool, need_db: bool):
    """Returns (dx, dA, dB, dm, db), None where not needed; dm in the magnitude's dtype, db at least fp32."""
    g = magnitude.to(w.dtype) / w
    dx = dA = dB = dm = db = None
    if need_dm:  # products and sum in w's dtype (fp32/fp64), as the reference promotes: products rounded to a
        # 16-bit x's dtype put the magnitude grad past the numerics rule (1.4-1.8x its bound with fp32 adapters)
        dm = (torch.linalg.vecdot(dy.to(w.dtype), z.to(w.dtype), dim=0) / w).to(magnitude.dtype)
    if p > 0.0 and backend == "triton":  # g * dy is never formed; both base GEMMs of dx in one launch
        from .dora_kernels import dora_backward_dropout
        dx, dA, dB, db = dora_backward_dropout(dy, x2d, weight, lora_A, lora_B, T, g, scaling, p, state,
                                               need_dx, need_dA, need_dB, need_db)
        return dx, dA, dB, dm, db
    if p > 0.0 and backend == "composite" and need_dx:  # the masked terms of dx under one mask, in one pass
        dx, dA, dB = composite_dora_backward_dropout(dy, g, x2d, weight, lora_A, lora_B, T, scaling, p, seed,
                                                     need_dA, need_dB)
        if need_db:
            db = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32))
        return dx, dA, dB, dm, db
    dy_g = (dy * g).to(dy.dtype)  # the product in g's precision, rounded once (g rounded first doubled dB's error)
    if need_dx or need_dA or need_dB:
        dx, dA, dB, _ = lora_linear_bwd(
            dy_g, x2d, weight, lora_A, lora_B, T, scaling, p, state, [need_dx, need_dA, need_dB, False], backend)
    if need_dx and p > 0.0:
        # true dx = dy W + mask/(1-p) * ((g - 1) dy W + s U A); the LoRA backward on dy_g gave
        # g dy W (unmasked) + mask/(1-p) * s U A; the difference is (1 - mask/(1-p)) * ((1 - g) dy W)
        rest = torch.mm(dy * (1 - g).to(dy.dtype), weight)
        dx.add_(rest).sub_(dropout_scale(rest, seed, p, 1.0 / (1.0 - p)))
    if need_db:
        db = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32))
    return (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None, dm, db)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@custom_op("rslora_kernels::dora_linear_fwd")
def dora_linear_fwd(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    bias: Optional[Tensor], scaling: float, dropout_p: float, seed: Tensor, backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return dora_forward(x2d, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, backend)


@dora_linear_fwd.register_fake
def _(x2d, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, backend):
    y, T, state = lora_linear_fwd(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)  # its fakes
    return y, torch.empty_like(y), T, x2d.new_empty((weight.shape[0],), dtype=_acc_dtype(weight, lora_A)), state


@custom_op("rslora_kernels::dora_linear_bwd")
def dora_linear_bwd(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor, z: Tensor,
                    w: Tensor, magnitude: Tensor, scaling: float, dropout_p: float, seed: Tensor, state: Tensor,
                    needs: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, dm, db); a grad that is not needed comes back as an empty tensor."""
    outs = dora_backward(dy, x2d, weight, lora_A, lora_B, T, z, w, magnitude, scaling, dropout_p, seed, state,
                         backend, *needs)
    return tuple(o if o is not None else x2d.new_empty((0,)) for o in outs)


@dora_linear_bwd.register_fake
def _(dy, x2d, weight, lora_A, lora_B, T, z, w, magnitude, scaling, dropout_p, seed, state, needs, backend):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    db_dtype = torch.promote_types(x2d.dtype, torch.float32)
    outs = (x2d.new_empty((M, K)), lora_A.new_empty((R, K)), lora_A.new_empty((N, R)),
            magnitude.new_empty((N,)), x2d.new_empty((N,), dtype=db_dtype))
    return tuple(o if need else x2d.new_empty((0,)) for need, o in zip(needs, outs))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class DoRALinearFunction(torch.autograd.Function):
    """Autograd glue of the DoRA op. Inputs as in :func:`dora_linear` (validated), with ``seed`` a
    0-dim int64 tensor on x's device and ``backend`` a fused backend of the LoRA op."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, backend):
        M, K = math.prod(x.shape[:-1]), x.shape[-1]
        x2d = x.reshape(M, K)
        y2d, z, T, w, state = dora_linear_fwd(
            x2d, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, magnitude, T, z, w, seed, state)
        ctx.scaling, ctx.dropout_p, ctx.backend, ctx.x_shape = scaling, dropout_p, backend, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @first_order_only  # no double backward: a second derivative raises instead of coming back wrong
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, magnitude, T, z, w, seed, state = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        has_bias = ctx.bias_dtype is not None
        s, p = ctx.scaling, ctx.dropout_p
        dy2d = dy.reshape(x2d.shape[0], weight.shape[0])
        dx, dA, dB, dm, db = dora_linear_bwd(
            dy2d, x2d, weight, lora_A, lora_B, T, z, w, magnitude, s, p, seed, state,
            [need_x, need_a, need_b, need_m, need_bias and has_bias], ctx.backend)
        dW = None
        if need_w:  # W frozen in the fast path; correct, not fast: d/dW of x W^T + (g-1) xd W^T (+ g x W^T at p=0)
            g = magnitude.to(w.dtype) / w
            if p > 0.0:
                dropped = dropout_scale(x2d, seed, p, 1.0 / (1.0 - p))
                dW = dy2d.t() @ x2d + (dy2d * (g - 1).to(dy2d.dtype)).t() @ dropped
            else:
                dW = (dy2d * g.to(dy2d.dtype)).t() @ x2d
        return (dx.view(ctx.x_shape) if need_x else None, dW, dA if need_a else None, dB if need_b else None,
                dm if need_m else None, db.to(ctx.bias_dtype) if need_bias and has_bias else None,
                None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                seed: Union[int, Tensor, None] = None, backend: str = "auto") -> Tensor:
    """Fused DoRA linear with PEFT's semantics (see the module docstring for the formula).

    Args:
        x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, seed: as in
            :func:`rslora_kernels.lora_linear` (scaling a float or a 0-d tensor).
        magnitude: ``[N]`` DoRA magnitude (PEFT's ``lora_magnitude_vector``), x's dtype or wider.
        backend: "auto" | "triton" | "composite" | "reference".

    Returns:
        ``[..., N]`` in x's dtype. No autocast casting is done here (pass tensors of one dtype).
    """
    # a call whose signature passed the checks before skips them and the backend choice (a launch plan)
    key = call_signature(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, backend)
    known = recall(dora_linear, key) if key is not None else None
    if known is not None:
        backend = known
    else:
        validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p)  # scaling: a float or a 0-d tensor
        validate_magnitude(magnitude, weight, x)
        backend = resolve_backend_planned(backend, x.device, x.dtype, lora_A.dtype, Problem(  # "auto": tuning.md
            math.prod(x.shape[:-1]), weight.shape[0], x.shape[-1], lora_A.shape[0], "dora", dropout_p, bias is not None))
        if key is not None:
            remember(dora_linear, key, backend)
    p = float(dropout_p) if training else 0.0
    seed = seed_tensor(seed, p, x.device)  # checked even when p == 0
    if backend == "reference":
        mask = keep_mask_torch(seed, math.prod(x.shape[:-1]), x.shape[-1], p).reshape(x.shape) if p > 0.0 else None
        return reference.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, p, mask)  # PyTorch math
    if registered_backends()[backend].backward is None:
        raise ValueError(f"backend={backend!r} is an autograd backend of the LoRA op; DoRA runs on its fused "
                         "backends (with a backward) or on 'reference'")
    # the fused op takes a float: a 0-d tensor scaling is folded into B (||W + s B A|| is the same with s in B)
    lora_A, lora_B, scaling = fold_scaling(scaling, x, lora_A, lora_B)
    return DoRALinearFunction.apply(x, weight, lora_A, lora_B, magnitude, bias, float(scaling), p, seed, backend)


# ----------------------------------------------------------------------------------------------
# Merge (PEFT's DoRA merge): W <- (m / w) * (W + s B A);  unmerge: W <- W / (m / w) - s B A
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def dora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                weight_norm: Tensor, unmerge: bool = False) -> None:
    """In place on ``weight [N, K]``, in fp32 row chunks (one rounding to W's dtype, no [N, K]
    temporary). ``weight_norm`` is ``dora_row_norms`` of the unmerged weight, as PEFT caches it at
    merge time to unmerge with."""
    acc = _acc_dtype(weight, lora_A)
    A, B = lora_A.to(acc), lora_B.to(acc)
    factor = magnitude.to(acc) / weight_norm.to(acc)
    N, K = weight.shape
    rows = max(1, _NORM_CHUNK // max(K, 1))
    for n0 in range(0, N, rows):
        chunk, f = weight[n0:n0 + rows].to(acc), factor[n0:n0 + rows, None]
        delta = torch.mm(B[n0:n0 + rows], A).mul_(scaling)
        new = chunk.div_(f).sub_(delta) if unmerge else chunk.add_(delta).mul_(f)
        weight[n0:n0 + rows] = new.to(weight.dtype)
