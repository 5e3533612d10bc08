"""``inject``: put LoRA adapters into a plain PyTorch model by module name, PEFT style."""
from __future__ import annotations

import re
from typing import List, Sequence, Union

from torch import nn

from .layers import LoRALinear, check_adapter_args, check_base
from .quant import is_quantized_weight

__all__ = ["inject", "matches_target"]


def matches_target(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """PEFT's matching rule: a string is a regex matched against the whole module name
    (``re.fullmatch``); a list matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int, alpha: float,
           dropout: float = 0.0, rank_stabilized: bool = True, backend: str = "auto",
           use_dora: bool = False) -> nn.Module:
    """Replace every matching ``nn.Linear`` in ``model`` by :class:`LoRALinear` and freeze the rest.

    Args:
        model: any ``nn.Module``; modified in place and returned.
        target_modules: a list of names (``["q_proj", "v_proj"]`` matches ``layers.0.attn.q_proj``
            by suffix, ``"lm_head"`` by exact name) or one regex string (``r".*\\.(q|v)_proj"``)
            matched with ``re.fullmatch`` -- PEFT's rules.
        r, alpha, dropout, rank_stabilized, backend, use_dora: as :class:`LoRALinear`.

    Every parameter of the model is frozen except the new ``lora_A`` / ``lora_B`` weights (and
    ``lora_magnitude_vector`` with ``use_dora``). The
    adapters take each base linear's device and dtype. A matching module that is not an
    ``nn.Linear`` (or a quantized bitsandbytes ``Linear4bit``, whose 4-bit weight the adapter layer
    dequantizes per call: QLoRA) raises ``TypeError``; no match at all raises ``ValueError``.
    """
    # every check before the model is changed: a bad argument leaves the caller's model as it was
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_adapter_args(r, alpha, dropout, rank_stabilized, backend)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    inside_adapters = {f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, LoRALinear)
                       for child, _ in m.named_modules() if child}  # an adapter's own linears are never targets
    targets: List[str] = [name for name, _ in model.named_modules()
                          if name and name not in inside_adapters and matches_target(name, target_modules)]
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already holds a LoRA adapter")
        # subclasses compute something else, except bitsandbytes' 4-bit linear (QLoRA), which the op reads
        if type(module) is not nn.Linear and not is_quantized_weight(getattr(module, "weight", None)):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; "
                            "inject() replaces nn.Linear and bitsandbytes Linear4bit only")
        check_base(module, use_dora, f"target module {name!r}")
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}; "
                         f"some nn.Linear names: {linears}")
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), r, alpha, dropout,
                                                      rank_stabilized, backend, use_dora=use_dora))
    return model
