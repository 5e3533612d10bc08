"""The LoRA linear op: backend registry, torch.library registration, autograd Function, functional API.

    y = x W^T + b + s * (drop(x) A^T) B^T

Fused backends ("triton", and "composite" where registered) run behind two custom ops,
``rslora_kernels::lora_linear_fwd`` and ``rslora_kernels::lora_linear_bwd`` (with fake kernels, so
``torch.compile`` traces through them), glued by :class:`LoRALinearFunction`. The "reference"
backend is plain PyTorch autograd over :func:`rslora_kernels.reference.lora_linear`.

Saved for backward: x (a view where possible), T = drop(x) A^T [M, r] and the seed; the dropout
mask is regenerated from the seed, never stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .._runtime import interpreting, triton_available_for
from .._validate import validate_inputs
from ..dropout import as_seed_int, draw_seed, keep_mask_torch

__all__ = ["lora_linear", "LoRALinearFunction", "register_backend", "resolve_backend"]


# ----------------------------------------------------------------------------------------------
# Backend registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """A fused implementation. forward(x2d, W, A, B, bias, s, p, seed) -> (y, T);
    backward(dy, x2d, W, A, B, T, s, p, seed, need_dx, need_dA, need_dB, need_db) -> (dx, dA, dB, db),
    db in promote_types(x's dtype, float32)."""
    forward: Callable
    backward: Callable
    supports: Callable[[torch.device], bool]


_BACKENDS: Dict[str, Backend] = {}


def register_backend(name: str, forward: Callable, backward: Callable, supports: Callable[[torch.device], bool]) -> None:
    _BACKENDS[name] = Backend(forward, backward, supports)


def _triton_forward(*args):
    from .triton_kernels import lora_forward
    return lora_forward(*args)


def _triton_backward(*args):
    from .triton_kernels import lora_backward
    return lora_backward(*args)


register_backend("triton", _triton_forward, _triton_backward, triton_available_for)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for ``device``; check that the named one can run there."""
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "composite" if "composite" in _BACKENDS and _BACKENDS["composite"].supports(device) else "reference"
    if backend == "reference":
        return backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; choose from {sorted(['auto', 'reference', *_BACKENDS])}")
    if not _BACKENDS[backend].supports(device):
        hint = " (or set TRITON_INTERPRET=1 to run Triton's CPU interpreter)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors{hint}")
    return backend


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("rslora_kernels::lora_linear_fwd", mutates_args=())
def _fwd_op(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
            scaling: float, dropout_p: float, seed: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _BACKENDS[backend].forward(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)


@_fwd_op.register_fake
def _(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    M = x2d.shape[0]
    return x2d.new_empty((M, weight.shape[0])), x2d.new_empty((M, lora_A.shape[0]))


@torch.library.custom_op("rslora_kernels::lora_linear_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor,
            scaling: float, dropout_p: float, seed: Tensor, needs: List[bool], backend: str
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, db); a grad that is not needed comes back as an empty tensor."""
    outs = _BACKENDS[backend].backward(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, seed, *needs)
    return tuple(o if o is not None else x2d.new_empty((0,)) for o in outs)


@_bwd_op.register_fake
def _(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, seed, needs, backend):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    shapes = ((x2d, (M, K)), (lora_A, (R, K)), (lora_A, (N, R)), (lora_A, (N,)))
    # a grad that is not needed is x2d.new_empty((0,)) in the real op: same dtype here
    db_dtype = torch.promote_types(x2d.dtype, torch.float32)  # bias grads accumulate in at least fp32
    return tuple(like.new_empty(shape, dtype=db_dtype if i == 3 else None) if need else x2d.new_empty((0,))
                 for i, (need, (like, shape)) in enumerate(zip(needs, shapes)))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):
    """Autograd glue for the fused backends. Inputs as in :func:`lora_linear` (validated), with
    ``seed`` a 0-dim int64 tensor on x's device and ``backend`` a registered fused backend."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
        M, K = math.prod(x.shape[:-1]), x.shape[-1]  # explicit M: reshape(-1, 0) is ambiguous when K = 0
        x2d = x.reshape(M, K)  # a view unless the leading dims cannot be flattened by strides
        y2d, T = torch.ops.rslora_kernels.lora_linear_fwd(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, T, seed)
        ctx.cfg = (scaling, dropout_p, backend, x.shape, bias is not None, bias.dtype if bias is not None else None)
        return y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, T, seed = ctx.saved_tensors
        scaling, p, backend, x_shape, has_bias, bias_dtype = ctx.cfg
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(x2d.shape[0], weight.shape[0])
        dx, dA, dB, db = torch.ops.rslora_kernels.lora_linear_bwd(
            dy2d, x2d, weight, lora_A, lora_B, T, scaling, p, seed,
            [need_x, need_a, need_b, need_bias and has_bias], backend)
        dW = dy2d.t() @ x2d if need_w else None  # W frozen in the fast path
        return (dx.view(x_shape) if need_x else None, dW, dA if need_a else None, dB if need_b else None,
                db.to(bias_dtype) if need_bias and has_bias else None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast(x, weight, lora_A, lora_B, bias):
    """Under torch.autocast, cast x, weight and bias to the autocast dtype (as F.linear would).
    lora_A/lora_B keep a wider dtype (PEFT's fp32 adapters): the kernels read them natively."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, lora_A, lora_B, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t, keep_wider=False):
        if t is None or t.dtype not in _AUTOCAST_ELIGIBLE or t.dtype == dt:
            return t
        if keep_wider and torch.finfo(t.dtype).bits > torch.finfo(dt).bits:
            return t
        return t.to(dt)

    return cast(x), cast(weight), cast(lora_A, True), cast(lora_B, True), cast(bias)


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                seed: Union[int, Tensor, None] = None, backend: str = "auto") -> Tensor:
    """Fused LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T``.

    Args:
        x: ``[..., K]``; any leading dims; strides are honoured (no copy if they flatten).
        weight: ``[N, K]`` frozen base weight, any strides (pass ``W.t()`` for fan_in_fan_out).
        lora_A: ``[r, K]``; lora_B: ``[N, r]`` (PEFT layouts), in x's dtype or wider (fp32).
        scaling: ``rslora_scaling(alpha, r)`` (rsLoRA) or ``lora_scaling(alpha, r)``.
        bias: ``[N]`` or None.
        dropout_p: inverted dropout on the adapter branch only; ignored when ``training=False``.
        seed: dropout seed (int in [0, 2^63) or 0-dim int64 tensor); None draws one from torch's
            default generator. The mask is ``rslora_kernels.dropout_mask(seed, x.shape, p)``.
        backend: "auto" | "triton" | "composite" | "reference".

    Returns:
        ``[..., N]`` in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    x, weight, lora_A, lora_B, bias = _autocast(x, weight, lora_A, lora_B, bias)
    validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend)
    scaling = float(scaling)
    p = float(dropout_p) if training else 0.0
    backend = resolve_backend(backend, x.device)
    if p > 0.0:
        if seed is None:
            seed = draw_seed(x.device)
        elif not isinstance(seed, Tensor):
            seed = torch.tensor(as_seed_int(seed), dtype=torch.int64, device=x.device)
        elif seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
            raise TypeError(f"seed tensor must be a one-element int64 tensor on {x.device}, got {seed.dtype} on {seed.device}")
    if backend == "reference":
        # the PyTorch stream on the seed tensor's device: no .item(), so it traces under torch.compile
        mask = keep_mask_torch(seed, math.prod(x.shape[:-1]), x.shape[-1], p).reshape(x.shape) if p > 0.0 else None
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, mask)
    if p == 0.0:
        seed = torch.zeros((), dtype=torch.int64, device=x.device)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, p, seed.reshape(()), backend)
