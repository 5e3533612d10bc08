"""Kernels, launchers, op registration and autograd Functions (modules live one level up)."""
from .lora_linear import LoRALinearFunction, lora_linear, register_backend, resolve_backend

__all__ = ["LoRALinearFunction", "lora_linear", "register_backend", "resolve_backend"]
