"""rslora-kernels: fused Triton kernels for rank-stabilized LoRA (rsLoRA) linear layers.

    y = x W^T + b + (alpha / sqrt(r)) * (dropout(x) A^T) B^T

Importing the package never touches CUDA or compiles kernels; Triton is imported on first use.
"""
from . import quant, reference  # quant: 4-bit (bitsandbytes) weights; bitsandbytes itself is not imported
from .dropout import STREAM_VERSION as DROPOUT_STREAM  # the dropout stream's name: what a seed means
from .dropout import dropout_mask
from .inject import inject
from .layers import LoRALinear
from .ops import composite  # noqa: F401  (registers the "composite" backend; CPU "auto" picks it)
from .ops.autotune import autotune_report
from .ops.dora import DoRALinearFunction, dora_linear
from .ops.group import LoRALinearGroupFunction, lora_linear_group
from .ops.lora_linear import LoRALinearFunction, lora_linear, register_backend, registered_backends, unregister_backend
from .scaling import lora_scaling, rslora_scaling

__version__ = "0.1.0"

__all__ = ["lora_linear", "LoRALinearFunction", "dora_linear", "DoRALinearFunction", "lora_linear_group",
           "LoRALinearGroupFunction", "LoRALinear", "inject",
           "dropout_mask", "DROPOUT_STREAM", "reference", "quant",
           "register_backend", "unregister_backend", "registered_backends",
           "rslora_scaling", "lora_scaling", "autotune_report", "peft", "__version__"]


def __getattr__(name):
    # rk.peft without importing Hugging Face peft at package import (rslora_kernels.peft imports it lazily)
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
