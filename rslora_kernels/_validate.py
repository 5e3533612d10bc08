"""Input validation shared by every backend: clear errors before any kernel runs.

What a particular backend accepts (device, dtypes) is checked by the backend registry
(:func:`rslora_kernels.ops.lora_linear.resolve_backend`) once "auto" has been resolved."""
from __future__ import annotations

import math
import numbers

import torch

from .dropout import SEED_BOUND, as_seed_int, check_dropout_p


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _need_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def need_tensors(*named) -> None:
    """``TypeError`` naming the first of ``(name, value)`` that is not a floating tensor (None
    skipped): run before anything reads ``.device`` or ``.dtype`` (autocast, 4-bit dispatch)."""
    for name, t in named:
        if t is not None:
            _need_tensor(name, t)


def check_seed(seed, device: torch.device) -> None:
    """The op's ``seed``: None, an int in [0, 2^63), or a one-element int64 tensor on ``device``
    holding such a value; checked whatever ``dropout_p`` and ``training`` are. A tensor's value is
    read only on the CPU and outside ``torch.compile``: on a GPU reading it would synchronize."""
    if seed is None:
        return
    if not isinstance(seed, torch.Tensor):
        as_seed_int(seed)
        return
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise TypeError(f"seed tensor must be a one-element int64 tensor on {device}, "
                        f"got {seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")
    if seed.device.type == "cpu" and not torch.compiler.is_compiling():
        value = int(seed.item())
        if not 0 <= value < SEED_BOUND:
            raise ValueError(f"seed must be in [0, 2^63), got tensor({value})")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming it when it is malformed or a CUDA
    device on a machine without CUDA (instead of torch's AssertionError deep inside a factory)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda', "
                         f"got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={str(dev)!r} but CUDA is not available here (torch.cuda.is_available() "
                         "is False); use 'cpu'")
    return dev


def check_real(name: str, value) -> float:
    """A finite real number (int, float, numpy scalar; not bool, str, None or a tensor) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_backend_output(backend: str, what: str, t, shape) -> None:
    """``ValueError`` naming a registered backend whose ``what`` is not a tensor of ``shape``
    (a wrong shape would otherwise surface as a bare ``view`` error, or not at all)."""
    if type(t) is torch.Tensor and t.shape == shape:  # the usual answer, first: every call asks several times
        return
    shape = tuple(shape)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"backend {backend!r} returned {what} of shape {got}; expected "
                         f"[{', '.join(str(s) for s in shape)}]")


def validate_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the op's inputs are inconsistent.

    Contract: x ``[..., K]``; weight ``[N, K]``; lora_A ``[r, K]`` with r >= 1; lora_B ``[N, r]``;
    bias ``[N]`` or None; all on x's device; weight and bias in x's dtype; lora_A and lora_B in one
    dtype (x's, or a wider one such as PEFT's float32 adapters); scaling a finite real number or a 0-d
    floating tensor (:func:`check_scaling`); 0 <= dropout_p < 1.
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _need_tensor(name, t)
    if bias is not None:
        _need_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K], got a 0-dim tensor")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, K] with K = x.shape[-1] = {K}; got {_shape(weight)}")
    N = weight.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [r, K] with K = x.shape[-1] = {K}; got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows; got shape {_shape(lora_A)}")
    if lora_B.dim() != 2 or lora_B.shape != (N, r):
        raise ValueError(f"lora_B must have shape [N, r] = [{N}, {r}] (N from weight, r from lora_A); got {_shape(lora_B)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"bias must have shape [N] = [{N}] (N from weight); got {_shape(bias)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if torch.finfo(lora_A.dtype).bits < torch.finfo(x.dtype).bits:
        raise TypeError(f"lora_A/lora_B dtype {lora_A.dtype} is narrower than x's dtype {x.dtype}; "
                        "use x's dtype or a wider one (e.g. float32 adapters)")
    check_scaling(scaling, x.device)
    check_dropout_p(dropout_p)


def check_scaling(scaling, device: torch.device) -> None:
    """The op's ``scaling``: a finite real number, or a 0-d floating tensor on ``device`` or the
    CPU. A tensor's value is not read (on a GPU that would synchronize, and under torch.compile it
    would specialize the graph on it): a NaN or Inf in it propagates into the result, as it does in
    the reference."""
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 0:
            raise ValueError(f"scaling must be a float or a 0-d tensor, got a tensor of shape {_shape(scaling)}")
        if not scaling.is_floating_point():
            raise TypeError(f"scaling tensor must be floating-point, got {scaling.dtype}")
        if scaling.device != device and scaling.device.type != "cpu":
            raise ValueError(f"scaling is on {scaling.device} but x is on {device}; a scaling tensor must be on "
                             "x's device or the CPU")
        return
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be a finite float or a 0-d tensor, got {scaling!r}")


def validate_magnitude(magnitude, weight, x) -> None:
    """DoRA's magnitude vector: a floating ``[N]`` tensor on x's device, x's dtype or wider."""
    _need_tensor("magnitude", magnitude)
    N = weight.shape[0]
    if magnitude.dim() != 1 or magnitude.shape[0] != N:
        raise ValueError(f"magnitude must have shape [N] = [{N}] (N from weight); got {_shape(magnitude)}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}; all tensors must share a device")
    if torch.finfo(magnitude.dtype).bits < torch.finfo(x.dtype).bits:
        raise TypeError(f"magnitude dtype {magnitude.dtype} is narrower than x's dtype {x.dtype}; "
                        "use x's dtype or a wider one (PEFT keeps it in float32)")
