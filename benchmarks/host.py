"""Host time per fwd+bwd: the Python and launch work of one training step of a layer, per provider.

    OMP_NUM_THREADS=1 python -m benchmarks.host [--M 8] [--K 64] [--N 64] [--ranks 8 16] [--ps 0 0.1]
                                                [--rounds 31] [--steps 20] [--top 25] [--device cpu]

A tiny shape (M = 8, K = N = 64 by default), where a step's arithmetic is negligible, so what is
timed is what every step pays whatever its size: Python, the dispatcher, autograd, allocations and
kernel launches. One layer each, x requiring grad (a layer inside a network), fwd+bwd with the
grads set to None between steps (untimed).

On the CPU (no GPU: the Triton backend runs in Triton's interpreter) the Triton launches are
stubbed: ``triton.runtime.interpreter.InterpretedFunction.run`` -- the interpreter's execution of
one launch (copying the arguments to numpy and running every program of the grid) -- is replaced
by a no-op that returns None. Everything of the package stays on the path: each launch still calls
that ``run`` with the same arguments (through ``kernel[grid](...)``, or directly from a launch
plan's ``BoundLaunch``, as that proxy would); the configs, grids, allocations, checks and autograd
glue all run. The outputs of stubbed kernels are
uninitialized memory, which the rows discard. A real launch costs more than the stub (a compiled
Triton kernel's launcher ~3-5 us on a GPU host), so on the CPU the triton rows are the package's
own host work plus ~1 us per launch. ``eager``, ``peft`` and the composite rows run their real
PyTorch ops (tiny at this shape).

On a GPU (``--device cuda``) nothing is stubbed: launches are real and the figure is the host time
to issue a step without waiting on the GPU (steps issued back to back; the GPU keeps up at this
shape), the host column of ``benchmarks.profile_step``.

Rows (those that cannot run here are listed with the reason):

    triton, composite          rk.LoRALinear (backend "triton" / "composite")
    floor                      what any Python autograd.Function with the fused step's outputs costs:
                               a layer whose Function allocates y and T, then U, dx, dA and dB,
                               and does nothing else (no launch, no check, no plan)
    eager                      the PEFT-style eager layer of benchmarks.providers (the baseline)
    peft                       PEFT's LoRA layer (use_rslora=True), when peft is installed
    dora-triton/-composite     rk.LoRALinear(use_dora=True)
    peft-dora                  PEFT's DoRA layer
    qlora-triton/-composite    rk.LoRALinear on a bitsandbytes nf4 base
    peft-qlora                 PEFT's 4-bit LoRA layer

Providers take turns round after round (one round: ``--steps`` steps of each), so machine noise
hits them alike; each figure is the median over the rounds of a round's median step on the CPU
(of its mean on CUDA, where steps are issued back to back). ``vs eager`` is the
median over the rounds of the row's time over the eager layer's in the same round (at the same
r, p): a load that changes between rounds cancels out of it. Then a cProfile of the triton path
(r and p the first of each), its top entries by own time.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from . import dora_providers as dprov
from . import providers as prov
from . import qlora_providers as qprov

ROWS = ("triton", "composite", "floor", "eager", "peft", "dora-triton", "dora-composite", "peft-dora",
        "qlora-triton", "qlora-composite", "peft-qlora")
STUB_NOTE = ("Triton launches stubbed: triton.runtime.interpreter.InterpretedFunction.run (the interpreter's "
             "execution of a launch) is a no-op; each launch still calls it, and all of the package's Python runs")


@contextlib.contextmanager
def stubbed_interpreter_launches():
    """Within the block, a Triton launch under the interpreter does nothing (see the module docstring)."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def no_op(self, *args, grid, warmup, **kwargs):
        return None

    InterpretedFunction.run = no_op
    try:
        yield
    finally:
        InterpretedFunction.run = real


def unavailable(device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """Rows that cannot run here, each with the reason."""
    from rslora_kernels._runtime import triton_available_for

    out = {}
    lora = prov.available(device, dtype, ("triton", "composite", "peft"))
    out.update({n: lora[n] for n in ("triton", "composite", "peft") if n in lora})
    dora = dprov.available(device, dtype, ("triton", "composite", "peft-dora"))
    out.update({("dora-" + n if n != "peft-dora" else n): why for n, why in dora.items()})
    out.update(qprov.available(device))
    if not triton_available_for(device):
        out.pop("triton", None)  # the message of providers.available says "too slow to time": stubbed here
        out["triton"] = out["dora-triton"] = out["qlora-triton"] = "needs a CUDA GPU or TRITON_INTERPRET=1"
    else:
        out.pop("dora-triton", None)
    return out


class _FloorFunction(torch.autograd.Function):
    """The fused step's autograd shape and allocations, nothing else (the ``floor`` row)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B):
        y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
        T = torch.empty((x.shape[0], lora_A.shape[0]), dtype=x.dtype, device=x.device)
        ctx.save_for_backward(x, weight, lora_A, lora_B, T)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, T = ctx.saved_tensors
        U = torch.empty((x.shape[0], lora_A.shape[0]), dtype=x.dtype, device=x.device)  # noqa: F841 (B1's output)
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device), None,
                torch.empty(lora_A.shape, dtype=lora_A.dtype, device=x.device),
                torch.empty(lora_B.shape, dtype=lora_B.dtype, device=x.device))


class _FloorLayer(nn.Module):
    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x):
        return _FloorFunction.apply(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight)


def make(name: str, base: nn.Linear, r: int, p: float) -> nn.Module:
    alpha = 16.0
    if name == "floor":
        return prov.train_adapters_only(_FloorLayer(base, r))
    if name.startswith("qlora-") or name == "peft-qlora":
        return qprov.make_layer(name, base, r, alpha, p, "nf4")
    if name.startswith("dora-"):
        return dprov.make_layer(name.split("-", 1)[1], base, r, alpha, p)
    if name == "peft-dora":
        return dprov.make_layer(name, base, r, alpha, p)
    return prov.make_layer(name, base, r, alpha, p)


def step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step():
        layer(x).backward(dy)
    return step


def _reset(params: List[torch.Tensor]) -> None:
    for t in params:
        t.grad = None


def round_us(step: Callable[[], None], params: List[torch.Tensor], steps: int, device: torch.device) -> float:
    """Host microseconds of one step in a round of ``steps`` steps, grads reset to None between
    them (untimed): on the CPU the median step (a step the OS preempted, on a loaded machine, does
    not count), on CUDA the mean of steps issued back to back after a sync and never waited on."""
    if device.type == "cuda":
        _reset(params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
            for t in params:  # a few attribute writes, counted on every row alike
                t.grad = None
        total = time.perf_counter() - t0
        torch.cuda.synchronize()
        return total / steps * 1e6
    times = []
    for _ in range(steps):
        _reset(params)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(names, device, dtype, M, K, N, r, p, rounds, steps, seed=0):
    """({row: median host us per step}, {row: median per-round ratio to eager, when eager is a
    row}, layers, x, dy) at one (r, p), rows interleaved."""
    torch.manual_seed(seed)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    layers = {n: make(n, base, r, p) for n in names}
    steps_of = {n: step_fn(layer, x, dy) for n, layer in layers.items()}
    params = {n: [x, *(q for q in layer.parameters() if q.requires_grad)] for n, layer in layers.items()}
    for n in names:  # warm-up: compile, caches, first allocations
        for _ in range(3):
            _reset(params[n])
            steps_of[n]()
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times[n].append(round_us(steps_of[n], params[n], steps, device))
    ratios = ({n: statistics.median(t / e for t, e in zip(ts, times["eager"])) for n, ts in times.items()}
              if "eager" in times else {})
    return {n: statistics.median(ts) for n, ts in times.items()}, ratios, layers, x, dy


def profile_top(step, params, steps: int, top: int) -> str:
    """The ``top`` entries of a cProfile of ``steps`` steps, by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        _reset(params)
        step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    return text[text.find("   ncalls"):] if "   ncalls" in text else text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25, help="profile entries printed (0: no profile)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read per launch by the package
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    skip = unavailable(device, dtype)
    names = [n for n in args.rows if n not in skip]
    stub = device.type == "cpu"
    command = "python -m benchmarks.host " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Host us per fwd+bwd: M={args.M}, K={args.K}, N={args.N}, {str(dtype).replace('torch.', '')}, "
             f"{device.type}, {torch.get_num_threads()} thread(s)", "", f"`{command}`", "",
             (STUB_NOTE if stub else "real launches; host time to issue a step, the GPU never waited on") + ".",
             f"Median over {args.rounds} rounds of a round's {'median' if stub else 'mean'} of {args.steps} steps; "
             "rows interleaved; vs eager: median of per-round ratios; "
             f"1-min load average {os.getloadavg()[0]:.2f}.", ""]
    lines += [f"- {n}: not run ({why})" for n, why in skip.items() if n in args.rows]
    lines += ["", "| r | p | row | host us | vs eager |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    first = None
    with stubbed_interpreter_launches() if stub else contextlib.nullcontext():
        for r in args.ranks:
            for p in args.ps:
                us, ratios, layers, x, dy = measure(names, device, dtype, args.M, args.K, args.N, r, p,
                                                    args.rounds, args.steps)
                first = first or (layers, x, dy, r, p)
                for n in names:
                    ratio = f"{ratios[n]:.2f}" if ratios else "-"
                    line = f"| {r} | {p:g} | {n} | {us[n]:.1f} | {ratio} |"
                    lines.append(line)
                    print(line, flush=True)
        if args.top and first is not None and "triton" in first[0]:
            layers, x, dy, r, p = first
            layer = layers["triton"]
            params = [x, *(q for q in layer.parameters() if q.requires_grad)]
            text = profile_top(step_fn(layer, x, dy), params, 200, args.top)
            block = ["", f"cProfile of the triton row (r={r}, p={p:g}), 200 steps, top {args.top} by own time:",
                     "", "```", text.rstrip(), "```"]
            lines += block
            print("\n".join(block))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
