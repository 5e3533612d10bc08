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
adapters narrower than x.

Layers ``patch`` leaves on PEFT's forward, with one warning naming each reason: LoRA layers that
are not a plain ``lora.Linear`` (Embedding, Conv, quantized bnb/gptq/... classes), bases other
than ``nn.Linear`` / ``Conv1D`` or with non-float weights, DoRA and other LoRA variants,
``lora_bias``, several active adapters, dropout modules other than ``nn.Dropout``, merged layers.
"""
from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

from .ops.lora_linear import check_backend_name, lora_linear

__all__ = ["patch", "unpatch", "is_patched", "to_peft_state_dict", "from_peft_state_dict"]

# weights the op reads; whether the layer's backend computes in that dtype is checked per call by the
# backend registry (float64 runs on "auto" -> composite/reference, and is a TypeError for "triton")
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTR = "_rslora_kernels_patch"  # (adapter name, backend) on a patched layer


def _lora_module():
    try:
        from peft.tuners.lora import layer as lora_layer  # the Hugging Face package (absolute import)
    except ImportError as e:  # pragma: no cover - peft is an optional extra
        raise ImportError("rslora_kernels.peft needs the 'peft' package: pip install 'rslora-kernels[peft]'") from e
    return lora_layer


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight [in, out], y = x W + b)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _unsupported_reason(layer, lora_layer) -> Optional[str]:
    """Why ``layer`` (a peft LoraLayer) cannot take the fused forward; None if it can."""
    if type(layer) is not lora_layer.Linear:
        return f"LoRA layer type {type(layer).__name__} (only plain peft lora.Linear is fused; quantized and non-Linear layers are not)"
    base = layer.get_base_layer()
    if not (type(base) is nn.Linear or (_is_conv1d(base) and layer.fan_in_fan_out)):
        return f"base layer type {type(base).__name__} (quantized or custom bases are not supported)"
    if base.weight.dtype not in _FLOAT_WEIGHTS:
        return f"base weight dtype {base.weight.dtype}"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (exactly one is supported)"
    adapter = active[0]
    if layer.use_dora.get(adapter, False):
        return "DoRA"
    if adapter in getattr(layer, "lora_variant", {}):
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


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward installed by :func:`patch` (``self`` is a peft ``lora.Linear``)."""
    adapter, backend = getattr(self, _ATTR)
    base = self.get_base_layer()
    A = self.lora_A[adapter].weight if adapter in self.lora_A else None
    dev = x.device.type
    usable = (
        not args and not kwargs and not self.disable_adapters and not self.merged and A is not None
        and list(self.active_adapters) == [adapter]
        and (x.dtype == base.weight.dtype or torch.is_autocast_enabled(dev))
        and (torch.is_autocast_enabled(dev) or torch.finfo(A.dtype).bits >= torch.finfo(x.dtype).bits)
    )
    if not usable:  # a state PEFT handles specially: run PEFT's own forward
        return type(self).forward(self, x, *args, **kwargs)
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    drop = self.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return lora_linear(x, weight, A, self.lora_B[adapter].weight, self.scaling[adapter], bias=base.bias,
                       dropout_p=p, training=p > 0.0, backend=backend)


def is_patched(layer: nn.Module) -> bool:
    """Whether ``layer`` currently runs the fused forward installed by :func:`patch`."""
    return hasattr(layer, _ATTR) and "forward" in vars(layer)


def patch(peft_model: nn.Module, backend: str = "auto") -> int:
    """Switch every supported PEFT LoRA ``Linear`` layer in ``peft_model`` to the fused op.

    Args:
        peft_model: a ``PeftModel`` or any module holding peft LoRA layers.
        backend: op backend for the patched layers: "auto" or a registered name (see
            :func:`rslora_kernels.register_backend`).

    Returns:
        The number of layers switched by this call (already patched layers are left as they are
        and not counted). Unsupported layers keep PEFT's forward; one ``UserWarning`` lists the
        reasons and the layers affected.
    """
    check_backend_name(backend)
    lora_layer = _lora_module()
    patched = 0
    skipped: Dict[str, List[str]] = defaultdict(list)
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layer.LoraLayer) or is_patched(module):
            continue
        reason = _unsupported_reason(module, lora_layer)
        if reason is not None:
            skipped[reason].append(name)
            continue
        adapter = [a for a in module.active_adapters if a in module.lora_A][0]
        setattr(module, _ATTR, (adapter, backend))
        module.forward = functools.partial(_fused_forward, module)  # picklable, unlike a bound method
        patched += 1
    if skipped:
        lines = [f"  {reason}: {len(names)} layer(s), e.g. {', '.join(names[:3])}" for reason, names in skipped.items()]
        warnings.warn("rslora_kernels.peft.patch: these LoRA layers keep PEFT's forward:\n" + "\n".join(lines),
                      stacklevel=2)
    return patched


def unpatch(peft_model: nn.Module) -> int:
    """Restore PEFT's forward on every layer :func:`patch` switched; returns how many."""
    restored = 0
    for module in peft_model.modules():
        if is_patched(module):
            del module.forward
            delattr(module, _ATTR)
            restored += 1
    return restored


# ----------------------------------------------------------------------------------------------
# state_dict keys: LoRALinear / PEFT saved adapters use "...lora_A.weight"; a live PeftModel uses
# "base_model.model....lora_A.<adapter>.weight" (and "...base_layer.weight" in both).
# ----------------------------------------------------------------------------------------------
_ADAPTER_PARTS = (".lora_A.", ".lora_B.")


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
