"""Run Hugging Face PEFT LoRA models on the fused op: ``patch`` / ``unpatch``, state_dict key maps.

    import rslora_kernels as rk
    n = rk.peft.patch(peft_model)     # every supported peft LoRA Linear now calls rk.lora_linear
    rk.peft.unpatch(peft_model)       # PEFT's own forward again

``patch`` sets an instance-level ``forward`` on each supported ``peft.tuners.lora.Linear`` layer;
parameters, state_dict, adapters, ``save_pretrained`` and every PEFT method are untouched, and
``unpatch`` deletes that attribute, which restores PEFT's class forward exactly.

What the patched forward reads from PEFT, per call:

* scaling: ``layer.scaling[adapter]`` (so ``use_rslora`` True and False both work, and so does
  ``set_scale``); dropout: ``layer.lora_dropout[adapter]`` (``nn.Dropout`` p in train mode,
  ``nn.Identity`` = 0); bias: the base layer's; W: the base layer's weight, transposed as a view
  for ``fan_in_fan_out`` (GPT-2 ``Conv1D``), since the op takes W with any strides.
* dtypes: adapters stay in their own dtype (PEFT keeps them in fp32 by default); the op reads
  fp32 A/B next to bf16/fp16 x natively. PEFT upcasts x to the adapter dtype for the adapter
  branch; the op keeps x's dtype and accumulates in fp32, so in bf16 the two differ by rounding.
* dropout masks come from the project's Philox stream (``rslora_kernels.dropout_mask``) with a
  seed drawn from torch's default generator, not from ``nn.Dropout``.

Per call, PEFT's own forward runs instead when the layer is in a state PEFT handles specially:
adapters disabled (``disable_adapter()``), merged, an ``adapter_names=`` mixed batch, extra
arguments, a different active adapter set, x's dtype differing from W's outside autocast, or
adapters narrower than x; for DoRA layers also under autocast.

DoRA layers (``use_dora=True``, PEFT's ``DoraLinearVariant``) run :func:`rslora_kernels.dora_linear`
with the layer's ``lora_magnitude_vector[adapter].weight``: PEFT's formula, dropout on or off, the
weight norms without PEFT's [out, in] matrix (see docs/dora.md).

QLoRA: PEFT's ``lora.bnb.Linear4bit`` layers (a bitsandbytes ``Linear4bit`` base, NF4/FP4, nested
absmax or not) are fused too: the op dequantizes the 4-bit weight per call, in the layer's
``compute_dtype``, and never saves it (:mod:`rslora_kernels.ops.qlora`). ``lora.bnb.Linear8bitLt``
(8-bit bases) stays on PEFT's forward, with a warning that says so.

Layers ``patch`` leaves on PEFT's forward, with one warning naming each reason: LoRA layers that
are not a plain ``lora.Linear`` or ``lora.bnb.Linear4bit`` (Embedding, Conv, 8-bit bnb, gptq/... classes), bases other
than ``nn.Linear`` / ``Conv1D`` or with non-float weights, LoRA variants other than DoRA (and DoRA on a
4-bit base, which runs PEFT's forward),
``lora_bias``, several active adapters, dropout modules other than ``nn.Dropout``, merged layers.
"""
from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

from ._siblings import SiblingGroup
from .ops.dora import dora_linear
from .ops.lora_linear import check_backend_name, lora_linear
from .quant import is_quantized_weight

__all__ = ["patch", "unpatch", "is_patched", "to_peft_state_dict", "from_peft_state_dict"]

# weights the op reads; whether the layer's backend computes in that dtype is checked per call by the
# backend registry (float64 runs on "auto" -> composite/reference, and is a TypeError for "triton")
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTR = "_rslora_kernels_patch"  # (adapter name, backend) on a patched layer
_SIBLINGS = "_rslora_kernels_siblings"  # the SiblingGroup of a layer patched with fuse_siblings=True


def _lora_module():
    try:
        from peft.tuners.lora import layer as lora_layer  # the Hugging Face package (absolute import)
    except ImportError as e:  # pragma: no cover - peft is an optional extra
        raise ImportError("rslora_kernels.peft needs the 'peft' package: pip install 'rslora-kernels[peft]'") from e
    return lora_layer


def _lora_bnb_classes():
    """PEFT's bitsandbytes LoRA layers (Linear4bit, Linear8bitLt); None for those that do not exist
    (PEFT defines them only when bitsandbytes is installed)."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # pragma: no cover - bitsandbytes is an optional extra
        return None, None
    return getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight [in, out], y = x W + b)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _unsupported_reason(layer, lora_layer) -> Optional[str]:
    """Why ``layer`` (a peft LoraLayer) cannot take the fused forward; None if it can."""
    lora_4bit, lora_8bit = _lora_bnb_classes()
    quantized = lora_4bit is not None and type(layer) is lora_4bit
    if lora_8bit is not None and type(layer) is lora_8bit:
        return ("LoRA layer type Linear8bitLt (bitsandbytes 8-bit base: LLM.int8's outlier matmul is not "
                "a dequantize-then-GEMM, so it is not fused; 4-bit Linear4bit bases are)")
    if type(layer) is not lora_layer.Linear and not quantized:
        return f"LoRA layer type {type(layer).__name__} (only peft lora.Linear and lora.bnb.Linear4bit are fused)"
    base = layer.get_base_layer()
    if quantized:
        if not is_quantized_weight(base.weight):
            return f"base layer type {type(base).__name__} under a 4-bit LoRA layer (expected a bitsandbytes Linear4bit)"
    elif not (type(base) is nn.Linear or (_is_conv1d(base) and layer.fan_in_fan_out)):
        return f"base layer type {type(base).__name__} (quantized or custom bases are not supported)"
    elif base.weight.dtype not in _FLOAT_WEIGHTS:
        return f"base weight dtype {base.weight.dtype}"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (exactly one is supported)"
    adapter = active[0]
    if layer.use_dora.get(adapter, False) and not _is_dora(layer, adapter):
        return "DoRA without PEFT's DoraLinearVariant (older PEFT)"
    if quantized and _is_dora(layer, adapter):
        return "DoRA on a 4-bit base (QLoRA + DoRA is not fused)"
    if adapter in getattr(layer, "lora_variant", {}) and not _is_dora(layer, adapter):
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}"
    if layer.lora_A[adapter].weight.dtype not in _FLOAT_WEIGHTS:
        return f"adapter dtype {layer.lora_A[adapter].weight.dtype}"
    if layer.merged:
        return "merged adapter (unmerge before patching)"
    return None


def _is_dora(layer, adapter: str) -> bool:
    """A PEFT DoRA linear adapter (``use_dora=True``), which the fused forward runs as ``rk.dora_linear``."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return type(variant).__name__ == "DoraLinearVariant" and adapter in layer.lora_magnitude_vector


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward installed by :func:`patch` (``self`` is a peft ``lora.Linear``)."""
    adapter, backend = getattr(self, _ATTR)
    base = self.get_base_layer()
    A = self.lora_A[adapter].weight if adapter in self.lora_A else None
    dev = x.device.type
    quantized = is_quantized_weight(base.weight)
    # a 4-bit base computes in its compute_dtype (x's dtype until bitsandbytes sets it)
    base_dtype = (getattr(base, "compute_dtype", None) or x.dtype) if quantized else base.weight.dtype
    usable = (
        not args and not kwargs and not self.disable_adapters and not self.merged and A is not None
        and list(self.active_adapters) == [adapter]
        and (x.dtype == base_dtype or torch.is_autocast_enabled(dev))
        and (torch.is_autocast_enabled(dev) or torch.finfo(A.dtype).bits >= torch.finfo(x.dtype).bits)
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (eval, no grad): not our format
        and not (quantized and getattr(base.weight.quant_state, "packing_format_for_cpu", False))
    )
    dora = usable and _is_dora(self, adapter)
    if dora:  # dora_linear does no autocast casting; its magnitude must be as wide as x; no 4-bit bases
        m = self.lora_magnitude_vector[adapter].weight
        usable = (not quantized and not torch.is_autocast_enabled(dev)
                  and torch.finfo(m.dtype).bits >= torch.finfo(x.dtype).bits)
    if not usable:  # a state PEFT handles specially: run PEFT's own forward
        return type(self).forward(self, x, *args, **kwargs)
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    bias = base.bias.to(x.dtype) if quantized and base.bias is not None else base.bias  # as Linear4bit does
    drop = self.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    if dora:
        return dora_linear(x, weight, A, self.lora_B[adapter].weight, m, self.scaling[adapter], bias=bias,
                           dropout_p=p, training=p > 0.0, backend=backend)
    member = (weight, A, self.lora_B[adapter].weight, self.scaling[adapter], bias, p)
    siblings = getattr(self, _SIBLINGS, None)
    if siblings is not None and not quantized:  # fuse_siblings: the group's output, when it has one for x
        y = siblings.output(self, x, member)
        if y is not None:
            return y
    return lora_linear(x, weight, A, member[2], member[3], bias=bias, dropout_p=p, training=p > 0.0, backend=backend)


def _sibling_member(layer, x: torch.Tensor):
    """(weight, lora_A, lora_B, scaling, bias, p) of ``layer`` for a plain fused LoRA call on x, or
    None when the layer would take another path (PEFT's forward, DoRA, a 4-bit base): such a
    member is left out of its sibling group and runs alone."""
    adapter, _ = getattr(layer, _ATTR)
    base = layer.get_base_layer()
    if (layer.disable_adapters or layer.merged or adapter not in layer.lora_A or list(layer.active_adapters) != [adapter]
            or is_quantized_weight(base.weight) or _is_dora(layer, adapter)):
        return None
    A = layer.lora_A[adapter].weight
    dev = x.device.type
    if not (x.dtype == base.weight.dtype or torch.is_autocast_enabled(dev)):
        return None
    if not torch.is_autocast_enabled(dev) and torch.finfo(A.dtype).bits < torch.finfo(x.dtype).bits:
        return None
    drop = layer.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    return weight, A, layer.lora_B[adapter].weight, layer.scaling[adapter], base.bias, p


def _need_module(peft_model) -> None:
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module (a PeftModel), got {type(peft_model).__name__}")


def is_patched(layer: nn.Module) -> bool:
    """Whether ``layer`` currently runs the fused forward installed by :func:`patch`."""
    return hasattr(layer, _ATTR) and "forward" in vars(layer)


def patch(peft_model: nn.Module, backend: str = "auto", fuse_siblings: bool = False) -> int:
    """Switch every supported PEFT LoRA ``Linear`` layer in ``peft_model`` to the fused op.

    Args:
        peft_model: a ``PeftModel`` or any module holding peft LoRA layers.
        backend: op backend for the patched layers: "auto" or a registered name (see
            :func:`rslora_kernels.register_backend`).
        fuse_siblings: the layers patched by this call that share a parent module (q/k/v_proj,
            gate/up_proj) run as one :func:`rslora_kernels.lora_linear_group` when they are called
            with the same input tensor (found at run time, no per-model code; see
            :mod:`rslora_kernels._siblings` and docs/group.md). Off by default.

    Returns:
        The number of layers switched by this call (already patched layers are left as they are
        and not counted). Unsupported layers keep PEFT's forward; one ``UserWarning`` lists the
        reasons and the layers affected. A model without any PEFT LoRA layer also warns.
    """
    _need_module(peft_model)
    check_backend_name(backend)
    lora_layer = _lora_module()
    patched = found = 0
    skipped: Dict[str, List[str]] = defaultdict(list)
    by_parent: Dict[str, List[nn.Module]] = defaultdict(list)  # fuse_siblings: parent name -> its patched layers
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        found += 1
        if is_patched(module):
            continue
        reason = _unsupported_reason(module, lora_layer)
        if reason is not None:
            skipped[reason].append(name)
            continue
        adapter = [a for a in module.active_adapters if a in module.lora_A][0]
        setattr(module, _ATTR, (adapter, backend))
        module.forward = functools.partial(_fused_forward, module)  # picklable, unlike a bound method
        patched += 1
        if fuse_siblings:
            by_parent[name.rpartition(".")[0]].append(module)
    for parent, layers in by_parent.items():
        if len(layers) > 1:
            group = SiblingGroup(peft_model.get_submodule(parent), layers, _sibling_member, backend)
            for layer in layers:
                setattr(layer, _SIBLINGS, group)
    if skipped:
        lines = [f"  {reason}: {len(names)} layer(s), e.g. {', '.join(names[:3])}" for reason, names in skipped.items()]
        warnings.warn("rslora_kernels.peft.patch: these LoRA layers keep PEFT's forward:\n" + "\n".join(lines),
                      stacklevel=2)
    if not found:
        warnings.warn(f"rslora_kernels.peft.patch: no PEFT LoRA layers found in the {type(peft_model).__name__} "
                      "passed as peft_model (patch a model returned by peft.get_peft_model); nothing patched",
                      stacklevel=2)
    return patched


def unpatch(peft_model: nn.Module) -> int:
    """Restore PEFT's forward on every layer :func:`patch` switched; returns how many."""
    _need_module(peft_model)
    restored = 0
    for module in peft_model.modules():
        if is_patched(module):
            del module.forward
            delattr(module, _ATTR)
            group = vars(module).pop(_SIBLINGS, None)
            if group is not None:
                group.remove()  # the parent's hooks (idempotent: once per group is enough)
            restored += 1
    return restored


# ----------------------------------------------------------------------------------------------
# state_dict keys: LoRALinear / PEFT saved adapters use "...lora_A.weight"; a live PeftModel uses
# "base_model.model....lora_A.<adapter>.weight" (and "...base_layer.weight" in both).
# ----------------------------------------------------------------------------------------------
_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def to_peft_state_dict(state_dict: Dict[str, torch.Tensor], adapter_name: str = "default",
                       prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """Keys of a model holding :class:`rslora_kernels.LoRALinear` layers -> a ``PeftModel``'s keys
    (``x.lora_A.weight`` -> ``base_model.model.x.lora_A.default.weight``), ready for
    ``peft_model.load_state_dict(..., strict=True)`` when both wrap the same base model."""
    out = {}
    for key, value in state_dict.items():
        for part in _ADAPTER_PARTS:
            if part in "." + key:
                key = ("." + key).replace(part, f"{part}{adapter_name}.", 1)[1:]
                break
        out[prefix + key] = value
    return out


def from_peft_state_dict(state_dict: Dict[str, torch.Tensor], adapter_name: str = "default",
                         prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """A ``PeftModel``'s ``state_dict()`` (or a saved adapter from ``get_peft_model_state_dict``)
    -> keys of the same model with :class:`rslora_kernels.LoRALinear` layers. Keys of adapters
    other than ``adapter_name`` are left out."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        k = "." + key
        for part in _ADAPTER_PARTS:
            if part in k:
                tail = k.split(part, 1)[1]
                if tail.startswith(adapter_name + "."):
                    k = k.replace(part + adapter_name + ".", part, 1)
                elif tail != "weight":  # another adapter's entry
                    k = None
                break
        if k is not None:
            out[k[1:]] = value
    return out
