"""The numerics rule, and a self-check of a backend on a synthetic case against the float64 oracle.

The rule (docs/design.md, Numerics rule): a result passes when

    err(result) <= 2 * err(PyTorch doing the same math in the same dtype) + floor

both errors the max abs difference against a float64 oracle. ``floor`` is 4 units of the result
dtype's epsilon at the oracle's largest magnitude: each result goes through about four roundings
(stored intermediate, product, scale, store), so on tiny problems both implementations sit within
a few ulps of the oracle and the ratio alone would compare noise. NaN (or inf where the oracle is
finite) never passes. This module is the one implementation of the rule: the tests
(``tests/numerics.py``), ``python -m rslora_kernels.verify`` and the first-use check of ``auto``
all call it.

:func:`self_check` builds a :class:`Case` (op kind, shapes, dtypes, dropout, bias, device) from a
private ``torch.Generator`` -- the caller's RNG state is never read or advanced, and the dropout
seed is explicit -- runs one backend's forward and backward on it, and compares y and every grad
with the float64 oracle (:mod:`rslora_kernels.reference`), the same-dtype errors coming from the
same reference run in the case's dtypes; with adapters wider than x (PEFT's fp32 adapters on a 16-bit
base) also from the reference run with every tensor in x's dtype, the larger of the two per result,
since the kernels, like PyTorch under autocast, multiply with x-dtype operands.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["max_abs_err", "error_bound", "compare", "worst_elements", "TensorError", "Case", "CheckResult",
           "self_check", "OPS", "CHECKABLE_DTYPES", "group_widths"]

OPS = ("lora", "dora", "qlora", "group")
CHECKABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOOR_ULPS = 4  # see the module docstring


# ----------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------
def max_abs_err(t: Tensor, oracle: Tensor) -> float:
    """max |t - oracle| in float64 (0 for an empty tensor; NaN if t has a NaN)."""
    if t.numel() == 0:
        return 0.0
    return (t.detach().double() - oracle.detach().double()).abs().max().item()


def error_bound(got_dtype: torch.dtype, oracle: Tensor, same_dtype: Tensor) -> float:
    """The largest error the rule allows a result of ``got_dtype``: twice the error of
    ``same_dtype`` (PyTorch's result in that dtype) plus the floor."""
    eps = torch.finfo(got_dtype).eps
    floor = _FLOOR_ULPS * eps * max(oracle.detach().double().abs().max().item() if oracle.numel() else 0.0, 1e-30)
    return 2 * max_abs_err(same_dtype, oracle) + floor


@dataclass(frozen=True)
class TensorError:
    """One result against the rule: its error, the bound, and ``problem`` (a wrong shape or dtype,
    or None)."""
    name: str
    err: float
    bound: float
    dtype: Optional[torch.dtype] = None
    problem: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.err <= self.bound  # False for a NaN error

    @property
    def ratio(self) -> float:
        """err / bound (inf for a NaN error or a problem): how close to failing, 1 being the bound."""
        if self.problem is not None or math.isnan(self.err):
            return math.inf
        return self.err / self.bound if self.bound > 0 else (0.0 if self.err == 0 else math.inf)


def compare(name: str, got: Tensor, oracle: Tensor, same_dtype: Tensor,
            expected_dtype: Optional[torch.dtype] = None) -> TensorError:
    """``got`` against the float64 ``oracle`` by the rule, with ``same_dtype`` PyTorch's result of
    the same math in ``got``'s dtype. A wrong shape (or dtype, when ``expected_dtype`` is given) is
    a failure with ``problem`` saying so. ValueError when the oracle or ``same_dtype`` is unusable
    (a caller's bug: not float64, not finite, NaN, wrong shape)."""
    if oracle.dtype != torch.float64:
        raise ValueError(f"{name}: the oracle must be float64, got {oracle.dtype}")
    if not bool(torch.isfinite(oracle).all()):
        raise ValueError(f"{name}: the oracle is not finite")
    if same_dtype.shape != oracle.shape:
        raise ValueError(f"{name}: the same-dtype result has shape {tuple(same_dtype.shape)}, "
                         f"the oracle {tuple(oracle.shape)}")
    if bool(torch.isnan(same_dtype).any()):
        raise ValueError(f"{name}: NaN in the same-dtype PyTorch result")
    if got.shape != oracle.shape:
        return TensorError(name, math.nan, math.nan, got.dtype,
                           f"shape {tuple(got.shape)}, expected {tuple(oracle.shape)}")
    if expected_dtype is not None and got.dtype != expected_dtype:
        return TensorError(name, math.nan, math.nan, got.dtype, f"dtype {got.dtype}, expected {expected_dtype}")
    if got.numel() == 0:
        return TensorError(name, 0.0, 0.0, got.dtype)
    return TensorError(name, max_abs_err(got, oracle), error_bound(got.dtype, oracle, same_dtype), got.dtype)


def worst_elements(got: Tensor, oracle: Tensor, same_dtype: Tensor, limit: float, count: int = 5) -> List[str]:
    """Lines naming the ``count`` worst elements of ``got`` (NaN first, then the largest errors):
    index, value, the oracle's and PyTorch's same-dtype value, and the error; none within ``limit``."""
    diff = (got.detach().double() - oracle.detach().double()).abs()
    bad = diff.isnan() | (diff > limit)
    if got.numel() == 0 or not bool(bad.any()):
        return []
    order = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff).flatten().argsort(descending=True)
    lines = []
    for flat in order[:min(count, int(bad.sum()))].tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape)) if got.dim() else ()
        lines.append(f"at {idx}: got {got[idx].item():.8g}, oracle {oracle[idx].item():.8g}, "
                     f"torch same-dtype {same_dtype[idx].item():.8g}, |err| {diff[idx].item():.3e}")
    return lines


# ----------------------------------------------------------------------------------------------
# Synthetic cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A call signature to check. ``op``: "lora" (:func:`rslora_kernels.lora_linear`), "dora"
    (:func:`~rslora_kernels.dora_linear`), "qlora" (``lora_linear`` on a 4-bit NF4 base) or "group"
    (:func:`~rslora_kernels.lora_linear_group` with three members, q/k/v-like: N split 2:1:1, each
    of rank r). x is ``[M, K]``, the base ``[N, K]`` (for a group, N is the members' total width);
    ``adapter_dtype`` None means x's dtype; ``seed`` fixes the tensors (a private generator) and
    the dropout seed. Tensors are contiguous; scaling is ``rslora_scaling(16, r)``."""
    op: str = "lora"
    M: int = 64
    N: int = 48
    K: int = 40
    r: int = 8
    dtype: torch.dtype = torch.float32
    adapter_dtype: Optional[torch.dtype] = None
    dropout_p: float = 0.0
    bias: bool = True
    device: Union[str, torch.device] = "cpu"
    seed: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        for name in ("M", "N", "K", "r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "r" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'r' else 0}, got {v!r}")
        if self.op == "group" and self.N < 3:
            raise ValueError(f"N must be >= 3 for op 'group' (three members), got {self.N}")
        for name in ("dtype", "adapter_dtype"):
            v = getattr(self, name)
            if v is not None and v not in CHECKABLE_DTYPES:
                # float64 results have no wider oracle: the rule's same-dtype error would be 0
                raise TypeError(f"{name} must be one of {CHECKABLE_DTYPES} (the oracle is float64), got {v!r}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p!r}")

    @property
    def adapter(self) -> torch.dtype:
        return self.adapter_dtype or self.dtype

    def describe(self) -> str:
        ad = "" if self.adapter_dtype in (None, self.dtype) else f"/{_short(self.adapter_dtype)} adapters"
        return (f"{self.op} M={self.M} N={self.N} K={self.K} r={self.r} {_short(self.dtype)}{ad} "
                f"p={self.dropout_p:g} {'bias' if self.bias else 'no bias'} on {torch.device(self.device)}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def group_widths(N: int) -> Tuple[int, int, int]:
    """The members' widths of a "group" case of total width N (>= 3): q, k, v as 2:1:1."""
    k = max(1, N // 4)
    return N - 2 * k, k, k


@dataclass
class _Inputs:
    """The case's tensors in float64 (``x``-like ones take x's dtype, ``adapter``-like ones the
    adapters'), the upstream grads, the dropout masks, and what the op needs besides."""
    x_like: Dict[str, Tensor]
    adapter_like: Dict[str, Tensor]
    dys: List[Tensor]
    seeds: List[int]
    masks: List[Optional[Tensor]]
    grads: Tuple[str, ...]   # the leaves whose grads are compared, in order
    extra: dict = field(default_factory=dict)


def _make_inputs(case: Case) -> _Inputs:
    device = torch.device(case.device)
    gen = torch.Generator(device="cpu").manual_seed(case.seed)  # private: the user's RNG is untouched

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    M, N, K, r = case.M, case.N, case.K, case.r
    widths = group_widths(N) if case.op == "group" else (N,)
    x_like, adapter_like = {"x": rnd(M, K)}, {}
    for i, n in enumerate(widths):
        sfx = str(i) if case.op == "group" else ""
        if case.op != "qlora":
            x_like["weight" + sfx] = rnd(n, K, scale=K ** -0.5)
        adapter_like["lora_A" + sfx] = rnd(r, K, scale=K ** -0.5)
        adapter_like["lora_B" + sfx] = rnd(n, r, scale=r ** -0.5)  # non-zero: every grad is exercised
        if case.bias:
            x_like["bias" + sfx] = rnd(n)
    extra = {}
    if case.op == "qlora":  # random NF4 codes and block scales: the base's values are what they decode to
        from .quant import Weight4bit, dequantize_4bit
        blocksize = 64
        packed = torch.randint(0, 256, ((N * K + 1) // 2,), generator=gen, dtype=torch.uint8).to(device)
        absmax = (torch.rand(-(-N * K // blocksize), generator=gen) * 2 * K ** -0.5 + K ** -0.5).to(device)
        w4 = Weight4bit(packed, absmax, (N, K), blocksize, "nf4")
        extra["weight4"] = w4
        extra["dense"] = lambda dtype: dequantize_4bit(w4, dtype, impl="torch")
    if case.op == "dora":  # magnitudes near the row norms (g near 1, not 1)
        norms = torch.linalg.norm(x_like["weight"], dim=1)
        adapter_like["magnitude"] = norms * (1 + 0.3 * torch.rand(N, generator=gen, dtype=torch.float64).to(device))
    dys = [rnd(M, n) for n in widths]
    # the oracle sees exactly the values the backend sees: every tensor rounded to its dtype first
    x_like = {k: v.to(case.dtype).double() for k, v in x_like.items()}
    adapter_like = {k: v.to(case.adapter).double() for k, v in adapter_like.items()}
    dys = [dy.to(case.dtype).double() for dy in dys]
    seeds = [(case.seed * 7919 + 1009 * i + 12345) % 2**62 for i in range(len(widths))]
    from .dropout import dropout_mask
    masks = [dropout_mask(s, (M, K), case.dropout_p, device) if case.dropout_p > 0 else None for s in seeds]
    grads = ("x",) + tuple(k for k in adapter_like) + tuple(k for k in x_like if k.startswith("bias"))
    return _Inputs(x_like, adapter_like, dys, seeds, masks, grads, extra)


def _run_op(case: Case, inp: _Inputs, t: Dict[str, Tensor], backend: Optional[str]) -> List[Tensor]:
    """The case's outputs from leaves ``t``: through the package's op with ``backend``, or (None)
    through :mod:`rslora_kernels.reference` in the leaves' dtypes."""
    import rslora_kernels as rk
    from . import reference

    s, p = rk.rslora_scaling(16.0, case.r), case.dropout_p
    if case.op == "group":
        n = len(inp.dys)
        if backend is None:
            return [reference.lora_linear(t["x"], t[f"weight{i}"], t[f"lora_A{i}"], t[f"lora_B{i}"], s,
                                          t.get(f"bias{i}"), p, inp.masks[i]) for i in range(n)]
        return list(rk.lora_linear_group(
            t["x"], [t[f"weight{i}"] for i in range(n)], [t[f"lora_A{i}"] for i in range(n)],
            [t[f"lora_B{i}"] for i in range(n)], s, [t.get(f"bias{i}") for i in range(n)], p,
            seeds=inp.seeds, backend=backend))
    weight = t.get("weight")
    if case.op == "qlora":
        weight = inp.extra["weight4"] if backend is not None else inp.extra["dense"](torch.float32).to(t["x"].dtype)
    if case.op == "dora":
        if backend is None:
            return [reference.dora_linear(t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], s, t.get("bias"),
                                          p, inp.masks[0])]
        return [rk.dora_linear(t["x"], weight, t["lora_A"], t["lora_B"], t["magnitude"], s, t.get("bias"), p,
                               seed=inp.seeds[0], backend=backend)]
    if backend is None:
        return [reference.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], s, t.get("bias"), p, inp.masks[0])]
    return [rk.lora_linear(t["x"], weight, t["lora_A"], t["lora_B"], s, t.get("bias"), p, seed=inp.seeds[0],
                           backend=backend)]


def _forward_backward(case: Case, inp: _Inputs, backend: Optional[str], x_dtype: torch.dtype,
                      adapter_dtype: torch.dtype) -> Tuple[List[Tensor], List[Tensor]]:
    """(outputs, grads of ``inp.grads``) of one run, on fresh leaves of the given dtypes."""
    t = {k: v.to(x_dtype, copy=True) for k, v in inp.x_like.items()}
    t.update({k: v.to(adapter_dtype, copy=True) for k, v in inp.adapter_like.items()})
    for k in inp.grads:
        t[k].requires_grad_(True)
    ys = _run_op(case, inp, t, backend)
    leaves = [t[k] for k in inp.grads]
    grads = torch.autograd.grad(ys, leaves, [dy.to(y.dtype) for dy, y in zip(inp.dys, ys)], allow_unused=True)
    return ys, [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)]


# ----------------------------------------------------------------------------------------------
# The self-check
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """One backend on one :class:`Case`: ``tensors`` holds y (y0, y1, y2 for a group) and every
    grad ("dx", "dlora_A", ...) against the rule; ``error`` the exception the backend raised
    (then ``tensors`` is empty). ``ok``: no error and every tensor within its bound."""
    backend: str
    case: Case
    tensors: Tuple[TensorError, ...] = ()
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(e.ok for e in self.tensors)

    @property
    def worst(self) -> Optional[TensorError]:
        """The tensor closest to (or furthest past) its bound; None after an error."""
        return max(self.tensors, key=lambda e: e.ratio, default=None)

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.backend} on {self.case.describe()}: raised {self.error}"
        w = self.worst
        state = "ok" if self.ok else "FAILED"
        if w is None:
            return f"{self.backend} on {self.case.describe()}: {state}"
        detail = w.problem or f"err {w.err:.3e}, bound {w.bound:.3e}"
        return f"{self.backend} on {self.case.describe()}: {state}; worst {w.name} ({detail})"


def self_check(backend: str, case: Optional[Case] = None, **fields) -> CheckResult:
    """Run ``backend``'s forward and backward on the synthetic ``case`` (or ``Case(**fields)``) and
    compare y and every grad with the float64 oracle by the numerics rule.

    The case is made from a private generator (the caller's RNG state is untouched) with an
    explicit dropout seed, on fresh tensors; it runs with grad enabled, outside autocast and
    inference mode, whatever the caller's context. An exception from the backend is caught and
    reported in ``CheckResult.error``; a bad ``case`` or an unknown backend is a ValueError/TypeError.
    """
    from .ops.lora_linear import check_backend_name

    if case is None:
        case = Case(**fields)
    elif fields:
        case = replace(case, **fields)
    check_backend_name(backend)
    device = torch.device(case.device)
    with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
        inp = _make_inputs(case)
        f64 = torch.float64
        oracle_ys, oracle_grads = _forward_backward(case, inp, None, f64, f64)
        same_ys, same_grads = _forward_backward(case, inp, None, case.dtype, case.adapter)
        if case.adapter != case.dtype:
            # wider adapters: the kernels (and PyTorch under autocast) multiply with x-dtype operands, so
            # "the same math in the same dtype" is also the reference with every tensor in x's dtype;
            # each result takes the larger of the two same-dtype errors
            low_ys, low_grads = _forward_backward(case, inp, None, case.dtype, case.dtype)
            same_ys, same_grads = ([max(pair, key=lambda t, o=o: max_abs_err(t, o)) for pair, o in zip(zip(a, b), oracle)]
                                   for a, b, oracle in ((same_ys, low_ys, oracle_ys),
                                                        (same_grads, low_grads, oracle_grads)))
        try:
            ys, grads = _forward_backward(case, inp, backend, case.dtype, case.adapter)
        except Exception as e:  # noqa: BLE001  (any failure of the backend is a failed check, reported)
            return CheckResult(backend, case, (), f"{type(e).__name__}: {e}")
    names = ["y"] if len(ys) == 1 else [f"y{i}" for i in range(len(ys))]
    names += ["d" + k for k in inp.grads]
    want = [case.dtype] * len(ys) + [case.dtype if k in inp.x_like else case.adapter for k in inp.grads]
    errors = tuple(compare(n, g, o, s, d) for n, g, o, s, d in
                   zip(names, ys + grads, oracle_ys + oracle_grads, same_ys + same_grads, want))
    return CheckResult(backend, case, errors)


class _no_autocast:
    """Autocast off on ``device``'s type (a no-op where autocast is unavailable)."""

    def __init__(self, device: torch.device):
        self._ctx = (torch.autocast(device.type, enabled=False)
                     if torch.amp.is_autocast_available(device.type) else None)

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False
