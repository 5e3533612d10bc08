"""A frozen 4-bit base weight in bitsandbytes' format, and its dequantization.

    W[i] = code[nibble(i)] * scale[i // blocksize]          i over W [N, K] flattened row-major
    scale[j] = absmax[j]                                      (plain)
    scale[j] = nested_code[absmax[j]] * nested_absmax[j // nested_blocksize] + nested_offset   (nested)

This is the layout of ``bitsandbytes.functional.quantize_4bit`` (``bnb.nn.Params4bit``): the packed
bytes hold element ``2i`` in the high nibble and ``2i + 1`` in the low one; ``code`` is the 16-entry
NF4 or FP4 table; blocks run over the flattened weight (a block may straddle two rows when K is not
a multiple of the blocksize). With ``compress_statistics`` ("nested absmax") the fp32 block scales
are themselves stored as 8-bit codes of bitsandbytes' dynamic map in blocks of 256, minus their mean
(``nested_offset``). Every product and sum is one fp32 operation (no fused multiply-add) and the
result is rounded once to the compute dtype: that is what ``bitsandbytes.functional.dequantize_4bit``
computes, and :func:`dequantize_4bit` reproduces it bit for bit.

The op accepts ``weight`` as a :class:`Weight4bit` or directly as a ``bnb.nn.Params4bit`` (the
``weight`` of a ``bnb.nn.Linear4bit``); :func:`as_weight4bit` converts the latter without copying.
bitsandbytes itself is only needed to build weights from its objects.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._quant_codes import QUANT_TYPES, code_table
from ._runtime import interpreting

__all__ = ["Weight4bit", "as_weight4bit", "is_quantized_weight", "dequantize_4bit", "code_table",
           "QUANT_TYPES", "BLOCKSIZES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


@dataclass(frozen=True)
class Weight4bit:
    """A frozen ``[N, K]`` weight in bitsandbytes' 4-bit format (see the module docstring).

    Fields:
        packed: uint8 ``[ceil(N*K / 2)]``, two elements per byte, high nibble first.
        absmax: per-block scales: fp32 ``[ceil(N*K / blocksize)]``, or uint8 codes when nested.
        shape: ``(N, K)``. blocksize: elements per block. quant_type: "nf4" or "fp4".
        nested_code: fp32 ``[256]`` (nested only): the 8-bit map the codes in ``absmax`` index.
        nested_absmax: fp32 ``[ceil(len(absmax) / nested_blocksize)]`` (nested only).
        nested_offset: fp32 0-dim (nested only): added to every decoded block scale.
        nested_blocksize: scales per nested block (256 in bitsandbytes); 0 when not nested.

    It holds references, never copies: building one from a ``Params4bit`` costs nothing.
    """
    packed: Tensor
    absmax: Tensor
    shape: Tuple[int, int]
    blocksize: int
    quant_type: str
    nested_code: Optional[Tensor] = None
    nested_absmax: Optional[Tensor] = None
    nested_offset: Optional[Tensor] = None
    nested_blocksize: int = 0

    def __post_init__(self):
        _check_weight4bit(self)

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def tensors(self) -> List[Tensor]:
        """The tensors, in the order :meth:`from_parts` takes them (what the custom ops carry)."""
        nested = [self.nested_code, self.nested_absmax, self.nested_offset] if self.nested else []
        return [self.packed, self.absmax, *nested]

    def meta(self) -> List[int]:
        return [self.shape[0], self.shape[1], self.blocksize, self.nested_blocksize]

    @classmethod
    def from_parts(cls, tensors: List[Tensor], meta: List[int], quant_type: str, check: bool = True) -> "Weight4bit":
        """The inverse of :meth:`tensors` and :meth:`meta`. ``check=False`` skips the consistency
        checks, for parts whose signature (dtypes, shapes, strides, devices, meta) passed them before."""
        N, K, blocksize, nested_blocksize = meta
        nested = tensors[2:] if len(tensors) == 5 else [None, None, None]
        fields = (tensors[0], tensors[1], (N, K), blocksize, quant_type, *nested, nested_blocksize)
        if check:
            return cls(*fields)
        w = object.__new__(cls)  # a frozen dataclass: its fields set as its __init__ sets them
        for f, v in zip(_FIELDS, fields):
            object.__setattr__(w, f, v)
        return w

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "Weight4bit":
        """From a ``bnb.nn.Params4bit`` (its own ``quant_state``), or packed data plus a
        ``bitsandbytes.functional.QuantState`` (what ``quantize_4bit`` returns)."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("weight has no bitsandbytes quant_state: quantize it first (a bnb.nn.Params4bit is "
                             "quantized when moved to a device, e.g. linear.to('cpu') or .cuda())")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this bitsandbytes weight was repacked for bitsandbytes' CPU inference kernel "
                             "(packing_format_for_cpu, done by Linear4bit.forward in eval mode without grad); "
                             "that layout is not the 4-bit format: use a weight that was not run that way")
        shape = tuple(int(s) for s in qs.shape)
        if len(shape) != 2:
            raise ValueError(f"a 4-bit weight must be 2-D [N, K]; its quant_state has shape {list(shape)}")
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        packed = packed.reshape(-1).view(torch.uint8)  # quant_storage may be another dtype (FSDP): same bytes
        absmax = qs.absmax
        if qs.nested:
            s2 = qs.state2
            return cls(packed, absmax, shape, int(qs.blocksize), qs.quant_type, s2.code.float(), s2.absmax.float(),
                       qs.offset.float().reshape(()), int(s2.blocksize))
        return cls(packed, absmax.float(), shape, int(qs.blocksize), qs.quant_type)


_FIELDS = tuple(f.name for f in dataclasses.fields(Weight4bit))


def _check_weight4bit(w: Weight4bit) -> None:
    """Clear errors for an inconsistent 4-bit weight, before any kernel runs."""
    if w.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {w.quant_type!r}")
    if w.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {w.blocksize}")
    if len(w.shape) != 2 or min(w.shape) < 0:
        raise ValueError(f"shape must be (N, K), got {w.shape}")
    n = w.shape[0] * w.shape[1]
    blocks = -(-n // w.blocksize)
    if w.packed.dtype != torch.uint8 or w.packed.dim() != 1 or w.packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 [{(n + 1) // 2}] for shape {w.shape}; "
                         f"got {w.packed.dtype} {list(w.packed.shape)}")
    if not w.packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    nested_parts = (w.nested_code, w.nested_absmax, w.nested_offset)
    if any(t is None for t in nested_parts) != all(t is None for t in nested_parts):
        raise ValueError("nested_code, nested_absmax and nested_offset must be given together (or none)")
    want = torch.uint8 if w.nested else torch.float32
    if w.absmax.dtype != want or w.absmax.dim() != 1 or w.absmax.numel() != blocks or not w.absmax.is_contiguous():
        raise ValueError(f"absmax must be contiguous {want} [{blocks}] (blocksize {w.blocksize}"
                         f"{', nested' if w.nested else ''}); got {w.absmax.dtype} {list(w.absmax.shape)}")
    if w.nested:
        if w.nested_blocksize < 1:
            raise ValueError(f"nested_blocksize must be >= 1 when nested, got {w.nested_blocksize}")
        nblocks = -(-blocks // w.nested_blocksize)
        for name, t, shape in (("nested_code", w.nested_code, (256,)), ("nested_absmax", w.nested_absmax, (nblocks,)),
                               ("nested_offset", w.nested_offset, ())):
            if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous float32 {list(shape)}; got {t.dtype} {list(t.shape)}")
    for name, t in (("absmax", w.absmax), *((n_, t_) for n_, t_ in zip(
            ("nested_code", "nested_absmax", "nested_offset"), nested_parts) if t_ is not None)):
        if t.device != w.packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {w.packed.device}")


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def is_quantized_weight(weight) -> bool:
    """A :class:`Weight4bit` or a bitsandbytes ``Params4bit`` (a Tensor subclass carrying ``quant_state``)."""
    if type(weight) in _PLAIN_TENSORS:  # the common case, answered first: every layer asks on every call
        return False
    return isinstance(weight, Weight4bit) or (
        isinstance(weight, Tensor) and type(weight).__name__ == "Params4bit" and hasattr(weight, "quant_state"))


def as_weight4bit(weight) -> Weight4bit:
    """``weight`` as a :class:`Weight4bit` (a ``Params4bit`` is wrapped without copying)."""
    if isinstance(weight, Weight4bit):
        return weight
    if is_quantized_weight(weight):
        return Weight4bit.from_bnb(weight)
    raise TypeError(f"expected a Weight4bit or a bitsandbytes Params4bit, got {type(weight).__name__}")


# ----------------------------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------------------------
_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)


def _scale_blocks_(values: Tensor, scales: Tensor, blocksize: int) -> Tensor:
    """fp32 ``values[i] *= scales[i // blocksize]`` in place (the last block may be partial)."""
    n = values.numel()
    full = (n // blocksize) * blocksize
    values[:full].view(-1, blocksize).mul_(scales[:full // blocksize, None])
    if full < n:
        values[full:].mul_(scales[full // blocksize])
    return values


def block_scales(w: Weight4bit) -> Tensor:
    """The fp32 per-block scales (the nested codes decoded: ``code[q] * absmax2``, then ``+ offset``)."""
    if not w.nested:
        return w.absmax
    decoded = _scale_blocks_(w.nested_code[w.absmax.long()], w.nested_absmax, w.nested_blocksize)
    return decoded.add_(w.nested_offset)


def _dequantize_torch(w: Weight4bit, dtype: torch.dtype) -> Tensor:
    """Plain PyTorch: a 256-entry (high, low) pair table indexed by the packed bytes."""
    code = code_table(w.quant_type, w.device)
    byte = torch.arange(256, device=w.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)
    values = pairs[w.packed.long()].view(-1)[:w.numel]  # a fresh fp32 tensor: scaled in place
    return _scale_blocks_(values, block_scales(w), w.blocksize).to(dtype).view(w.shape)


def _bnb_cpu_kernel_exact(w: Weight4bit) -> bool:
    """bitsandbytes' native CPU kernel (0.50) indexes blocks per row: it is exact only when every
    row starts a block (K a multiple of the blocksize); other even K get wrong scales."""
    return w.device.type == "cpu" and w.shape[1] % w.blocksize == 0


def _dequantize_bnb_cpu(w: Weight4bit, dtype: torch.dtype) -> Optional[Tensor]:
    """bitsandbytes' own CPU kernel (about 2.5x faster than the PyTorch path), or None without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return None
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        w.packed, block_scales(w), w.blocksize, w.quant_type, list(w.shape), dtype)


def dequantize_4bit(weight, dtype: torch.dtype, out: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """``weight`` (a :class:`Weight4bit` or ``Params4bit``) as a dense ``[N, K]`` tensor of ``dtype``.

    ``impl``: "triton" (the Triton kernel; CUDA, or the CPU under ``TRITON_INTERPRET=1``), "torch"
    (plain PyTorch), or "auto": Triton on CUDA; on the CPU bitsandbytes' native kernel where it is
    exact (K a multiple of the blocksize; about 2.5x faster than PyTorch), else PyTorch. All give
    the format's values bit for bit (bitsandbytes 0.50's CPU kernel itself is wrong for even K
    that is not a multiple of the blocksize: it starts a block at every row). ``out``: a contiguous ``[N, K]`` buffer of ``dtype`` to fill.
    """
    w = as_weight4bit(weight)
    if dtype not in _FLOAT_OUT:
        raise TypeError(f"dtype must be one of {_FLOAT_OUT}, got {dtype}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if out is not None and (out.dtype != dtype or tuple(out.shape) != tuple(w.shape) or not out.is_contiguous()
                            or out.device != w.device):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(w.shape)} on {w.device}")
    if impl == "auto":
        if w.device.type == "cuda":
            impl = "triton"
        elif _bnb_cpu_kernel_exact(w):
            dense = _dequantize_bnb_cpu(w, dtype)
            if dense is not None:
                return dense if out is None else out.copy_(dense)
    if impl == "triton":
        if not (w.device.type == "cuda" or (w.device.type == "cpu" and interpreting())):
            raise ValueError(f"impl='triton' cannot run on {w.device.type} tensors (set TRITON_INTERPRET=1 on the CPU)")
        from .ops.dequant_kernel import dequantize_4bit_triton

        return dequantize_4bit_triton(w, dtype, out)
    dense = _dequantize_torch(w, dtype)
    return dense if out is None else out.copy_(dense)
