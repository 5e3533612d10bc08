"""Kernels, launchers, op registration and autograd Functions (modules live one level up)."""
from .lora_linear import (Backend, LoRALinearFunction, lora_linear, register_backend, registered_backends,
                          resolve_backend, unregister_backend)

__all__ = ["Backend", "LoRALinearFunction", "lora_linear", "register_backend", "registered_backends",
           "resolve_backend", "unregister_backend"]
