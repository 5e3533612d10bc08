"""nn.Module layers built on the fused op (PEFT-compatible parameter names and init)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops.lora_linear import lora_linear
from .scaling import lora_scaling, rslora_scaling

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """A frozen base linear plus a LoRA adapter: ``y = base(x) + s * lora_B(lora_A(dropout(x)))``.

    Parameters use PEFT's names and layouts so ``state_dict`` keys line up with a PEFT LoRA layer:
    ``base_layer.weight [N, K]``, ``base_layer.bias [N]``, ``lora_A.weight [r, K]``,
    ``lora_B.weight [N, r]``. Init as PEFT: A kaiming-uniform (a = sqrt(5)), B zeros.
    ``s = alpha / sqrt(r)`` when ``rank_stabilized`` (rsLoRA) else ``alpha / r``.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, rank_stabilized: bool = True, backend: str = "auto",
                 device=None, dtype=None, base_layer: Optional[nn.Linear] = None):
        super().__init__()
        self.scaling = rslora_scaling(alpha, r) if rank_stabilized else lora_scaling(alpha, r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.rank_stabilized, self.backend = r, alpha, float(dropout), rank_stabilized, backend
        self.base_layer = base_layer if base_layer is not None else nn.Linear(
            in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.base_layer.requires_grad_(False)
        w = self.base_layer.weight
        self.lora_A = nn.Linear(in_features, r, bias=False, device=w.device, dtype=dtype or w.dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=w.device, dtype=dtype or w.dtype)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                    rank_stabilized: bool = True, backend: str = "auto") -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` (kept as ``base_layer``, frozen) with a fresh adapter."""
        return cls(linear.in_features, linear.out_features, r, alpha, dropout, linear.bias is not None,
                   rank_stabilized, backend, base_layer=linear)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           bias=self.base_layer.bias, dropout_p=self.dropout, training=self.training,
                           backend=self.backend)

    def extra_repr(self) -> str:
        kind = "alpha/sqrt(r)" if self.rank_stabilized else "alpha/r"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g} ({kind}), dropout={self.dropout}, backend={self.backend!r}")
