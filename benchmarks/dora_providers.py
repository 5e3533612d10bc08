"""DoRA providers for the sweep (``python -m benchmarks.sweep --dora``): the same interface as
:mod:`benchmarks.providers` (``ALL_PROVIDERS``, ``BASELINE``, ``available``, ``make_layer``).

    triton      rk.LoRALinear(use_dora=True, backend="triton")
    composite   rk.LoRALinear(use_dora=True, backend="composite")
    reference   rk.LoRALinear(use_dora=True, backend="reference") (PEFT's formula, [N, K] matrix built)
    peft-dora   the real PEFT ``lora.Linear`` with ``use_dora=True, use_rslora=True`` (the baseline:
                the sweep's "speedup" column is over this provider with ``--dora``)

Every layer gets non-zero B and magnitudes moved off their init, so no work is skippable.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

import rslora_kernels as rk

from . import providers as lora_providers

ALL_PROVIDERS = ("triton", "composite", "reference", "peft-dora")
BASELINE = "peft-dora"


class _Holder(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base


def _perturb(B: torch.Tensor, magnitude: torch.Tensor) -> None:
    with torch.no_grad():
        B.normal_(std=0.02)
        magnitude.mul_(1 + 0.1 * torch.rand_like(magnitude))


def _peft_dora(base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_rslora=True, use_dora=True)
    layer = get_peft_model(_Holder(base), cfg).base_model.model.proj
    _perturb(layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight)
    return layer


def _ours(backend: str, base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module:
    layer = rk.LoRALinear.from_linear(base, r, alpha, dropout=p, rank_stabilized=True, backend=backend, use_dora=True)
    _perturb(layer.lora_B.weight, layer.lora_magnitude_vector.weight)
    return layer


def available(device: torch.device, dtype: torch.dtype, names: Iterable[str] = ALL_PROVIDERS) -> Dict[str, str]:
    """Those of ``names`` that cannot run here, each with the reason."""
    names = set(names)
    lora = lora_providers.available(device, dtype, {"peft" if n == "peft-dora" else n for n in names})
    out = {name: lora[name] for name in ("triton", "composite") if name in lora}
    if "peft" in lora:
        out["peft-dora"] = lora["peft"]
    return out


def make_layer(name: str, base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module:
    """A fresh DoRA layer of provider ``name`` in training mode, base frozen, adapters trainable."""
    if name in ("triton", "composite", "reference"):
        layer = _ours(name, base, r, alpha, p)
    elif name == "peft-dora":
        layer = _peft_dora(base, r, alpha, p)
    else:
        raise ValueError(f"unknown DoRA provider {name!r}; choose from {ALL_PROVIDERS}")
    return lora_providers.train_adapters_only(layer)
