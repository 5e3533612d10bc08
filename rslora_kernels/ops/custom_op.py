"""The package's custom ops: registered with ``torch.library`` (so torch.compile traces through
their fake kernels, and ``torch.library.opcheck`` checks them), and called directly where nothing
needs the dispatcher.

Calling a Python custom op costs tens of microseconds of host work (the dispatcher, the autograd
and alias checks of ``torch.library.custom_op``). A fused LoRA step's kernels take about a
millisecond at training sizes, and on the GPU machines we measured the host work of an eager step
exceeded its GPU time (benchmarks/results/2026-11-27_h200_step_profile.md). So in plain eager
execution -- the first argument an ordinary tensor on the CPU or a GPU, outside torch.compile --
an op defined here runs its Python implementation directly. Anything else (torch.compile's
tracing, fake tensors, meta tensors, tensor subclasses) goes through ``torch.ops``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["custom_op", "DirectCustomOp"]


class DirectCustomOp:
    """A callable custom op; see the module docstring. ``register_fake`` as on torch's ops.
    ``direct``: what a direct call runs instead of ``impl`` (same arguments; it may return what the
    op's schema cannot, such as None for an output nobody reads); default ``impl``."""

    def __init__(self, qualname: str, impl: Callable, direct: Optional[Callable] = None):
        self.qualname = qualname
        self.impl = impl
        self.direct = direct if direct is not None else impl
        self.op_def = torch.library.custom_op(qualname, impl, mutates_args=())
        namespace, name = qualname.split("::")
        self._packet = getattr(getattr(torch.ops, namespace), name)

    def register_fake(self, fake: Callable) -> Callable:
        self.op_def.register_fake(fake)
        return fake

    def __call__(self, *args):
        x = args[0]
        if type(x) is Tensor and (x.is_cuda or x.is_cpu) and not torch.compiler.is_compiling():
            return self.direct(*args)
        return self._packet(*args)


def custom_op(qualname: str, direct: Optional[Callable] = None) -> Callable[[Callable], DirectCustomOp]:
    """Decorator: ``@custom_op("rslora_kernels::name")`` on a type-annotated function that mutates
    none of its arguments (``direct``: see :class:`DirectCustomOp`)."""
    return lambda impl: DirectCustomOp(qualname, impl, direct)
