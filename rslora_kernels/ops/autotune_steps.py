"""What ``auto`` measures on first use, per op: its candidates, a forward+backward step, a self-check.

The engine (:mod:`rslora_kernels.ops.autotune`) imports no op; this module sits above the four ops
and registers one :class:`~rslora_kernels.ops.autotune.Measurer` each (the package imports it).

Candidates: every registered backend with a backward (a fused backend of the LoRA op) that runs on
the device in the call's dtypes -- ``triton`` once per plan of ``tuning.PLANS`` for the ops that run
the LoRA kernels (lora, dora, qlora) --, "reference" never (it is the oracle). For a group, the
backends with a group implementation (``GROUP_BACKENDS``) and the other fused backends (which run
the members one by one).

Steps run on tensors made here from a private generator, of the call's sizes and dtypes,
contiguous: x ``[M, K]`` and the adapters require grad, the base weight does not, dy is random; one
step is the op's forward and ``torch.autograd.grad`` of its output(s). A group is three members
whose widths split N as q/k/v do (:func:`rslora_kernels.selfcheck.group_widths`), each of rank r; a
4-bit base is NF4 with random codes. The self-check is :func:`rslora_kernels.selfcheck.self_check`
on the same signature, its rows capped so that the float64 oracle's x and W stay near 2^25
elements each.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from ..quant import Weight4bit
from ..scaling import rslora_scaling
from ..selfcheck import Case, group_widths, self_check
from . import autotune
from .autotune import Candidate, CheckOutcome, Measurer, Problem, Signature
from .dora import dora_linear
from .group import lora_linear_group
from .lora_linear import lora_linear, registered_backends
from .qlora import qlora_linear
from .tuning import PLANS

__all__ = ["candidates", "make_step", "check"]

_CHECK_ELEMENTS = 1 << 25  # rows of the self-check's case: x and W in float64 near this many elements each
_SEED = 1234  # the dropout seed of the timed steps (explicit: no draw from the user's generator)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def candidates(device: torch.device, sig: Signature) -> List[Candidate]:
    """The eligible candidates of ``sig`` on ``device`` (see the module docstring), in registry order."""
    dt, adt = _dtype(sig.dtype), _dtype(sig.adapter_dtype)
    out = []
    for name, spec in registered_backends().items():
        if spec.backward is None or not spec.runs_on(device) or dt not in spec.dtypes or adt not in spec.dtypes:
            continue
        if name == "triton" and sig.op != "group":
            out += [Candidate(name, plan) for plan in PLANS]
        else:
            out.append(Candidate(name))
    return out


def make_step(candidate: Candidate, problem: Problem, sig: Signature, device: torch.device) -> Callable[[], object]:
    """One forward+backward of ``candidate`` on synthetic tensors of the call's sizes (made once, here)."""
    dt, adt = _dtype(sig.dtype), _dtype(sig.adapter_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    M, N, K, r = problem.M, problem.N, problem.K, problem.r
    p = float(problem.dropout_p) if sig.dropout else 0.0
    s = rslora_scaling(16.0, r)

    def rnd(*shape, dtype=dt, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)
        return t.requires_grad_(grad)

    x = rnd(M, K, grad=True)
    backend = candidate.backend
    if sig.op == "group":
        widths = group_widths(N)
        Ws = [rnd(n, K, scale=K ** -0.5) for n in widths]
        As = [rnd(r, K, dtype=adt, scale=K ** -0.5, grad=True) for _ in widths]
        Bs = [rnd(n, r, dtype=adt, scale=r ** -0.5, grad=True) for n in widths]
        biases = [rnd(n) if sig.bias else None for n in widths]
        dys = [rnd(M, n) for n in widths]
        seeds = [_SEED + i for i in range(len(widths))]
        leaves = (x, *As, *Bs)

        def step():
            ys = lora_linear_group(x, Ws, As, Bs, s, biases, p, True, seeds, backend)
            return torch.autograd.grad(ys, leaves, dys)
        return step
    A = rnd(r, K, dtype=adt, scale=K ** -0.5, grad=True)
    B = rnd(N, r, dtype=adt, scale=r ** -0.5, grad=True)
    bias = rnd(N) if sig.bias else None
    dy = rnd(M, N)
    if sig.op == "qlora":
        blocksize = 64
        packed = torch.randint(0, 256, ((N * K + 1) // 2,), generator=gen, device=device, dtype=torch.uint8)
        absmax = torch.rand(-(-N * K // blocksize), generator=gen, device=device).mul_(K ** -0.5).add_(K ** -0.5)
        w4 = Weight4bit(packed, absmax, (N, K), blocksize, "nf4")

        def step():
            y = qlora_linear(x, w4, A, B, s, bias, p, True, _SEED, backend)
            return torch.autograd.grad(y, (x, A, B), dy)
        return step
    W = rnd(N, K, scale=K ** -0.5)
    if sig.op == "dora":
        m = (torch.linalg.vector_norm(W.float(), dim=1) * 1.1).to(adt).requires_grad_(True)

        def step():
            y = dora_linear(x, W, A, B, m, s, bias, p, True, _SEED, backend)
            return torch.autograd.grad(y, (x, A, B, m), dy)
        return step

    def step():
        y = lora_linear(x, W, A, B, s, bias, p, True, _SEED, backend)
        return torch.autograd.grad(y, (x, A, B), dy)
    return step


def check(candidate: Candidate, problem: Problem, sig: Signature, device: torch.device) -> CheckOutcome:
    """:func:`rslora_kernels.selfcheck.self_check` of ``candidate`` on the signature's case (the
    engine runs it under the candidate's plan)."""
    N = max(problem.N, 3) if sig.op == "group" else problem.N  # a group case has three members
    rows = max(1, min(problem.M, _CHECK_ELEMENTS // max(N, problem.K, 1)))
    case = Case(op=sig.op, M=rows, N=N, K=problem.K, r=problem.r, dtype=_dtype(sig.dtype),
                adapter_dtype=_dtype(sig.adapter_dtype), dropout_p=float(problem.dropout_p) if sig.dropout else 0.0,
                bias=sig.bias, device=device, seed=0)
    result = self_check(candidate.backend, case)
    if result.ok:
        w = result.worst
        return CheckOutcome(True, f"worst {w.name}: err {w.err:.3e} <= bound {w.bound:.3e}" if w else "ok")
    if result.error is not None:
        return CheckOutcome(False, f"raised {result.error}")
    w = result.worst
    return CheckOutcome(False, f"{w.name}: {w.problem}" if w.problem else
                        f"{w.name}: err {w.err:.3e} > bound {w.bound:.3e} (M={rows} rows checked)")


for _op in ("lora", "dora", "qlora", "group"):
    autotune.register_measurer(_op, Measurer(candidates, make_step, check))
