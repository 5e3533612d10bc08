"""QLoRA providers: LoRA layers on a bitsandbytes 4-bit base (``benchmarks.sweep --quant nf4``).

Each factory takes the sweep's dense frozen ``nn.Linear`` ``base``, quantizes a copy of its weight
with bitsandbytes (``quant_type``, nested absmax on: QLoRA's double quantization; compute dtype =
the base's dtype) and returns a training-mode layer computing ``base4(x) + s * B A drop(x)``:

    peft-qlora        PEFT's ``lora.bnb.Linear4bit`` (``use_rslora=True``; PEFT's fp32 adapters)
    qlora-triton      rslora_kernels on the 4-bit base, backend="triton" (Triton dequant + fused kernels)
    qlora-composite   rslora_kernels on the 4-bit base, backend="composite" (dequant + torch GEMMs)

Kept apart from :mod:`benchmarks.providers` (dense bases); the sweep calls :func:`make_layer` for
these names and :func:`available` for what cannot run.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .providers import train_adapters_only

import rslora_kernels as rk

PROVIDERS = ("peft-qlora", "qlora-triton", "qlora-composite")
QUANT_TYPES = ("nf4", "fp4")


def quantized_base(base: nn.Linear, quant_type: str) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` holding ``base``'s weight (and bias) quantized to ``quant_type``."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                          compute_dtype=base.weight.dtype, quant_type=quant_type, compress_statistics=True,
                          device="meta")
    q.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=True)
    if base.bias is not None:
        q.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return q.to(base.weight.device)  # quantizes (bitsandbytes does it on the move to a device)


class _Holder(nn.Module):
    is_loaded_in_4bit = True  # what transformers sets on a bnb 4-bit model: PEFT then builds lora.bnb layers

    def __init__(self, base):
        super().__init__()
        self.proj = base


def _peft_qlora(base4: nn.Module, r: int, alpha: float, p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_rslora=True)
    layer = get_peft_model(_Holder(base4), cfg).base_model.model.proj
    with torch.no_grad():  # nonzero B (PEFT inits zeros) so nothing is skippable
        for mod in layer.lora_B.values():
            mod.weight.normal_(std=0.02)
    return layer


def _ours(base4: nn.Module, r: int, alpha: float, p: float, backend: str) -> nn.Module:
    layer = rk.LoRALinear.from_linear(base4, r, alpha, dropout=p, rank_stabilized=True, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)
    return layer


def available(device: torch.device) -> Dict[str, str]:
    """QLoRA providers that cannot run here, each with the reason."""
    from rslora_kernels._runtime import triton_available_for

    out = {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {n: "bitsandbytes is not installed (pip install 'rslora-kernels[qlora]')" for n in PROVIDERS}
    try:
        import peft  # noqa: F401
    except ImportError:
        out["peft-qlora"] = "peft is not installed (pip install 'rslora-kernels[peft]')"
    if not triton_available_for(device):
        out["qlora-triton"] = "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1, far too slow to time)"
    return out


def make_layer(name: str, base: nn.Linear, r: int, alpha: float, p: float, quant_type: str = "nf4") -> nn.Module:
    """A fresh layer of QLoRA provider ``name`` on ``base`` quantized to ``quant_type``, in training
    mode (bitsandbytes repacks CPU weights for inference in eval mode), adapters trainable."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    base4 = quantized_base(base, quant_type)
    if name == "peft-qlora":
        layer = _peft_qlora(base4, r, alpha, p)
    elif name in ("qlora-triton", "qlora-composite"):
        layer = _ours(base4, r, alpha, p, name.split("-", 1)[1])
    else:
        raise ValueError(f"unknown QLoRA provider {name!r}; choose from {PROVIDERS}")
    return train_adapters_only(layer)
