"""Determinism check: the same forward+backward twice must give bit-identical outputs and grads.

    python -m benchmarks.determinism [--device cuda] [--backend triton]

The Triton backward reduces dA and dB over M without float atomics (split-M partials summed in a
fixed order), so repeated runs must agree bit for bit. Cases cover small and large ranks (one and
several rank tiles), split-M on and off (M large vs small against the rank), dropout on and off,
bias on, in every dtype. Exits 1 and names the tensor on any difference.
"""
from __future__ import annotations

import argparse
import sys

import torch

import rslora_kernels as rk

CASES = [  # (M, K, N, r, p)
    (4096, 1024, 1024, 16, 0.1),   # small r, long M: B3 splits M
    (4096, 1024, 1024, 16, 0.0),
    (333, 1000, 700, 200, 0.1),    # ragged sizes, several rank tiles
    (2048, 4096, 4096, 1024, 0.1),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_once(x, W, b, A, B, dy, s, p, seed, backend):
    x = x.detach().requires_grad_()
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = rk.lora_linear(x, W, A, B, s, bias=b, dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad, "db": b.grad}


def cases(scale: int = 1):
    """CASES with M, K, N, r divided by ``scale`` (at least 1): the interpreter needs tiny sizes."""
    return [(max(M // scale, 1), max(K // scale, 1), max(N // scale, 1), max(r // scale, 1), p)
            for M, K, N, r, p in CASES]


def make_inputs(case, dtype, device):
    """(x, W, b, A, B, dy, s, p) of one case, drawn from a fixed CPU generator."""
    M, K, N, r, p = case
    g = torch.Generator(device="cpu").manual_seed(1234)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, W, b, A, B, dy = mk(M, K), mk(N, K) / K ** 0.5, mk(N), mk(r, K) / K ** 0.5, mk(N, r), mk(M, N)
    return x, W, b, A, B, dy, rk.rslora_scaling(16.0, r), p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="default: triton on CUDA, auto on the CPU")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16", "fp32"])
    ap.add_argument("--small", action="store_true", help="shrink the cases 8x (for the CPU interpreter)")
    ap.add_argument("--scale", type=int, default=None, help="shrink the cases this many times (overrides --small)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("triton" if device.type == "cuda" else "auto")
    scale = args.scale or (8 if args.small else 1)
    failures = 0
    for name in args.dtypes:
        dtype = DTYPES[name]
        for case in cases(scale):
            M, K, N, r, p = case
            x, W, b, A, B, dy, s, p = make_inputs(case, dtype, device)
            first = run_once(x, W, b, A, B, dy, s, p, 42, backend)
            second = run_once(x, W, b, A, B, dy, s, p, 42, backend)
            diff = [k for k in first if not torch.equal(first[k], second[k])]
            nan = [k for k in first if not torch.isfinite(first[k]).all()]
            status = "ok" if not diff and not nan else f"DIFFERS: {diff}" + (f" non-finite: {nan}" if nan else "")
            failures += status != "ok"
            print(f"{backend:9s} {name:5s} M={M:5d} K={K:5d} N={N:5d} r={r:5d} p={p}: {status}")
    print("determinism: " + ("PASS" if not failures else f"FAIL ({failures} cases)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
