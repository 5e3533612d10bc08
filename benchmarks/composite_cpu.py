"""CPU benchmark of the "composite" backend: forward+backward time and bytes saved for backward.

    python -m benchmarks.composite_cpu [--ranks 16 64 256] [--M 2048] [--K 1024] [--N 1024] [--p 0.1]

Compares, side by side in one run (round-robin over the methods, so that machine noise hits all of
them alike; medians over the repeats, after warm-up):

* composite -- ``rk.lora_linear(..., backend="composite")``: torch GEMMs, Philox mask from csrc/;
* reference -- ``rk.lora_linear(..., backend="reference")``: plain PyTorch autograd with an explicit mask;
* comp. p=0 -- composite without dropout (its time minus this one is what dropout costs in context);
* peft-eager -- what a PEFT LoRA layer does: ``base(x) + lora_B(lora_A(nn.Dropout(p)(x))) * s``.

x requires grad (a layer inside a network), the base weight and bias are frozen, the adapters train.
"saved bytes" counts the tensors autograd keeps for backward (``saved_tensors_hooks``), deduplicated
by storage, excluding the parameters (W, b, A, B: they exist anyway); x is counted.
"mask ms" is the time composite spends in the dropout stream: the forward's drop of x plus the
backward's paired pass (drop of x and mask of dy B A), timed on their own at the same shapes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import rslora_kernels as rk
from rslora_kernels.ops import composite  # noqa: F401  (registers the backend)
from rslora_kernels.dropout.csrc import csrc_ops

from . import providers as prov

ALPHA = 16.0  # s = ALPHA / sqrt(r), as in the sweep


def _peft_style(K: int, N: int, r: int, p: float, W, b, A, B) -> nn.Module:
    """The shared PEFT-style eager layer (``providers.EagerLoRA``) holding copies of W, b, A, B."""
    base = nn.Linear(K, N)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    layer = prov.make_layer("eager", base, r, ALPHA, p)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    return layer


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(ranks, M: int, K: int, N: int, p: float, repeats: int, warmup: int, seed: int = 0) -> List[Dict]:
    torch.manual_seed(seed)
    ops = csrc_ops()
    if ops is None:
        raise SystemExit("the C++ extension (csrc/) is unavailable; this benchmark measures it")
    rows = []
    for r in ranks:
        s = rk.rslora_scaling(ALPHA, r)
        x = torch.randn(M, K, requires_grad=True)
        W = torch.randn(N, K) / K**0.5
        b = torch.randn(N)
        A = (torch.randn(r, K) / K**0.5).requires_grad_(True)
        B = (torch.randn(N, r) * 0.01).requires_grad_(True)
        dy = torch.randn(M, N)
        peft = _peft_style(K, N, r, p, W, b, A.detach(), B.detach())
        methods = {
            "composite": (lambda: rk.lora_linear(x, W, A, B, s, b, p, backend="composite"), [x, A, B]),
            "comp. p=0": (lambda: rk.lora_linear(x, W, A, B, s, b, 0.0, backend="composite"), [x, A, B]),
            "reference": (lambda: rk.lora_linear(x, W, A, B, s, b, p, backend="reference"), [x, A, B]),
            "peft-eager": (lambda: peft(x), [x, *peft.parameters()]),
        }
        times = {name: [] for name in methods}
        for i in range(warmup + repeats):
            for name, (step, params) in methods.items():
                t = prov.fwd_bwd_seconds(step, dy, params)
                if i >= warmup:
                    times[name].append(t)
        # the dropout stream inside composite, alone at the same shapes
        seed_int = 2**40 + 1
        g = torch.empty(M, K)
        mask_t = []
        for i in range(warmup + repeats):
            t = _timed(lambda: ops.philox_dropout_scale(x.detach(), seed_int, p, 1.0 / (1.0 - p)))
            t += _timed(lambda: ops.philox_dropout_scale_pair_(g, x.detach(), seed_int, p, s / (1.0 - p), 1.0 / (1.0 - p)))
            if i >= warmup:
                mask_t.append(t)
        for name, (step, params) in methods.items():
            exclude = [W, b, A, B, *(t for t in params if t is not x)]  # parameters, not activations
            nbytes, what = prov.saved_for_backward(step, exclude, label=x)
            rows.append({
                "r": r, "method": name, "what": what,
                "ms": 1e3 * statistics.median(times[name]),
                "saved_bytes": nbytes,
                "mask_ms": 1e3 * statistics.median(mask_t) if name == "composite" else None,
            })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"fp32, M={args.M}, K={args.K}, N={args.N}, p={args.p}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} after {args.warmup} warm-up")
    rows = run(args.ranks, args.M, args.K, args.N, args.p, args.repeats, args.warmup)
    print(f"{'r':>5} {'method':<11} {'fwd+bwd ms':>10} {'saved bytes':>12} {'vs peft time':>12} "
          f"{'vs peft bytes':>13} {'mask ms':>8}")
    by_r = {}
    for row in rows:
        by_r.setdefault(row["r"], {})[row["method"]] = row
    for r, group in by_r.items():
        peft = group["peft-eager"]
        for name, row in group.items():
            speed = peft["ms"] / row["ms"]  # > 1: faster than peft-eager
            mask = f"{row['mask_ms']:8.1f}" if row["mask_ms"] is not None else f"{'':>8}"
            print(f"{r:>5} {name:<11} {row['ms']:>10.1f} {row['saved_bytes']:>12,d} {speed:>11.2f}x "
                  f"{row['saved_bytes'] / peft['saved_bytes']:>12.4f}x {mask}")
    print("vs peft time: peft-eager time / method time (>= 0.95 is the issue's bar for composite); "
          "vs peft bytes: method bytes / peft-eager bytes (<= 0.5 is the bar)")
    print(f"saved for backward at r={rows[-1]['r']} (parameters not counted):")
    for row in rows:
        if row["r"] == rows[-1]["r"]:
            print(f"  {row['method']:<11} {', '.join(row['what'])}")


if __name__ == "__main__":
    main()
