"""The LoRA linear op: backend registry, torch.library registration, autograd Function, functional API.

    y = x W^T + b + s * (drop(x) A^T) B^T

The registry below is the one list of backends. Fused backends ("triton", "composite") run behind
two custom ops, ``rslora_kernels::lora_linear_fwd`` and ``rslora_kernels::lora_linear_bwd`` (with
fake kernels, so ``torch.compile`` traces through them), glued by :class:`LoRALinearFunction`. The
"reference" backend is registered too, as an autograd backend: plain PyTorch over
:func:`rslora_kernels.reference.lora_linear`, differentiated by autograd.

Saved for backward: x (a view where possible), T = drop(x) A^T [M, r] and the backend's "mask
state", which its forward returns: the packed keep-bits (M*K/8 bytes, 1/16 of a bf16 x) for
"triton", whose backward reads the mask instead of regenerating it; the seed for "composite", whose
backward regenerates the mask from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .._runtime import shared_tensor, triton_available_for
from .._validate import check_backend_output, check_seed, need_tensors, validate_inputs
from ..dropout import as_seed_int, draw_seed, keep_mask_torch
from .._launch import clear_plans, planned, recall, remember
from .custom_op import custom_op
from .first_order import first_order_only
from . import autotune
from ..quant import is_quantized_weight
from ..scaling import fold_scaling

__all__ = ["lora_linear", "LoRALinearFunction", "Backend", "register_backend", "unregister_backend",
           "registered_backends", "check_backend_name", "choose_auto_backend", "resolve_backend",
           "resolve_backend_planned", "autocast_inputs", "zero_seed", "seed_tensor", "lora_linear_fwd",
           "lora_linear_bwd", "set_quantized_entry"]


# ----------------------------------------------------------------------------------------------
# Backend registry: the one list of backends. Everything that takes a ``backend=`` argument
# (lora_linear, LoRALinear, inject, peft.patch) asks it; "auto" is resolved here, and a backend is
# checked against the device and dtypes it declared after "auto" has been resolved.
# ----------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels compute in


@dataclass(frozen=True)
class Backend:
    """A registered implementation of the op.

    Fused backends (``backward`` given) run behind the custom ops below, glued by
    :class:`LoRALinearFunction`:
    ``forward(x2d, W, A, B, bias, s, p, seed) -> (y [M, N], T [M, r], mask_state)`` and
    ``backward(dy, x2d, W, A, B, T, s, p, mask_state, need_dx, need_dA, need_dB, need_db) -> (dx, dA, dB, db)``,
    a grad that is not needed returned as None, db in ``promote_types(x's dtype, float32)``. The mask
    state is whatever backward needs of the dropout mask (the seed, or the packed keep-bits);
    ``mask_state_like(x2d, seed, p)`` returns an empty tensor shaped like it, for the fake kernel
    (default: a 0-dim tensor like the seed).

    Autograd backends (``backward=None``, e.g. "reference") are plain differentiable PyTorch:
    ``forward(x2d, W, A, B, bias, s, p, seed) -> y [M, N]`` is called directly and autograd
    differentiates it (and torch.compile traces it).

    ``seed`` is a 0-dim int64 tensor on x's device (zero when p == 0); the dropout mask is
    ``rslora_kernels.dropout_mask(seed, x2d.shape, p)``.
    """
    name: str
    forward: Callable
    backward: Optional[Callable]
    devices: Union[Tuple[str, ...], Callable[[torch.device], bool]]
    dtypes: Tuple[torch.dtype, ...]
    mask_state_like: Callable = lambda x2d, seed, p: seed.new_empty(())

    def runs_on(self, device: torch.device) -> bool:
        return self.devices(device) if callable(self.devices) else device.type in self.devices


_REGISTRY: Dict[str, Backend] = {}


def register_backend(name: str, forward: Callable, backward: Optional[Callable] = None, *,
                     devices: Union[Collection[str], Callable[[torch.device], bool]],
                     dtypes: Collection[torch.dtype], mask_state_like: Optional[Callable] = None,
                     replace: bool = False) -> Backend:
    """Make ``backend=name`` available to :func:`lora_linear`, :class:`~rslora_kernels.LoRALinear`,
    :func:`~rslora_kernels.inject` and :func:`rslora_kernels.peft.patch`.

    Args:
        name: the backend's name ("auto" is reserved).
        forward, backward: see :class:`Backend` (``backward=None``: ``forward`` is differentiable).
        devices: device types it runs on (``("cpu", "cuda")``), or a predicate on a ``torch.device``.
        dtypes: floating dtypes it computes in; x and lora_A/lora_B must each be one of them.
        mask_state_like: for fused backends whose mask state is not a 0-dim tensor like the seed:
            ``(x2d, seed, p) -> empty tensor`` shaped like the state (see :class:`Backend`).
        replace: allow re-registering an existing name.

    Returns the registered :class:`Backend`. A y, T or grad of the wrong shape from it is a
    ``ValueError`` naming the backend and the expected shape, at the call that returned it.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to replace it)")
    if not callable(forward) or (backward is not None and not callable(backward)):
        raise TypeError("forward must be callable and backward callable or None")
    if not callable(devices):
        devices = () if isinstance(devices, str) else tuple(devices)  # a bare "cpu" is a mistake, not ("c", "p", "u")
        if not devices or not all(isinstance(d, str) for d in devices):
            raise TypeError(f"devices must be device-type strings such as ('cpu', 'cuda') or a predicate, got {devices!r}")
    dtypes = tuple(dtypes)
    if not dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise TypeError(f"dtypes must be floating torch dtypes, got {dtypes!r}")
    spec = Backend(name, forward, backward, devices, dtypes, *([mask_state_like] if mask_state_like else []))
    _REGISTRY[name] = spec
    clear_plans()  # resolved backends are plans
    return spec


def unregister_backend(name: str) -> Backend:
    """Remove a backend registered with :func:`register_backend`; returns its :class:`Backend`."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("'auto' is not a registered backend")
    spec = _REGISTRY.pop(name)
    clear_plans()  # resolved backends are plans
    return spec


def registered_backends() -> Mapping[str, Backend]:
    """A read-only view of the registry: name -> :class:`Backend`."""
    return MappingProxyType(_REGISTRY)


def check_backend_name(backend) -> str:
    """``backend`` if it is "auto" or a registered name, else a ValueError listing the choices.
    For arguments stored before the device and dtypes are known (LoRALinear, peft.patch)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in _REGISTRY):
        raise ValueError(f"backend must be one of {['auto', *sorted(_REGISTRY)]}, got {backend!r}")
    return backend


def choose_auto_backend(device: torch.device, dtype: Optional[torch.dtype] = None,
                        adapter_dtype: Optional[torch.dtype] = None,
                        problem: Optional[Tuple] = None) -> str:
    """The backend "auto" means for x of ``device`` and ``dtype`` with adapters of ``adapter_dtype``
    (a dtype left None is taken to be one the chosen backend computes in) and ``problem``, an
    :class:`~rslora_kernels.ops.autotune.Problem` (or (M, N, K, r) of a LoRA op without dropout or
    bias): what a current committed table entry near the shape says, else what was measured on
    this GPU on first use (:func:`rslora_kernels.ops.autotune.choose`: docs/tuning.md); where neither
    answers, composite (on the CPU, composite, or reference for float64)."""
    dtypes = [d for d in (dtype, adapter_dtype) if d is not None]
    chosen = autotune.choose(device, dtype, adapter_dtype, problem)
    if chosen is not None:
        return chosen
    if device.type == "cuda" and all(d in KERNEL_DTYPES for d in dtypes):
        return "composite"
    # everything else (CPU, float64 on CUDA, ...): the first of these that runs here in these dtypes
    for name in ("composite", "reference"):
        spec = _REGISTRY.get(name)
        if spec is not None and spec.runs_on(device) and all(d in spec.dtypes for d in dtypes):
            return name
    raise ValueError(f"no registered backend runs on {device.type} tensors of dtypes {dtypes}")


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    adapter_dtype: Optional[torch.dtype] = None,
                    problem: Optional[Tuple] = None) -> str:
    """Map "auto" to a concrete backend, then check that the backend is registered, runs on
    ``device`` and computes in ``dtype`` (x's) and ``adapter_dtype`` (lora_A/lora_B's); a dtype
    left None is not checked. ValueError for an unknown name or device, TypeError for a dtype.
    ``problem`` (an ``autotune.Problem``, or (M, N, K, r)) lets "auto" follow the measurements
    (:func:`choose_auto_backend`)."""
    name = choose_auto_backend(device, dtype, adapter_dtype, problem) if check_backend_name(backend) == "auto" else backend
    spec = _REGISTRY[name]
    if not spec.runs_on(device):
        hint = " (or set TRITON_INTERPRET=1 to run Triton's CPU interpreter)" if name == "triton" else ""
        raise ValueError(f"backend={name!r} cannot run on {device.type} tensors{hint}")
    for what, dt in (("x", dtype), ("lora_A/lora_B", adapter_dtype)):
        if dt is not None and dt not in spec.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes)
            raise TypeError(f"backend={name!r} needs {what} in {names}, got {dt}")
    return name


def _resolve(backend, device, dtype, adapter_dtype, problem):
    return resolve_backend(backend, device, dtype, adapter_dtype, problem)


# :func:`resolve_backend` once per call signature (a launch plan, docs/kernels.md): it reads the
# environment (TRITON_INTERPRET) and, for "auto" on CUDA, searches the tuned table. Errors are not
# cached; under torch.compile's tracing it is called directly (sizes may be symbolic there)
resolve_backend_planned = planned(_resolve, uncached_while=torch.compiler.is_compiling)


# The op on a 4-bit weight: rslora_kernels.ops.qlora sits on top of this module (it runs the
# backends registered here on the dequantized weight), so it installs its entry point here when it is
# imported -- rslora_kernels.ops imports it -- instead of this module importing it back.
_quantized_entry: Optional[Callable] = None


def set_quantized_entry(fn: Callable) -> None:
    """Install ``fn`` as what :func:`lora_linear` calls, with its own arguments, for a 4-bit weight
    (:func:`rslora_kernels.ops.qlora.qlora_linear` does this when its module is imported)."""
    global _quantized_entry
    _quantized_entry = fn


_triton_kernels = None  # rslora_kernels.ops.triton_kernels, imported at the first Triton call


def _triton():
    global _triton_kernels
    if _triton_kernels is None:
        from . import triton_kernels
        _triton_kernels = triton_kernels
    return _triton_kernels


def _triton_forward(*args):
    return _triton().lora_forward(*args)


def _triton_backward(*args):
    return _triton().lora_backward(*args)


def _any_device(device: torch.device) -> bool:
    return True


def _triton_mask_state_like(x2d, seed, p):
    """Keep-bits int32 [M, ceil(K/32)] with dropout, an empty int32 tensor without."""
    M, K = x2d.shape
    return x2d.new_empty((M, -(-K // 32)) if p > 0.0 else (0,), dtype=torch.int32)


def _reference_forward(x2d, weight, lora_A, lora_B, bias, scaling, p, seed):
    # the PyTorch stream on the seed tensor's device: no .item(), so it traces under torch.compile
    mask = keep_mask_torch(seed, x2d.shape[0], x2d.shape[1], p) if p > 0.0 else None
    return reference.lora_linear(x2d, weight, lora_A, lora_B, scaling, bias, p, mask)


register_backend("triton", _triton_forward, _triton_backward, devices=triton_available_for, dtypes=KERNEL_DTYPES,
                 mask_state_like=_triton_mask_state_like)
register_backend("reference", _reference_forward, None, devices=_any_device, dtypes=FLOAT_DTYPES)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@custom_op("rslora_kernels::lora_linear_fwd")
def lora_linear_fwd(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                    scaling: float, dropout_p: float, seed: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, T, mask_state): the mask state is what the backward op needs of the dropout mask."""
    y, T, mask_state = _REGISTRY[backend].forward(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
    check_backend_output(backend, "y", y, (x2d.shape[0], weight.shape[0]))
    check_backend_output(backend, "T", T, (x2d.shape[0], lora_A.shape[0]))
    return y, T, mask_state


@lora_linear_fwd.register_fake
def _(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    M = x2d.shape[0]
    return (x2d.new_empty((M, weight.shape[0])), x2d.new_empty((M, lora_A.shape[0])),
            _REGISTRY[backend].mask_state_like(x2d, seed, dropout_p))


def _lora_linear_bwd_direct(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, mask_state, needs, backend):
    """The backward op called directly (eager): a grad that is not needed stays None (callers read
    only the grads they asked for), with no empty tensor allocated for it."""
    outs = _REGISTRY[backend].backward(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, mask_state, *needs)
    for what, out, shape, need in zip(("dx", "dA", "dB", "db"), outs,
                                      (x2d.shape, lora_A.shape, lora_B.shape, weight.shape[:1]), needs):
        if need:
            check_backend_output(backend, what, out, shape)
    return outs


@custom_op("rslora_kernels::lora_linear_bwd", direct=_lora_linear_bwd_direct)
def lora_linear_bwd(dy: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, T: Tensor,
                    scaling: float, dropout_p: float, mask_state: Tensor, needs: List[bool], backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, db); a grad that is not needed comes back as an empty tensor (None when
    called directly in eager: see :func:`_lora_linear_bwd_direct`)."""
    outs = _lora_linear_bwd_direct(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, mask_state, needs, backend)
    return tuple(o if o is not None else x2d.new_empty((0,)) for o in outs)


@lora_linear_bwd.register_fake
def _(dy, x2d, weight, lora_A, lora_B, T, scaling, dropout_p, mask_state, needs, backend):
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
    ``seed`` a 0-dim int64 tensor on x's device and ``backend`` a registered fused backend.

    Backward state: the tensors in ``ctx.saved_tensors``; ``ctx.scaling``, ``ctx.dropout_p``,
    ``ctx.backend``, ``ctx.x_shape`` (None when x is 2-D) and ``ctx.bias_dtype`` (None when the op
    has no bias)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
        # a 2-D x is used as is: reshaping it to its own shape gives the same strides, for a view's
        # host cost (here and for dy, y and dx below)
        flat = x.dim() == 2
        x_shape = x.shape
        if not flat:
            M, K = math.prod(x.shape[:-1]), x.shape[-1]  # explicit M: reshape(-1, 0) is ambiguous when K = 0
            x = x.reshape(M, K)  # a view unless the leading dims cannot be flattened by strides
        y2d, T, mask_state = lora_linear_fwd(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, T, mask_state)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.x_shape = None if flat else x_shape
        ctx.bias_dtype = bias.dtype if bias is not None else None  # None: the op has no bias
        return y2d if flat else y2d.view(*x_shape[:-1], weight.shape[0])

    @staticmethod
    @first_order_only  # no double backward: a second derivative raises instead of coming back wrong
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, T, mask_state = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        need_bias = need_bias and has_bias
        x_shape = ctx.x_shape  # None: x was 2-D
        dy2d = dy if x_shape is None else dy.reshape(x2d.shape[0], weight.shape[0])
        dx, dA, dB, db = lora_linear_bwd(dy2d, x2d, weight, lora_A, lora_B, T, ctx.scaling, ctx.dropout_p, mask_state,
                                         [need_x, need_a, need_b, need_bias], ctx.backend)
        dW = dy2d.t() @ x2d if need_w else None  # W frozen in the fast path
        if need_x and x_shape is not None:
            dx = dx.view(x_shape)
        return (dx if need_x else None, dW, dA if need_a else None, dB if need_b else None,
                db.to(ctx.bias_dtype) if need_bias else None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None  # e.g. meta: no autocast
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(x, weight, lora_A, lora_B, bias):
    """Under torch.autocast, cast x, weight and bias to the autocast dtype (as F.linear would).
    lora_A/lora_B keep a wider dtype (PEFT's fp32 adapters): the kernels read them natively."""
    dt = _autocast_dtype(x.device.type)
    if dt is None:
        return x, weight, lora_A, lora_B, bias

    def cast(t, keep_wider=False):
        if t is None or t.dtype not in _AUTOCAST_ELIGIBLE or t.dtype == dt:
            return t
        if keep_wider and torch.finfo(t.dtype).bits > torch.finfo(dt).bits:
            return t
        return t.to(dt)

    return cast(x), cast(weight), cast(lora_A, True), cast(lora_B, True), cast(bias)


def zero_seed(device: torch.device) -> Tensor:
    """The seed the backends take without dropout: one 0-dim int64 zero per device, shared by every
    call (nothing writes it, and allocating one per call cost more than the rest of seed handling;
    see :func:`rslora_kernels._runtime.shared_tensor`)."""
    return shared_tensor(device, "zero seed", lambda: torch.zeros((), dtype=torch.int64, device=device))


def seed_tensor(seed: Union[int, Tensor, None], p: float, device: torch.device) -> Tensor:
    """The dropout seed as the 0-dim int64 tensor on ``device`` the backends take: zero when
    ``p == 0`` (:func:`zero_seed`); drawn from torch's default generator when None. ``seed`` is
    checked first, even when ``p == 0``, so a bad seed never passes unnoticed in eval mode."""
    check_seed(seed, device)
    if p == 0.0:
        return zero_seed(device)
    elif seed is None:
        seed = draw_seed(device)
    elif not isinstance(seed, Tensor):
        seed = torch.tensor(as_seed_int(seed), dtype=torch.int64, device=device)
    return seed.reshape(())


class _Call(NamedTuple):
    """What a validated call's signature fixes: the backend it runs, and whether autocast can apply
    on its device (then each call checks whether autocast is on)."""
    backend: str
    device_type: str
    autocast_available: bool


def _call_key(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend):
    """Everything the checks of :func:`lora_linear` and its backend choice depend on (types, shapes,
    dtypes and devices of the tensors; the scalars with their types), or None: not all tensors, or
    under torch.compile's tracing (symbolic sizes)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return (type(x), x.shape, x.dtype, x.device, type(weight), weight.shape, weight.dtype, weight.device,
                type(lora_A), lora_A.shape, lora_A.dtype, lora_A.device,
                type(lora_B), lora_B.shape, lora_B.dtype, lora_B.device,
                None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device),
                type(scaling), scaling, type(dropout_p), dropout_p, backend)
    except AttributeError:  # not a tensor: the checks name it
        return None


def _call_plan(x_type, x_shape, x_dtype, x_device, w_type, w_shape, w_dtype, w_device, a_type, a_shape, a_dtype,
               a_device, b_type, b_shape, b_dtype, b_device, bias, scaling_type, scaling, p_type, dropout_p,
               backend) -> _Call:
    """The :class:`_Call` of a signature whose inputs passed the checks (see :func:`_call_key`)."""
    name = resolve_backend(backend, x_device, x_dtype, a_dtype,
                           autotune.Problem(math.prod(x_shape[:-1]), w_shape[0], x_shape[-1], a_shape[0], "lora",
                                            dropout_p, bias is not None))
    return _Call(name, x_device.type, torch.amp.is_autocast_available(x_device.type))


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                seed: Union[int, Tensor, None] = None, backend: str = "auto") -> Tensor:
    """Fused LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T``.

    Args:
        x: ``[..., K]``; any leading dims; strides are honoured (no copy if they flatten).
        weight: ``[N, K]`` frozen base weight, any strides (pass ``W.t()`` for fan_in_fan_out);
            or a 4-bit one (``rslora_kernels.quant.Weight4bit`` or a bitsandbytes ``Params4bit``),
            dequantized per call to x's dtype and never saved (see :mod:`rslora_kernels.ops.qlora`).
        lora_A: ``[r, K]``; lora_B: ``[N, r]`` (PEFT layouts), in x's dtype or wider (fp32).
        scaling: ``rslora_scaling(alpha, r)`` (rsLoRA) or ``lora_scaling(alpha, r)``; or a 0-d
            floating tensor on x's device or the CPU (a value that changes without a recompile
            under torch.compile and is never read on the host: see
            :func:`rslora_kernels.scaling.fold_scaling`).
        bias: ``[N]`` or None.
        dropout_p: inverted dropout on the adapter branch only; ignored when ``training=False``.
        seed: dropout seed (int in [0, 2^63) or 0-dim int64 tensor); None draws one from torch's
            default generator. The mask is ``rslora_kernels.dropout_mask(seed, x.shape, p)``.
        backend: "auto" or a registered backend ("triton", "composite", "reference", or one added
            with :func:`register_backend`). "auto" is resolved for x's device and dtype first; then
            the backend is checked: unknown name or device -> ValueError, dtype of x or the adapters
            it does not compute in -> TypeError naming both.

    Returns:
        ``[..., N]`` in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    # a call whose signature was validated before (a plain weight, no autocast) skips to the op
    if isinstance(scaling, Tensor):  # folded into B: the kernels take a float (a float costs only this check)
        lora_A, lora_B, scaling = fold_scaling(scaling, x, lora_A, lora_B)
    key = _call_key(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend)
    call = recall(_call_plan, key) if key is not None else None
    if call is not None and not (call.autocast_available and torch.is_autocast_enabled(call.device_type)):
        backend = call.backend
    else:
        # before autocast or the 4-bit dispatch read .device/.dtype: a list or an array is a named TypeError
        need_tensors(("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias))
        if is_quantized_weight(weight):
            return _quantized_entry(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, seed, backend)
        autocasting = _autocast_dtype(x.device.type) is not None
        x, weight, lora_A, lora_B, bias = autocast_inputs(x, weight, lora_A, lora_B, bias)
        validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p)
        if key is not None and not autocasting:
            backend = remember(_call_plan, key, _call_plan(*key)).backend
        else:
            backend = resolve_backend_planned(backend, x.device, x.dtype, lora_A.dtype, autotune.Problem(
                math.prod(x.shape[:-1]), weight.shape[0], x.shape[-1], lora_A.shape[0], "lora", dropout_p,
                bias is not None))
    p = float(dropout_p) if training else 0.0
    scaling = float(scaling)
    seed = seed_tensor(seed, p, x.device)
    spec = _REGISTRY[backend]
    if spec.backward is None:  # an autograd backend: plain PyTorch, differentiated by autograd
        M, K = math.prod(x.shape[:-1]), x.shape[-1]
        y2d = spec.forward(x.reshape(M, K), weight, lora_A, lora_B, bias, scaling, p, seed)
        check_backend_output(backend, "y", y2d, (M, weight.shape[0]))
        return y2d.view(*x.shape[:-1], weight.shape[0])
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, p, seed, backend)
