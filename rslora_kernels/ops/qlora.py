"""The LoRA linear op on a frozen 4-bit base (QLoRA): custom ops, autograd Function, functional API.

    y = x deq(Wq)^T + b + s * (drop(x) A^T) B^T

``deq(Wq)`` is bitsandbytes' 4-bit weight (NF4/FP4, nested absmax or not; see
:mod:`rslora_kernels.quant`) dequantized to x's dtype. Each custom op dequantizes W into a scratch
tensor, runs the registered backend's forward or backward on it (the same functions the 16-bit
path runs, from the registry in :mod:`rslora_kernels.ops.lora_linear`), and lets the scratch go
when it returns. So:

* the dense W is never saved for backward: backward dequantizes again (one more pass over the
  4-bit weight, ~N*K/2 bytes read, N*K written -- small next to the two N*K*M GEMMs);
* it is not kept after the call: peak extra memory per call is one dense W of the layer;
* the layer saves what the 16-bit path saves -- x (a view), T = drop(x) A^T and the dropout mask state --
  plus references to the 4-bit weight's own tensors (no new memory).

Dequantization: on CUDA (and under ``TRITON_INTERPRET=1`` with backend "triton") the Triton kernel
of :mod:`rslora_kernels.ops.dequant_kernel`; on the CPU bitsandbytes' native kernel where it is
exact, else PyTorch -- all bit-exact to ``bitsandbytes.functional.dequantize_4bit``.

Why dequantize-once-per-call and not inside the GEMM tiles: fusing the decode into the W tile loads
of F2/B2 saves writing and re-reading one N*K scratch (2*N*K*2 bytes in bf16) but decodes every W
tile once per M tile (M/BLOCK_M times) and would mean editing the LoRA kernels; it can only win for
small M (decode-bound). Without a GPU to measure the crossover we ship the scratch path; a GPU run
should time both against M (see docs/qlora.md).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .._launch import call_signature, recall, remember
from .._validate import check_backend_output, validate_inputs
from ..quant import Weight4bit, as_weight4bit, dequantize_4bit
from ..scaling import fold_scaling
from .autotune import Problem
from .custom_op import custom_op
from .first_order import first_order_only
from .lora_linear import (autocast_inputs, registered_backends, resolve_backend_planned, seed_tensor,
                          set_quantized_entry)

__all__ = ["qlora_linear", "QLoRALinearFunction"]

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dense_weight(qtensors: List[Tensor], qmeta: List[int], quant_type: str, dtype: torch.dtype,
                  backend: str) -> Tensor:
    """The 4-bit weight dequantized to ``dtype``: a scratch tensor owned by the caller's frame.
    The parts' consistency checks run once per signature of the parts (a launch plan: every step
    of a layer passes parts of the same dtypes, shapes, strides and devices); the values are read
    afresh on every call."""
    key = (quant_type, *qmeta, *[(t.dtype, t.shape, t.stride(), t.device) for t in qtensors])
    checked = recall(_dense_weight, key) is not None
    w = Weight4bit.from_parts(qtensors, qmeta, quant_type, check=not checked)
    if not checked:
        remember(_dense_weight, key, True)  # after the checks passed: a bad signature is never held
    return dequantize_4bit(w, dtype, impl="triton" if backend == "triton" else "auto")


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@custom_op("rslora_kernels::qlora_linear_fwd")
def qlora_linear_fwd(x2d: Tensor, qtensors: List[Tensor], qmeta: List[int], quant_type: str, lora_A: Tensor,
                     lora_B: Tensor, bias: Optional[Tensor], scaling: float, dropout_p: float, seed: Tensor,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, T, mask_state), as the dense op does."""
    weight = _dense_weight(qtensors, qmeta, quant_type, x2d.dtype, backend)
    y, T, mask_state = registered_backends()[backend].forward(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
    check_backend_output(backend, "y", y, (x2d.shape[0], qmeta[0]))
    check_backend_output(backend, "T", T, (x2d.shape[0], lora_A.shape[0]))
    return y, T, mask_state


@qlora_linear_fwd.register_fake
def _(x2d, qtensors, qmeta, quant_type, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return (x2d.new_empty((x2d.shape[0], qmeta[0])), x2d.new_empty((x2d.shape[0], lora_A.shape[0])),
            registered_backends()[backend].mask_state_like(x2d, seed, dropout_p))


@custom_op("rslora_kernels::qlora_linear_bwd")
def qlora_linear_bwd(dy: Tensor, x2d: Tensor, qtensors: List[Tensor], qmeta: List[int], quant_type: str,
                     lora_A: Tensor, lora_B: Tensor, T: Tensor, scaling: float, dropout_p: float, mask_state: Tensor,
                     needs: List[bool], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, db); a grad that is not needed comes back as an empty tensor."""
    weight = _dense_weight(qtensors, qmeta, quant_type, x2d.dtype, backend) if needs[0] else None
    if weight is None:  # no dx: the backends read W only for dx = dy W; a zero-stride stand-in
        weight = x2d.new_zeros(()).expand(qmeta[0], qmeta[1])
    outs = registered_backends()[backend].backward(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, mask_state, *needs)
    return tuple(o if o is not None else x2d.new_empty((0,)) for o in outs)


@qlora_linear_bwd.register_fake
def _(dy, x2d, qtensors, qmeta, quant_type, lora_A, lora_B, T, scaling, dropout_p, mask_state, needs, backend):
    M, K = x2d.shape
    N, R = qmeta[0], lora_A.shape[0]
    shapes = ((x2d, (M, K)), (lora_A, (R, K)), (lora_A, (N, R)), (lora_A, (N,)))
    db_dtype = torch.promote_types(x2d.dtype, torch.float32)
    return tuple(like.new_empty(shape, dtype=db_dtype if i == 3 else None) if need else x2d.new_empty((0,))
                 for i, (need, (like, shape)) in enumerate(zip(needs, shapes)))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class QLoRALinearFunction(torch.autograd.Function):
    """Autograd glue for a 4-bit base. ``forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed,
    backend, quant_type, qmeta, *qtensors)`` with validated inputs (``qtensors``/``qmeta`` from
    :meth:`Weight4bit.tensors` / :meth:`Weight4bit.meta`). The base is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, scaling, dropout_p, seed, backend, quant_type, qmeta, *qtensors):
        M, K = math.prod(x.shape[:-1]), x.shape[-1]
        x2d = x.reshape(M, K)
        y2d, T, mask_state = qlora_linear_fwd(
            x2d, list(qtensors), qmeta, quant_type, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x2d, lora_A, lora_B, T, mask_state, *qtensors)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.quant_type, ctx.qmeta, ctx.x_shape = quant_type, qmeta, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None  # None: the op has no bias
        return y2d.view(*x.shape[:-1], qmeta[0])

    @staticmethod
    @first_order_only  # no double backward: a second derivative raises instead of coming back wrong
    def backward(ctx, dy):
        x2d, lora_A, lora_B, T, mask_state, *qtensors = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and ctx.bias_dtype is not None
        dy2d = dy.reshape(x2d.shape[0], ctx.qmeta[0])
        dx, dA, dB, db = qlora_linear_bwd(
            dy2d, x2d, qtensors, ctx.qmeta, ctx.quant_type, lora_A, lora_B, T, ctx.scaling, ctx.dropout_p, mask_state,
            [need_x, need_a, need_b, need_bias], ctx.backend)
        return (dx.view(ctx.x_shape) if need_x else None, dA if need_a else None, dB if need_b else None,
                db.to(ctx.bias_dtype) if need_bias else None,
                None, None, None, None, None, None, *([None] * len(qtensors)))


# ----------------------------------------------------------------------------------------------
# Functional API (reached through rslora_kernels.lora_linear when weight is 4-bit)
# ----------------------------------------------------------------------------------------------
def qlora_linear(x: Tensor, weight, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                 seed: Union[int, Tensor, None] = None, backend: str = "auto") -> Tensor:
    """:func:`rslora_kernels.lora_linear` with ``weight`` a :class:`~rslora_kernels.quant.Weight4bit`
    or a bitsandbytes ``Params4bit`` (``bnb.nn.Linear4bit.weight``), dequantized to x's dtype
    (the autocast dtype under ``torch.autocast``), bit for bit as bitsandbytes does. A 0-d tensor
    ``scaling`` is folded into B as there (:func:`rslora_kernels.scaling.fold_scaling`)."""
    w = as_weight4bit(weight)
    lora_A, lora_B, scaling = fold_scaling(scaling, x, lora_A, lora_B)
    x, _, lora_A, lora_B, bias = autocast_inputs(x, None, lora_A, lora_B, bias)
    # a call whose signature passed the checks before skips them and the backend choice (a launch plan)
    key = call_signature(x, w.shape, w.device, lora_A, lora_B, bias, scaling, dropout_p, backend)
    known = recall(qlora_linear, key) if key is not None else None
    if known is not None:
        backend = known
    else:
        if isinstance(x, Tensor) and x.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32 with a 4-bit weight (its compute dtype), "
                            f"got {x.dtype}")
        if isinstance(x, Tensor) and w.device != x.device:
            raise ValueError(f"weight (4-bit) is on {w.device} but x is on {x.device}; all tensors must share a device")
        # every check of the dense op, against a zero-stride stand-in with W's shape and x's dtype/device
        stand_in = x.new_zeros(()).expand(*w.shape) if isinstance(x, Tensor) else x
        validate_inputs(x, stand_in, lora_A, lora_B, bias, scaling, dropout_p)
        backend = resolve_backend_planned(backend, x.device, x.dtype, lora_A.dtype, Problem(  # "auto": docs/tuning.md
            math.prod(x.shape[:-1]), w.shape[0], x.shape[-1], lora_A.shape[0], "qlora", dropout_p, bias is not None))
        if key is not None:
            remember(qlora_linear, key, backend)
    scaling = float(scaling)
    p = float(dropout_p) if training else 0.0
    seed = seed_tensor(seed, p, x.device)
    spec = registered_backends()[backend]
    if spec.backward is None:
        # an autograd backend ("reference": the oracle) is plain PyTorch on the dense W, which
        # autograd then saves: correct, not memory-saving
        M, K = math.prod(x.shape[:-1]), x.shape[-1]
        dense = dequantize_4bit(w, x.dtype, impl="torch")
        return spec.forward(x.reshape(M, K), dense, lora_A, lora_B, bias, scaling, p, seed).view(*x.shape[:-1], w.shape[0])
    return QLoRALinearFunction.apply(x, lora_A, lora_B, bias, scaling, p, seed, backend, w.quant_type,
                                     w.meta(), *w.tensors())


set_quantized_entry(qlora_linear)  # rslora_kernels.lora_linear hands a 4-bit weight to qlora_linear
