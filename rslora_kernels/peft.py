"""Run Hugging Face PEFT LoRA models on the fused ops, following PEFT's state as it is at each call.

    import rslora_kernels as rk
    n = rk.peft.patch(peft_model)     # this model's LoRA Linear layers (also ones added later) run fused
    rk.peft.unpatch(peft_model)       # PEFT's own forward again
    rk.peft.enable()                  # or: every PEFT LoRA Linear of the process runs fused
    rk.peft.disable()
    rk.peft.report(peft_model)        # per layer: what ran fused, what ran PEFT's forward and why, with counts

The contract (also in docs/integrations.md, "Hugging Face PEFT"):

* ``patch`` sets an instance-level ``forward`` on each ``peft.tuners.lora.Linear`` and
  ``lora.bnb.Linear4bit`` layer whose base it can run (``nn.Linear``, GPT-2 ``Conv1D`` with
  ``fan_in_fan_out``, a bitsandbytes 4-bit base); ``unpatch`` deletes it, which restores PEFT's
  class forward. ``enable`` replaces those two classes' ``forward`` for the whole process (a layer
  patched by ``patch`` keeps its own backend); ``disable`` puts PEFT's back. Parameters,
  state_dict, ``save_pretrained`` and PEFT's methods are untouched.
* Everything is read from PEFT at each call: the active adapter(s), ``disable_adapters``,
  ``merged``, ``layer.scaling[adapter]`` (``use_rslora``, ``set_scale``, ``scale_layer``), the
  adapter's own ``lora_dropout`` module (``nn.Dropout``'s p when the module is in training mode,
  0 for ``nn.Identity``), ``lora_bias``, DoRA's magnitude, the base weight (a transposed view for
  ``fan_in_fan_out``) and bias. Adapters added after ``patch`` to an existing layer run fused at
  once; LoRA layers that PEFT creates later in a patched model (``add_adapter``, ``load_adapter``,
  ``inject_adapter_in_model`` on it) are patched when PEFT creates them (``patch`` wraps PEFT's
  ``BaseTuner.inject_adapter`` to see that). A deleted adapter is simply no longer active.
* Fused: one active adapter (:func:`rslora_kernels.lora_linear`, or
  :func:`rslora_kernels.dora_linear` for DoRA); several active adapters (one op call: A stacked along
  r, B concatenated along r with each adapter's scaling folded in; the adapters with dropout in
  training draw one mask each, their rank terms through :func:`rslora_kernels.lora_linear_group`);
  ``lora_bias`` (the adapter's bias, scaled, added to the base bias); with
  ``fuse_mixed_batches=True``, ``adapter_names=`` mixed batches (each adapter's rows gathered and
  run through the fused op, ``"__base__"`` rows through the base layer). Dropout masks come from
  the project's Philox stream (:func:`rslora_kernels.dropout_mask`) with seeds drawn from torch's
  default generator, one per adapter with dropout, in PEFT's active-adapter order.
* PEFT's forward runs (counted under "base", no warning) when it computes the base layer alone:
  adapters disabled, merged, no active adapter on the layer. It runs as a fallback (counted, and the
  first time for each reason on a layer a ``UserWarning`` names the layer and the reason) for:
  ``adapter_names=`` mixed batches unless ``fuse_mixed_batches=True`` (PEFT computes the base term
  on the whole batch and only the rank terms per row subset; a fused op per row subset rounds the
  base term differently, and PEFT's own tests compare the two at rtol 1e-5), LoRA
  variants other than DoRA, DoRA among several active adapters, DoRA with ``lora_bias``, DoRA on a
  4-bit base or under autocast, dropout modules other than ``nn.Dropout`` / ``nn.Identity``,
  adapters of different dtypes active together, extra forward arguments, x's dtype differing from
  the base's outside autocast, adapters narrower than x outside autocast, a 4-bit weight repacked
  for bitsandbytes' CPU inference kernel. Layer types it never runs (Embedding, Conv,
  ``Linear8bitLt``, other quantized LoRA layers, other bases) are left to PEFT by ``patch`` with one
  warning listing them.
* Counting is a dict increment per call, in eager mode; under ``torch.compile`` nothing is counted
  or warned (the choice is made while tracing).
* dtypes: adapters stay in their own dtype; the op reads fp32 A/B next to bf16/fp16 x natively and
  accumulates in fp32, where PEFT upcasts x to the adapter dtype, so in bf16 the two differ by
  rounding.
"""
from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ._siblings import SiblingGroup
from .ops.dora import dora_linear
from .ops.group import lora_linear_group
from .ops.lora_linear import check_backend_name, lora_linear
from .quant import is_quantized_weight

__all__ = ["patch", "unpatch", "is_patched", "enable", "disable", "report", "to_peft_state_dict",
           "from_peft_state_dict"]

# weights the op reads; whether the layer's backend computes in that dtype is checked per call by the
# backend registry (float64 runs on "auto" -> composite/reference, and is a TypeError for "triton")
_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTR = "_rslora_kernels_patch"  # the _Config of a layer patched by patch()
_SIBLINGS = "_rslora_kernels_siblings"  # the SiblingGroup of a layer patched with fuse_siblings=True
_STATIC = "_rslora_kernels_base"  # the _Base of a layer (cached)
_STATS = "_rslora_kernels_stats"  # {(kind, what): calls} on a layer that ran through this module
_NAME = "_rslora_kernels_name"  # the layer's name in its model (for warnings), set where known
_MODEL = "_rslora_kernels_model"  # (_Config, fuse_siblings) on a module passed to patch() and the PEFT tuners in it

class _Config(NamedTuple):
    """How a layer runs: set per layer by patch(), process-wide by enable()."""
    backend: str
    fuse_mixed_batches: bool  # adapter_names= batches on the fused op (else PEFT's forward, counted and warned)


_ENABLED: Optional[_Config] = None  # the _Config of enable(), None when disabled
_CLASS_FORWARDS: Dict[type, object] = {}  # PEFT's own forward of each class enable() replaced


def _lora_module():
    try:
        from peft.tuners.lora import layer as lora_layer  # the Hugging Face package (absolute import)
    except ImportError as e:  # pragma: no cover - peft is an optional extra
        raise ImportError("rslora_kernels.peft needs the 'peft' package: pip install 'rslora-kernels[peft]'") from e
    return lora_layer


@functools.lru_cache(maxsize=None)
def _lora_bnb_classes():
    """PEFT's bitsandbytes LoRA layers (Linear4bit, Linear8bitLt); None for those that do not exist
    (PEFT defines them only when bitsandbytes is installed)."""
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:  # pragma: no cover - bitsandbytes is an optional extra
        return None, None
    return getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None)


def _fused_classes() -> List[type]:
    """The PEFT LoRA layer classes this module runs: lora.Linear and, with bitsandbytes, lora.bnb.Linear4bit."""
    lora_4bit, _ = _lora_bnb_classes()
    return [_lora_module().Linear] + ([lora_4bit] if lora_4bit is not None else [])


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight [in, out], y = x W + b)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _layer_reason(layer) -> Optional[str]:
    """Why the fused forward can never run ``layer`` (a peft LoraLayer), whatever its adapters; None
    if it can run it."""
    lora_4bit, lora_8bit = _lora_bnb_classes()
    quantized = lora_4bit is not None and type(layer) is lora_4bit
    if lora_8bit is not None and type(layer) is lora_8bit:
        return ("LoRA layer type Linear8bitLt (bitsandbytes 8-bit base: LLM.int8's outlier matmul is not "
                "a dequantize-then-GEMM, so it is not fused; 4-bit Linear4bit bases are)")
    if type(layer) is not _lora_module().Linear and not quantized:
        return f"LoRA layer type {type(layer).__name__} (only peft lora.Linear and lora.bnb.Linear4bit are fused)"
    base = layer.get_base_layer()
    if quantized:
        if not is_quantized_weight(base.weight):
            return f"base layer type {type(base).__name__} under a 4-bit LoRA layer (expected a bitsandbytes Linear4bit)"
    elif not (type(base) is nn.Linear or (_is_conv1d(base) and layer.fan_in_fan_out)):
        return f"base layer type {type(base).__name__} (quantized or custom bases are not supported)"
    elif base.weight.dtype not in _FLOAT_WEIGHTS:
        return f"base weight dtype {base.weight.dtype}"
    return None


class _Base(NamedTuple):
    """What a layer's base gives the fused forward, cached on the layer while its base module, weight
    tensor, weight dtype and fan_in_fan_out stay the same (so the per-call checks skip the type checks)."""
    module: nn.Module
    weight: Optional[torch.Tensor]
    dtype: Optional[torch.dtype]
    fan_in_fan_out: bool
    quantized: bool
    reason: Optional[str]  # why the layer can never run fused (type checks), or None


def _base(layer) -> _Base:
    base = layer._modules.get("base_layer")  # nn.Module's registry: no __getattr__ on the per-call path
    weight = base._parameters.get("weight") if base is not None else None
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    cached = layer.__dict__.get(_STATIC)
    if (cached is not None and cached.module is base and cached.weight is weight and weight is not None
            and cached.dtype == weight.dtype and cached.fan_in_fan_out == fan_in_fan_out):
        return cached
    if base is None or layer.get_base_layer() is not base:
        reason = "base layer wrapped by another adapter layer"
    else:
        reason = _layer_reason(layer)
    info = _Base(base, weight, None if weight is None else weight.dtype, fan_in_fan_out,
                 reason is None and is_quantized_weight(weight), reason)
    if not torch.compiler.is_compiling():  # no module state written while torch.compile traces
        layer.__dict__[_STATIC] = info
    return info


def _weight(adapters: nn.ModuleDict, adapter: str) -> torch.Tensor:
    """``adapters[adapter].weight`` read from nn.Module's registries (the forward's host cost)."""
    return adapters._modules[adapter]._parameters["weight"]


def _is_dora(layer, adapter: str) -> bool:
    """A PEFT DoRA linear adapter (``use_dora=True``), which the fused forward runs as ``rk.dora_linear``."""
    variant = layer.__dict__.get("lora_variant", {}).get(adapter)
    return (variant is not None and type(variant).__name__ == "DoraLinearVariant"
            and adapter in layer._modules["lora_magnitude_vector"]._modules)


def _dropout_p(layer, adapter: str) -> float:
    """The adapter's own dropout probability for this call: its ``nn.Dropout``'s p in training mode, else 0."""
    drop = layer._modules["lora_dropout"]._modules[adapter]
    return drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _adapters_reason(layer, info: _Base, x: torch.Tensor, adapters: List[str]) -> Optional[str]:
    """Why the fused ops cannot run these active ``adapters`` of ``layer`` on x in this call; None if they can."""
    if info.reason is not None:
        return info.reason
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    quantized = info.quantized
    # a 4-bit base computes in its compute_dtype (x's dtype until bitsandbytes sets it)
    base_dtype = (getattr(info.module, "compute_dtype", None) or x.dtype) if quantized else info.dtype
    if x.dtype != base_dtype and not autocast:
        return f"x dtype {x.dtype} differs from the base layer's {base_dtype} outside autocast"
    # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (eval, no grad): not our format
    if quantized and getattr(info.weight.quant_state, "packing_format_for_cpu", False):
        return "4-bit weight repacked for bitsandbytes' CPU inference kernel"
    mods = layer._modules
    lora_A, dropouts = mods["lora_A"], mods["lora_dropout"]._modules
    variants = layer.__dict__.get("lora_variant", {})
    dtype = None
    for adapter in adapters:
        A = _weight(lora_A, adapter)
        if A.dtype not in _FLOAT_WEIGHTS:
            return f"adapter dtype {A.dtype}"
        if not autocast and torch.finfo(A.dtype).bits < torch.finfo(x.dtype).bits:
            return f"adapter dtype {A.dtype} narrower than x's {x.dtype} outside autocast"
        if dtype is not None and A.dtype != dtype:
            return f"active adapters of different dtypes ({dtype}, {A.dtype})"
        dtype = A.dtype
        variant = variants.get(adapter)
        dora = variant is not None and _is_dora(layer, adapter)
        if variant is not None and not dora:
            return f"LoRA variant {type(variant).__name__}"
        if layer.use_dora.get(adapter, False) and not dora:
            return "DoRA without PEFT's DoraLinearVariant (older PEFT)"
        drop = dropouts[adapter]
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"dropout module {type(drop).__name__}"
        if dora:  # dora_linear does no autocast casting; its magnitude must be as wide as x; no 4-bit bases
            if len(adapters) > 1:
                return "DoRA among several active adapters"
            if quantized:
                return "DoRA on a 4-bit base (QLoRA + DoRA is not fused)"
            if layer.lora_bias.get(adapter, False):
                return "DoRA with lora_bias"
            if autocast:
                return "DoRA under autocast"
            m = _weight(mods["lora_magnitude_vector"], adapter)
            if torch.finfo(m.dtype).bits < torch.finfo(x.dtype).bits:
                return f"DoRA magnitude dtype {m.dtype} narrower than x's {x.dtype}"
    return None


def _base_operands(info: _Base, x: torch.Tensor):
    """(weight as the op takes it, bias): W transposed as a view for fan_in_fan_out (the op takes any
    strides); a 4-bit base's bias cast to x's dtype, as bitsandbytes' Linear4bit does."""
    bias = info.module._parameters.get("bias")
    if info.quantized and bias is not None:
        bias = bias.to(x.dtype)
    return (info.weight.t() if info.fan_in_fan_out else info.weight), bias


def _with_lora_bias(bias, layer, adapter: str, x: torch.Tensor):
    """The base bias plus the adapter's own lora_B bias times its scaling (``lora_bias=True``):
    PEFT computes s * (T B^T + b_B), whose b_B part is a bias the op adds once."""
    if not layer.__dict__.get("lora_bias", {}).get(adapter, False):
        return bias
    b_B = layer._modules["lora_B"]._modules[adapter]._parameters.get("bias")
    if b_B is None:
        return bias
    extra = (b_B * layer.scaling[adapter]).to(bias.dtype if bias is not None else x.dtype)  # the op's bias dtype
    return extra if bias is None else bias + extra


def _single_member(layer, info: _Base, x: torch.Tensor, adapter: str):
    """(weight, lora_A, lora_B, scaling, bias, p) of a plain (not DoRA) adapter for one fused LoRA call."""
    weight, bias = _base_operands(info, x)
    mods = layer._modules
    return (weight, _weight(mods["lora_A"], adapter), _weight(mods["lora_B"], adapter), layer.scaling[adapter],
            _with_lora_bias(bias, layer, adapter, x), _dropout_p(layer, adapter))


def _run_one(layer, info: _Base, backend: str, x: torch.Tensor, adapter: str, siblings: bool):
    """One active adapter on the fused op; returns (y, what ran)."""
    if _is_dora(layer, adapter):
        weight, bias = _base_operands(info, x)
        p = _dropout_p(layer, adapter)
        mods = layer._modules
        return dora_linear(x, weight, _weight(mods["lora_A"], adapter), _weight(mods["lora_B"], adapter),
                           _weight(mods["lora_magnitude_vector"], adapter), layer.scaling[adapter], bias=bias,
                           dropout_p=p, training=p > 0.0, backend=backend), "one adapter (DoRA)"
    member = _single_member(layer, info, x, adapter)
    group = layer.__dict__.get(_SIBLINGS) if siblings else None
    if group is not None and not info.quantized:  # fuse_siblings: the group's output, when it has one
        y = group.output(layer, x, member)
        if y is not None:
            return y, "one adapter (sibling group)"
    weight, A, B, s, bias, p = member
    return lora_linear(x, weight, A, B, s, bias=bias, dropout_p=p, training=p > 0.0, backend=backend), "one adapter"


def _run_several(layer, info: _Base, backend: str, x: torch.Tensor, adapters: List[str]):
    """Several active adapters (plain LoRA, one dtype) on x; returns (y, what ran).

    The adapters without dropout in this call share one rank term: ONE fused call with their A
    stacked along r and their B concatenated along r, each B times its own scaling (autograd carries
    the grads back to each A and B). Adapters with dropout need a mask each: the first of them
    joins the fused call when no adapter is without dropout; the rest run their shrink through ONE
    :func:`rslora_kernels.lora_linear_group` call (one member per adapter, each with its own mask
    and seed; a member's base is a zero [r_i, K] weight and its B the identity, so its output is
    its rank term T_i = drop_i(x) A_i^T exactly, for one more shrink-sized GEMM forward and
    backward), then ONE expand T [B_i s_i ...]^T added to y."""
    weight, bias = _base_operands(info, x)
    lora_A, lora_B = layer._modules["lora_A"], layer._modules["lora_B"]
    for a in adapters:
        bias = _with_lora_bias(bias, layer, a, x)
    ps = {a: _dropout_p(layer, a) for a in adapters}
    plain = [a for a in adapters if ps[a] == 0.0]
    dropped = [a for a in adapters if ps[a] > 0.0]
    main, extras = (plain, dropped) if plain else (dropped[:1], dropped[1:])
    if len(main) == 1:
        a = main[0]
        y = lora_linear(x, weight, _weight(lora_A, a), _weight(lora_B, a), layer.scaling[a], bias=bias,
                        dropout_p=ps[a], training=ps[a] > 0.0, backend=backend)
    else:
        A = torch.cat([_weight(lora_A, a) for a in main], 0)
        B = torch.cat([_weight(lora_B, a) * layer.scaling[a] for a in main], 1)
        y = lora_linear(x, weight, A, B, 1.0, bias=bias, backend=backend)
    if extras:
        As = [_weight(lora_A, a) for a in extras]
        K = x.shape[-1]
        zeros = [x.new_zeros((A.shape[0], K)) for A in As]
        eyes = [torch.eye(A.shape[0], dtype=A.dtype, device=A.device) for A in As]
        Ts = lora_linear_group(x, zeros, As, eyes, 1.0, dropout_ps=[ps[a] for a in extras], training=True,
                               backend=backend)
        B = torch.cat([_weight(lora_B, a) * layer.scaling[a] for a in extras], 1)
        T = torch.cat(Ts, -1) if len(Ts) > 1 else Ts[0]
        delta = F.linear(T if torch.is_autocast_enabled(x.device.type) else T.to(B.dtype), B)
        y = y + delta.to(y.dtype)
    return y, f"{len(adapters)} adapters"


def _count(layer, kind: str, what: str) -> None:
    """One call of ``layer`` counted under (kind, what); the first fallback of each reason on a layer
    warns. Nothing is counted while torch.compile traces (a traced count would run once)."""
    if torch.compiler.is_compiling():
        return
    stats = layer.__dict__.get(_STATS)
    if stats is None:
        stats = layer.__dict__[_STATS] = {}
    key = (kind, what)
    n = stats.get(key, 0)
    stats[key] = n + 1
    if n == 0 and kind == "peft":
        name = layer.__dict__.get(_NAME) or f"{type(layer).__name__}({layer.in_features} -> {layer.out_features})"
        warnings.warn(f"rslora_kernels.peft: {name} runs PEFT's forward: {what} (warned once per layer and reason; "
                      "rslora_kernels.peft.report(model) counts every call)", stacklevel=4)


def _peft_forward(layer):
    """PEFT's own forward of ``layer``'s class (the one ``enable`` replaced, where it did)."""
    for klass in type(layer).__mro__:
        f = _CLASS_FORWARDS.get(klass)
        if f is None:
            f = vars(klass).get("forward")
        if f is not None:
            return f
    raise AssertionError(f"{type(layer).__name__} has no forward")  # pragma: no cover - nn.Module has one


def _forward(layer, config: _Config, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The fused forward of a PEFT LoRA layer, reading PEFT's state now (see the module docstring)."""
    backend = config.backend
    names = None
    if args or kwargs:
        if args or any(k != "adapter_names" for k in kwargs):
            _count(layer, "peft", "extra forward arguments (" + ", ".join([*(["*args"] if args else []), *kwargs]) + ")")
            return _peft_forward(layer)(layer, x, *args, **kwargs)
        names = kwargs["adapter_names"]
    if layer.disable_adapters or layer.merged:
        _count(layer, "base", "adapters disabled" if layer.disable_adapters else "merged")
        return _peft_forward(layer)(layer, x, *args, **kwargs)  # PEFT's: it unmerges a merged disabled layer
    if names is not None:
        if not config.fuse_mixed_batches:
            _count(layer, "peft", _MIXED_REASON)
            return _peft_forward(layer)(layer, x, **kwargs)
        return _mixed_batch(layer, backend, x, names, kwargs)
    lora_A = layer._modules["lora_A"]._modules
    active = [a for a in layer.active_adapters if a in lora_A]
    if not active:
        _count(layer, "base", "no active adapter on this layer")
        return _peft_forward(layer)(layer, x)
    info = _base(layer)
    reason = _adapters_reason(layer, info, x, active)
    if reason is not None:
        _count(layer, "peft", reason)
        return _peft_forward(layer)(layer, x)
    if len(active) == 1:
        y, what = _run_one(layer, info, backend, x, active[0], True)
    else:
        y, what = _run_several(layer, info, backend, x, active)
    _count(layer, "fused", what)
    return y


# why adapter_names= batches run PEFT's forward unless fuse_mixed_batches=True
_MIXED_REASON = ("adapter_names= mixed batch (PEFT computes the base term on the whole batch; the fused op per row "
                 "subset rounds it differently, which PEFT's own tests compare at rtol 1e-5: opt in with "
                 "fuse_mixed_batches=True)")


def _mixed_batch(layer, backend: str, x: torch.Tensor, names, kwargs: dict) -> torch.Tensor:
    """``adapter_names=`` with ``fuse_mixed_batches=True``: the rows of each adapter gathered and run
    through the fused op (base and adapter together, so every row's base is computed once, on its
    row subset: a GEMM's rows round differently with another number of rows, so these rows differ
    from a whole-batch run in the last bits), ``"__base__"`` rows and adapters this layer does not
    hold through the base layer, as PEFT's ``_mixed_batch_forward`` computes them."""
    layer._check_forward_args(x, **kwargs)  # PEFT's own errors: length, merged, DoRA
    rows: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    adapters = [a for a in rows if a != "__base__" and a in layer.lora_A]
    info = _base(layer)
    reason = _adapters_reason(layer, info, x, adapters) if adapters else None
    if reason is not None:
        _count(layer, "peft", "mixed batch: " + reason)
        return _peft_forward(layer)(layer, x, **kwargs)
    parts, order = [], []
    for name, idx in rows.items():
        xi = x if len(rows) == 1 else x[torch.tensor(idx, device=x.device)]
        parts.append(_run_one(layer, info, backend, xi, name, False)[0] if name in adapters else layer.base_layer(xi))
        order += idx
    _count(layer, "fused", "mixed batch")
    if len(parts) == 1:
        return parts[0]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts, 0)[inverse.to(x.device)]


def _patched_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Instance forward installed by :func:`patch` (``self`` is a peft LoRA layer)."""
    return _forward(self, self.__dict__[_ATTR], x, args, kwargs)


def _enabled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Class forward installed by :func:`enable` on PEFT's lora.Linear and lora.bnb.Linear4bit."""
    config = _ENABLED
    if config is None:  # pragma: no cover - disable() restores PEFT's class forward
        return _peft_forward(self)(self, x, *args, **kwargs)
    return _forward(self, config, x, args, kwargs)


def _sibling_member(layer, x: torch.Tensor):
    """(weight, lora_A, lora_B, scaling, bias, p) of ``layer`` for a plain fused LoRA call on x, or
    None when the layer would take another path (PEFT's forward, DoRA, a 4-bit base, several or no
    active adapters, lora_bias): such a member is left out of its sibling group and runs alone."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer._modules["lora_A"]._modules]
    if len(active) != 1 or _is_dora(layer, active[0]) or layer.__dict__.get("lora_bias", {}).get(active[0], False):
        return None
    info = _base(layer)
    if info.quantized or _adapters_reason(layer, info, x, active) is not None:
        return None
    return _single_member(layer, info, x, active[0])


def _need_module(peft_model) -> None:
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be an nn.Module (a PeftModel), got {type(peft_model).__name__}")


def is_patched(layer: nn.Module) -> bool:
    """Whether ``layer`` currently runs the fused forward installed by :func:`patch`."""
    return hasattr(layer, _ATTR) and "forward" in vars(layer)


def _patch_layers(root: nn.Module, config: _Config, fuse_siblings: bool, skipped: Dict[str, List[str]]):
    """Patch the LoRA layers under ``root`` not patched yet; returns (switched, LoRA layers found)."""
    lora_layer = _lora_module()
    patched = found = 0
    by_parent: Dict[str, List[nn.Module]] = defaultdict(list)  # fuse_siblings: parent name -> its patched layers
    for name, module in root.named_modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        found += 1
        module.__dict__.setdefault(_NAME, name)
        if is_patched(module):
            continue
        reason = _layer_reason(module)
        if reason is not None:
            skipped[reason].append(name)
            continue
        setattr(module, _ATTR, config)
        module.forward = functools.partial(_patched_forward, module)  # picklable, unlike a bound method
        patched += 1
        if fuse_siblings:
            by_parent[name.rpartition(".")[0]].append(module)
    for parent, layers in by_parent.items():
        if len(layers) > 1:
            group = SiblingGroup(root.get_submodule(parent), layers, _sibling_member, config.backend, root)
            for layer in layers:
                setattr(layer, _SIBLINGS, group)
    return patched, found


def _warn_skipped(skipped: Dict[str, List[str]], where: str) -> None:
    if skipped:
        lines = [f"  {reason}: {len(names)} layer(s), e.g. {', '.join(names[:3])}" for reason, names in skipped.items()]
        warnings.warn(f"rslora_kernels.peft.{where}: these LoRA layers keep PEFT's forward:\n" + "\n".join(lines),
                      stacklevel=3)


def _tuners(root: nn.Module) -> List[nn.Module]:
    """``root`` and the PEFT tuners (LoraModel, ...) inside it with the models they inject into."""
    from peft.tuners.tuners_utils import BaseTuner

    out = [root]
    for module in root.modules():
        if isinstance(module, BaseTuner):
            out += [module, module.model]
    return out


def _watch_injections() -> None:
    """Wrap PEFT's ``BaseTuner.inject_adapter`` (once per process) so that the LoRA layers it creates
    in a patched model are patched with that model's backend. The wrapper calls PEFT's method
    unchanged and does nothing else for models that were never patched."""
    from peft.tuners.tuners_utils import BaseTuner

    inject = vars(BaseTuner)["inject_adapter"]
    if getattr(inject, "_rslora_kernels_wraps", None) is not None:
        return

    @functools.wraps(inject)
    def inject_adapter(self, model, *args, **kwargs):
        out = inject(self, model, *args, **kwargs)
        cfg = model.__dict__.get(_MODEL) or self.__dict__.get(_MODEL)
        if cfg is None:  # an injection below a patched module (the marker is on the root and the tuners)
            cfg = next(((getattr(m, _ATTR), False) for m in model.modules() if is_patched(m)), None)
        if cfg is not None:
            skipped: Dict[str, List[str]] = defaultdict(list)
            _patch_layers(model, cfg[0], False, skipped)
            _warn_skipped(skipped, "patch")
        return out

    inject_adapter._rslora_kernels_wraps = inject
    BaseTuner.inject_adapter = inject_adapter


def patch(peft_model: nn.Module, backend: str = "auto", fuse_siblings: bool = False,
          fuse_mixed_batches: bool = False) -> int:
    """Run this model's PEFT LoRA ``Linear`` layers on the fused ops, now and as PEFT's state changes.

    Args:
        peft_model: a ``PeftModel`` or any module holding peft LoRA layers.
        backend: op backend for the patched layers: "auto" or a registered name (see
            :func:`rslora_kernels.register_backend`).
        fuse_siblings: the layers patched by this call that share a parent module (q/k/v_proj,
            gate/up_proj) run as one :func:`rslora_kernels.lora_linear_group` when they are called
            with the same input tensor (found at run time, no per-model code; see
            :mod:`rslora_kernels._siblings` and docs/group.md). Off by default; LoRA layers PEFT
            creates later run alone.
        fuse_mixed_batches: ``adapter_names=`` batches run each adapter's rows through the fused
            op. Off by default: they run PEFT's forward (counted and warned once per layer), since
            a GEMM on a row subset rounds the base term differently from PEFT's whole-batch GEMM.

    Returns:
        The number of layers switched by this call (already patched layers are left as they are
        and not counted). Layer types it cannot run keep PEFT's forward; one ``UserWarning`` lists
        the reasons and the layers affected. A model without any PEFT LoRA layer also warns. LoRA
        layers PEFT creates in this model later are patched when created.
    """
    _need_module(peft_model)
    check_backend_name(backend)
    _watch_injections()
    skipped: Dict[str, List[str]] = defaultdict(list)
    config = _Config(backend, bool(fuse_mixed_batches))
    patched, found = _patch_layers(peft_model, config, fuse_siblings, skipped)
    for module in _tuners(peft_model):
        module.__dict__[_MODEL] = (config, fuse_siblings)
    _warn_skipped(skipped, "patch")
    if not found:
        warnings.warn(f"rslora_kernels.peft.patch: no PEFT LoRA layers found in the {type(peft_model).__name__} "
                      "passed as peft_model (patch a model returned by peft.get_peft_model); nothing patched",
                      stacklevel=2)
    return patched


def unpatch(peft_model: nn.Module) -> int:
    """Restore PEFT's forward on every layer :func:`patch` switched; returns how many. LoRA layers
    PEFT creates in this model afterwards are no longer patched."""
    _need_module(peft_model)
    restored = 0
    for module in peft_model.modules():
        module.__dict__.pop(_MODEL, None)
        if is_patched(module):
            del module.forward
            delattr(module, _ATTR)
            group = vars(module).pop(_SIBLINGS, None)
            if group is not None:
                group.remove()  # the parent's hooks (idempotent: once per group is enough)
            restored += 1
    return restored


def enable(backend: str = "auto", fuse_mixed_batches: bool = False) -> None:
    """Run every PEFT ``lora.Linear`` and ``lora.bnb.Linear4bit`` layer of the process on the fused
    ops (existing and future models alike), by replacing those classes' ``forward``; a layer
    patched by :func:`patch` keeps its own settings. Calling it again changes the settings;
    ``fuse_mixed_batches`` as for :func:`patch`."""
    global _ENABLED
    check_backend_name(backend)
    for cls in _fused_classes():
        if cls not in _CLASS_FORWARDS:
            _CLASS_FORWARDS[cls] = vars(cls)["forward"]
            cls.forward = _enabled_forward
    _ENABLED = _Config(backend, bool(fuse_mixed_batches))


def disable() -> bool:
    """Undo :func:`enable`: PEFT's own class forwards again. Returns whether it was enabled."""
    global _ENABLED
    was = _ENABLED is not None
    for cls, forward in list(_CLASS_FORWARDS.items()):
        cls.forward = forward
        del _CLASS_FORWARDS[cls]
    _ENABLED = None
    return was


def report(model: nn.Module, verbose: bool = True, reset: bool = False) -> Dict[str, Dict[str, Dict[str, int]]]:
    """Per PEFT LoRA layer of ``model``, the calls counted since it was built (or last reset): what
    ran fused, what ran PEFT's forward as a fallback and why, and what ran PEFT's base-only paths.

    Returns ``{layer name: {"fused": {what: calls}, "peft": {reason: calls}, "base": {reason: calls}}}``
    (every LoRA layer of ``model``, empty dicts where nothing was counted); ``verbose`` also prints
    it, one line per layer and entry; ``reset`` zeroes the counts after reading them.
    """
    _need_module(model)
    lora_layer = _lora_module()
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        module.__dict__.setdefault(_NAME, name)
        entry: Dict[str, Dict[str, int]] = {"fused": {}, "peft": {}, "base": {}}
        stats = module.__dict__.get(_STATS, {})
        for (kind, what), n in stats.items():
            entry[kind][what] = n
        out[name] = entry
        if reset:
            stats.clear()
    if verbose:
        labels = {"fused": "fused", "peft": "PEFT's forward (fallback)", "base": "PEFT's forward (base only)"}
        for name, entry in out.items():
            lines = [f"    {labels[kind]}: {what}: {n}" for kind in labels for what, n in entry[kind].items()]
            print(f"{name}:" + ("\n" + "\n".join(lines) if lines else " no calls counted"))
    return out


# ----------------------------------------------------------------------------------------------
# state_dict keys: LoRALinear / PEFT saved adapters use "...lora_A.weight"; a live PeftModel uses
# "base_model.model....lora_A.<adapter>.weight" (and "...base_layer.weight" in both).
# ----------------------------------------------------------------------------------------------
_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def to_peft_state_dict(state_dict: Dict[str, torch.Tensor], adapter_name: str = "default",
                       prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """Keys of a model holding :class:`rslora_kernels.LoRALinear` layers -> a ``PeftModel``'s keys
    (``x.lora_A.weight`` -> ``base_model.model.x.lora_A.default.weight``), ready for
    ``peft_model.load_state_dict(..., strict=True)`` when both wrap the same base model."""
    out = {}
    for key, value in state_dict.items():
        for part in _ADAPTER_PARTS:
            if part in "." + key:
                key = ("." + key).replace(part, f"{part}{adapter_name}.", 1)[1:]
                break
        out[prefix + key] = value
    return out


def from_peft_state_dict(state_dict: Dict[str, torch.Tensor], adapter_name: str = "default",
                         prefix: str = "base_model.model.") -> Dict[str, torch.Tensor]:
    """A ``PeftModel``'s ``state_dict()`` (or a saved adapter from ``get_peft_model_state_dict``)
    -> keys of the same model with :class:`rslora_kernels.LoRALinear` layers. Keys of adapters
    other than ``adapter_name`` are left out."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        k = "." + key
        for part in _ADAPTER_PARTS:
            if part in k:
                tail = k.split(part, 1)[1]
                if tail.startswith(adapter_name + "."):
                    k = k.replace(part + adapter_name + ".", part, 1)
                elif tail != "weight":  # another adapter's entry
                    k = None
                break
        if k is not None:
            out[k[1:]] = value
    return out
