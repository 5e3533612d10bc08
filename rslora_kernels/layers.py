"""nn.Module layers built on the fused op (PEFT-compatible parameter names and init)."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_device
from .ops.dora import dora_linear, dora_merge_, dora_row_norms
from .ops.lora_linear import check_backend_name, lora_linear
from .ops.merge import merge_lora_
from .quant import is_quantized_weight
from .scaling import lora_scaling, rslora_scaling

__all__ = ["LoRALinear"]


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype ``base`` computes in: its weight's; for a bitsandbytes 4-bit linear its
    ``compute_dtype``, else the dtype its weight was quantized from."""
    w = base.weight
    if is_quantized_weight(w):
        qs = getattr(w, "quant_state", None)
        return getattr(base, "compute_dtype", None) or (qs.dtype if qs is not None else torch.float32)
    return w.dtype


def check_adapter_args(r, alpha, dropout, rank_stabilized: bool, backend) -> float:
    """Check the adapter's arguments (shared by :class:`LoRALinear` and :func:`~rslora_kernels.inject`,
    which checks them before it touches the model); returns the scaling they give."""
    scaling = rslora_scaling(alpha, r) if rank_stabilized else lora_scaling(alpha, r)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    check_backend_name(backend)  # device and dtypes are checked per call, once "auto" is resolved
    return scaling


def check_base(base: nn.Module, use_dora: bool, name: str = "base_layer") -> None:
    """A base the adapter can wrap: a float ``nn.Linear`` or a 4-bit one (not with DoRA)."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(base).__name__}")
    w = base.weight
    if not (w.is_floating_point() or is_quantized_weight(w)):
        raise TypeError(f"{name} must be a float nn.Linear or a bitsandbytes Linear4bit; "
                        f"{type(base).__name__} has a {w.dtype} weight")
    if use_dora and is_quantized_weight(w):
        raise TypeError("use_dora=True needs a 16/32-bit base weight; DoRA on a 4-bit base is not supported")


# nn.Module's attribute lookup of a submodule or parameter (__getattr__, reached only after the
# ordinary lookup fails) costs about as much host time per call as the rest of a fused layer's Python:
# forward reads the registries that lookup ends in. A name that is not registered there (e.g. a
# weight replaced by a parametrization) takes the ordinary lookup.
def _submodule(module: nn.Module, name: str) -> nn.Module:
    modules = module._modules
    return modules[name] if name in modules else getattr(module, name)


def _param(module: nn.Module, name: str):
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class LoRALinear(nn.Module):
    """A frozen base linear plus a LoRA adapter: ``y = base(x) + s * lora_B(lora_A(dropout(x)))``.

    Shapes: x ``[..., in_features]`` -> y ``[..., out_features]``. The whole layer is one call of
    :func:`rslora_kernels.lora_linear` (fused kernels; dropout only on the adapter branch).

    Parameters use PEFT's names and layouts: ``base_layer.weight [N, K]``, ``base_layer.bias [N]``,
    ``lora_A.weight [r, K]``, ``lora_B.weight [N, r]``. Init as PEFT: A kaiming-uniform
    (a = sqrt(5)), B zeros, so a fresh layer computes exactly ``base(x)``.
    ``s = alpha / sqrt(r)`` when ``rank_stabilized`` (rsLoRA) else ``alpha / r``.

    ``state_dict`` keys are PEFT's saved-adapter keys (``lora_A.weight``; inside a live PEFT model
    they read ``lora_A.<adapter>.weight``): :func:`rslora_kernels.peft.to_peft_state_dict` and
    :func:`~rslora_kernels.peft.from_peft_state_dict` map between the two.

    ``scaling`` (``s``, a float) may be replaced by a 0-d floating tensor on the layer's device or
    the CPU (``layer.scaling = torch.tensor(s)``, as PEFT's compiled hotswap does): forward then
    folds it into B (:func:`rslora_kernels.scaling.fold_scaling`), so a new value written into it
    needs no recompile under torch.compile and is never read on the host; merge and unmerge read it.

    :meth:`merge` folds ``s * B @ A`` into the base weight in place (forward is then the plain
    linear, ``merged`` is True); :meth:`unmerge` takes it out again. A state_dict saved while merged
    holds the merged weight, as in PEFT.

    Args:
        in_features, out_features: K and N. r: adapter rank (>= 1). alpha: adapter alpha.
        dropout: adapter-branch dropout probability in [0, 1) (active in ``train()`` mode).
        bias: whether the base linear has a bias. rank_stabilized: rsLoRA scaling (default).
        backend: op backend: "auto" or a registered name ("triton", "composite", "reference", or
            one added with :func:`rslora_kernels.register_backend`).
        device, dtype: of the base linear (and of the adapters unless ``adapter_dtype`` is given).
        adapter_dtype: dtype of lora_A / lora_B, e.g. torch.float32 next to a bf16 base (as PEFT).
        base_layer: wrap this existing ``nn.Linear`` instead of creating one (it is frozen); a
            bitsandbytes ``Linear4bit`` works too (QLoRA: its 4-bit weight is dequantized per call
            in its ``compute_dtype``, never stored dense; no merge).
        use_dora: DoRA (PEFT's ``use_dora=True``): a trainable ``lora_magnitude_vector.weight [N]``
            (adapter dtype) initialised, as PEFT does, to the row norms of ``W + s B A`` (= of W,
            B being zero); forward is :func:`rslora_kernels.dora_linear`, merge/unmerge are PEFT's.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, rank_stabilized: bool = True, backend: str = "auto",
                 device=None, dtype=None, adapter_dtype=None, base_layer: Optional[nn.Linear] = None,
                 use_dora: bool = False):
        super().__init__()
        # every check before anything is created or the caller's base_layer is frozen
        self.scaling = check_adapter_args(r, alpha, dropout, rank_stabilized, backend)
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{what} must be an integer >= 0, got {n!r}")
        if device is not None:
            check_device(device)
        if base_layer is not None:
            check_base(base_layer, use_dora)
            if (base_layer.in_features, base_layer.out_features) != (in_features, out_features):
                raise ValueError(f"base_layer is {base_layer.in_features} -> {base_layer.out_features} but "
                                 f"in_features, out_features = {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.rank_stabilized, self.backend = rank_stabilized, backend
        self.merged = False
        self.base_layer = base_layer if base_layer is not None else nn.Linear(
            in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.base_layer.requires_grad_(False)
        w = self.base_layer.weight
        adapter_dtype = adapter_dtype or dtype or _compute_dtype(self.base_layer)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=w.device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=w.device, dtype=adapter_dtype)
        self.use_dora = bool(use_dora)
        if self.use_dora:  # a module with .weight, so state_dict keys read PEFT's "lora_magnitude_vector.weight"
            self.lora_magnitude_vector = nn.Module()
            self.lora_magnitude_vector.weight = nn.Parameter(torch.empty(out_features, device=w.device, dtype=adapter_dtype))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    rank_stabilized: bool = True, backend: str = "auto", adapter_dtype=None,
                    use_dora: bool = False) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` (kept as ``base_layer``, frozen, weights shared) with a
        fresh adapter on the linear's device, in its dtype unless ``adapter_dtype`` is given.
        A bitsandbytes ``Linear4bit`` (quantized, e.g. after ``.to(device)``) is accepted: the
        adapters then default to its compute dtype (else the dtype it was quantized from)."""
        check_base(linear, use_dora, "linear")
        return cls(linear.in_features, linear.out_features, r, alpha, dropout, linear.bias is not None,
                   rank_stabilized, backend, adapter_dtype=adapter_dtype, base_layer=linear, use_dora=use_dora)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform with a = sqrt(5), B zeros (DoRA: magnitude = row
        norms of ``W + s B A``)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            norms = dora_row_norms(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, float(self.scaling))
            self.lora_magnitude_vector.weight.copy_(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = _submodule(self, "base_layer")
        weight, bias = _param(base, "weight"), _param(base, "bias")
        if self.merged:
            return F.linear(x, weight, bias)
        if is_quantized_weight(weight):
            return self._forward_4bit(x)
        lora_A, lora_B = _param(_submodule(self, "lora_A"), "weight"), _param(_submodule(self, "lora_B"), "weight")
        if self.use_dora:
            return dora_linear(x, weight, lora_A, lora_B, self.lora_magnitude_vector.weight, self.scaling, bias=bias,
                               dropout_p=self.dropout, training=self.training, backend=self.backend)
        return lora_linear(x, weight, lora_A, lora_B, self.scaling, bias=bias, dropout_p=self.dropout,
                           training=self.training, backend=self.backend)

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        """As ``bnb.nn.Linear4bit`` does: compute in its ``compute_dtype`` (x's dtype if unset), cast back."""
        dt = getattr(self.base_layer, "compute_dtype", None) or x.dtype
        bias = self.base_layer.bias
        y = lora_linear(x.to(dt), self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                        bias=None if bias is None else bias.to(dt), dropout_p=self.dropout, training=self.training,
                        backend=self.backend)
        return y.to(x.dtype)

    def merge(self) -> None:
        """``W += s * B @ A`` in place (Triton kernel on CUDA / under the interpreter, else a chunked
        PyTorch loop): fp32 arithmetic, one rounding to W's dtype, no N x K temporary.
        Afterwards forward is the plain linear (no dropout). Merging twice warns and does nothing."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing to do", stacklevel=2)
            return
        if is_quantized_weight(self.base_layer.weight):
            raise TypeError("LoRALinear.merge(): the base is 4-bit; folding the adapter into it would "
                            "re-quantize the weight (lossy, not reversible). Keep the adapter separate.")
        if self.use_dora:  # PEFT's DoRA merge; the norms of the unmerged weight are kept to unmerge with
            self._dora_merge_norms = dora_row_norms(self.base_layer.weight, self.lora_A.weight,
                                                    self.lora_B.weight, float(self.scaling))
            dora_merge_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                        self.lora_magnitude_vector.weight, float(self.scaling), self._dora_merge_norms)
        else:
            merge_lora_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, 1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W -= s * B @ A`` in place. In bf16/fp16 this returns W only to within one rounding step
        per element (see :mod:`rslora_kernels.ops.merge`); in fp32 up to fp32 arithmetic error."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        if self.use_dora:
            dora_merge_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                        self.lora_magnitude_vector.weight, float(self.scaling), self._dora_merge_norms, unmerge=True)
            del self._dora_merge_norms
        else:
            merge_lora_(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, -1.0)
        self.merged = False

    def extra_repr(self) -> str:
        kind = "alpha/sqrt(r)" if self.rank_stabilized else "alpha/r"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g} ({kind}), dropout={self.dropout}, "
                f"backend={self.backend!r}" + (", use_dora=True" if self.use_dora else "")
                + (", merged=True" if self.merged else ""))
