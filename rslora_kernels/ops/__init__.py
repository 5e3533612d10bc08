"""Kernels, launchers, op registration and autograd Functions (modules live one level up)."""
from .lora_linear import (Backend, LoRALinearFunction, lora_linear, register_backend, registered_backends,
                          resolve_backend, unregister_backend)
from . import qlora  # noqa: F401  (installs lora_linear's entry point for 4-bit weights)
from . import autotune_steps  # noqa: F401  (registers what backend="auto" measures on first use)

__all__ = ["Backend", "LoRALinearFunction", "lora_linear", "register_backend", "registered_backends",
           "resolve_backend", "unregister_backend"]
