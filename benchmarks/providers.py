"""The implementations the benchmarks compare, each built as a LoRA linear layer on one shared base.

Every provider is a factory ``make(base, r, alpha, p) -> nn.Module`` taking a frozen
``nn.Linear`` ``base`` (the model's weight, in the model dtype) and returning a layer whose
``forward(x)`` computes ``base(x) + s * lora_B(lora_A(dropout(x)))`` with ``s = alpha / sqrt(r)``
and trainable ``lora_A [r, K]``, ``lora_B [N, r]``.

    triton        rslora_kernels, backend="triton" (the fused kernels)
    composite     rslora_kernels, backend="composite" (torch GEMMs, minimal glue), when registered
    reference     rslora_kernels, backend="reference" (plain PyTorch autograd, the oracle)
    eager         PEFT-style eager layer in the model dtype:
                  base(x) + lora_B(lora_A(dropout(x))) * s   (nn.Dropout, two nn.Linear)
    eager_fp32    the same with fp32 adapters, as PEFT keeps them by default (x is cast to fp32
                  for the adapter branch, the sum cast back); only differs from eager for 16-bit models
    peft          the real ``peft`` LoRA layer (``use_rslora=True``), when peft is installed
    compiled      the eager layer's math under ``torch.compile(fullgraph=True, dynamic=True)``
                  (with ``torch._functorch.config.donated_buffer = False``: the "bwd" timing replays
                  one backward graph with ``retain_graph=True``, which donated buffers forbid)

Also here, shared by every benchmark: :func:`saved_for_backward`, the bytes a forward keeps for
backward (the memory figure of the sweep and of ``composite_cpu``).
"""
from __future__ import annotations

import math
import time
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import rslora_kernels as rk

ALL_PROVIDERS = ("triton", "composite", "reference", "eager", "eager_fp32", "peft", "compiled")
BASELINE = "eager"


class EagerLoRA(nn.Module):
    """PEFT-style LoRA layer written out in eager PyTorch: ``base(x) + lora_B(lora_A(dropout(x))) * s``.

    ``adapter_dtype`` fp32 reproduces PEFT's default for 16-bit models: the adapter branch runs in
    fp32 on ``x`` cast up, its result is cast back to the model dtype before the add.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float, adapter_dtype=None):
        super().__init__()
        self.base_layer = base
        dt = adapter_dtype or base.weight.dtype
        dev = base.weight.device
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, std=0.02)  # nonzero so no kernel can skip work
        self.scaling = rk.rslora_scaling(alpha, r)

    def forward(self, x):
        result = self.base_layer(x)
        xa = x.to(self.lora_A.weight.dtype)
        return result + (self.lora_B(self.lora_A(self.lora_dropout(xa))) * self.scaling).to(result.dtype)


def _eager_math(x, weight, bias, lora_A, lora_B, scaling: float, p: float, training: bool):
    """The eager layer's forward as one function (what torch.compile sees)."""
    result = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    return result + (F.linear(F.linear(F.dropout(xa, p, training), lora_A), lora_B) * scaling).to(result.dtype)


_compiled_math = None


def _get_compiled():
    global _compiled_math
    if _compiled_math is None:
        import torch._dynamo
        # many ranks and shapes: never let dynamo fall back to eager after its recompile limit
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        # the "bwd" mode replays one backward graph (retain_graph=True), which donated buffers forbid
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False
        _compiled_math = torch.compile(_eager_math, fullgraph=True, dynamic=True)
    return _compiled_math


class CompiledLoRA(EagerLoRA):
    """:class:`EagerLoRA` whose forward runs through ``torch.compile`` (one compile shared by all
    ranks thanks to dynamic shapes)."""

    def forward(self, x):
        return _get_compiled()(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling, self.lora_dropout.p if isinstance(
                                   self.lora_dropout, nn.Dropout) else 0.0, self.training)


class _Holder(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base


def _peft_layer(base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module:
    """The real PEFT LoRA layer around ``base`` (PEFT's defaults: adapters upcast to fp32)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_rslora=True,
                     init_lora_weights=True)
    model = get_peft_model(_Holder(base), cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():  # nonzero B (PEFT inits zeros) so nothing is skippable
        for mod in layer.lora_B.values():
            mod.weight.normal_(std=0.02)
    return layer


def _ours(backend: str) -> Callable:
    def make(base, r, alpha, p):
        layer = rk.LoRALinear.from_linear(base, r, alpha, dropout=p, rank_stabilized=True,
                                          backend=backend)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.02)
        return layer
    return make


def available(device: torch.device, dtype: torch.dtype, names: Iterable[str] = ALL_PROVIDERS) -> Dict[str, str]:
    """Those of ``names`` that cannot run here, each with the reason (printed by the benchmarks).
    Only looks for what ``names`` need (importing peft alone takes seconds)."""
    names = set(names)
    from rslora_kernels._runtime import triton_available_for

    out = {}
    if not triton_available_for(device):
        out["triton"] = "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1, far too slow to time)"
    if "composite" not in rk.registered_backends():
        out["composite"] = "backend 'composite' is not registered in this build"
    if dtype == torch.float32:
        out["eager_fp32"] = "identical to 'eager' when the model dtype is fp32"
    if "peft" in names:
        try:
            import peft  # noqa: F401
        except ImportError:
            out["peft"] = "peft is not installed (pip install 'rslora-kernels[peft]')"
    return {name: why for name, why in out.items() if name in names}


def make_layer(name: str, base: nn.Linear, r: int, alpha: float, p: float) -> nn.Module:
    """A fresh layer of provider ``name`` in training mode, base frozen, adapters trainable."""
    if name in ("triton", "composite", "reference"):
        layer = _ours(name)(base, r, alpha, p)
    elif name == "eager":
        layer = EagerLoRA(base, r, alpha, p)
    elif name == "eager_fp32":
        layer = EagerLoRA(base, r, alpha, p, adapter_dtype=torch.float32)
    elif name == "peft":
        layer = _peft_layer(base, r, alpha, p)
    elif name == "compiled":
        layer = CompiledLoRA(base, r, alpha, p)
    else:
        raise ValueError(f"unknown provider {name!r}; choose from {ALL_PROVIDERS}")
    return train_adapters_only(layer)


def train_adapters_only(layer: nn.Module) -> nn.Module:
    """``layer`` in training mode with only its adapter (``lora_*``) parameters trainable."""
    layer.train()
    for name, prm in layer.named_parameters():
        prm.requires_grad_("lora_" in name)
    return layer


def fwd_bwd_seconds(step: Callable[[], torch.Tensor], dy: torch.Tensor, grads: Iterable[torch.Tensor]) -> float:
    """Wall seconds of one ``step().backward(dy)`` on the CPU, the ``.grad`` of ``grads`` (x and the
    trained parameters) reset to None first so that no call accumulates into the last one's."""
    for t in grads:
        t.grad = None
    t0 = time.perf_counter()
    step().backward(dy)
    return time.perf_counter() - t0


class _Saved:
    """A saved tensor as the pack hook hands it to autograd: while the graph holds it, it is alive."""
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_for_backward(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = (),
                       label: Optional[torch.Tensor] = None, held_only: bool = False) -> Tuple[int, List[str]]:
    """(bytes, descriptions) of the distinct storages autograd saves while ``forward()`` runs.

    Storages of ``exclude`` (the parameters, which exist anyway; x when it should not count) are
    skipped; each storage counts once however many views of it are saved. A saved view of
    ``label``'s storage is marked " (x)" in the descriptions. ``held_only``: count only what the
    graph still holds when ``forward()`` has returned (tensors saved by a transient graph inside the
    forward -- PEFT's detached ``B @ A`` for DoRA's norm, say -- are freed by then).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    labelled = label.untyped_storage().data_ptr() if label is not None else None
    boxes = []

    def pack(t):
        box = _Saved(t)
        boxes.append(weakref.ref(box) if held_only else box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        out = forward()
    total, what, seen = 0, [], set(skip)
    for box in (ref() for ref in boxes) if held_only else boxes:  # counted while `out` keeps the graph alive
        if box is None or not isinstance(box.t, torch.Tensor):
            continue
        st = box.t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
            what.append(f"{list(box.t.shape)} {str(box.t.dtype).replace('torch.', '')}"
                        + (" (x)" if st.data_ptr() == labelled else ""))
    del out
    return total, what
