"""One small ragged case of every Triton kernel: what ``compute-sanitizer --tool memcheck`` runs.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.ragged     # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.ragged --device cpu --small                 # the same on the CPU

No size is a multiple of any tile, so every kernel's edge masks are exercised. Through the public
entry points: the op forward + backward with bias and dropout (F1, F2, B1 with the bias column sums,
B2 with the mask, B3 once writing dA/dB directly and once as split-M partials), the op without
dropout, a rank spanning several rank tiles, the composite backend (its dropout kernel on CUDA),
``dropout_mask`` (the mask kernel) and ``merge_lora_`` (the merge kernel). Whatever kernels these
launch get checked, including ones added later.

Memory errors are the sanitizer's to report; this script checks that every output is finite and
prints its relative error against the float64 reference (the CUDA numerics tests judge accuracy).
Exit 1 on a non-finite output.
"""
from __future__ import annotations

import argparse
import sys

import torch

import rslora_kernels as rk
from rslora_kernels.ops.merge import merge_lora_

# (M, K, N, r, p, backend): M=97 leaves B3 unsplit, M=1000 splits it over M (partials summed in a
# second pass); r=200 spans two rank tiles; p=0 takes the kernels' no-dropout branch.
CASES = [(97, 203, 187, 19, 0.1, "triton"), (1000, 203, 187, 19, 0.1, "triton"), (333, 203, 187, 200, 0.0, "triton"),
         (97, 203, 187, 19, 0.1, "composite")]
SMALL = [(33, 45, 29, 3, 0.1, "triton"), (300, 45, 29, 3, 0.1, "triton"), (33, 45, 29, 70, 0.0, "triton"),
         (33, 45, 29, 3, 0.1, "composite")]
SEED = 1234


def _inputs(M, K, N, r, dtype, device):
    g = torch.Generator().manual_seed(M * 7 + r)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)  # noqa: E731
    return mk(M, K), mk(N, K, scale=K ** -0.5), mk(N), mk(r, K, scale=K ** -0.5), mk(N, r, scale=r ** -0.5), mk(M, N)


def launch_all(device, dtype, small: bool = False):
    """Run every case; returns [(name, result, float64 reference)] (references None on 'meta')."""
    out = []
    for M, K, N, r, p, backend in (SMALL if small else CASES):
        x, W, b, A, B, dy = _inputs(M, K, N, r, dtype, device)
        leaves = [t.clone().requires_grad_() for t in (x, A, B, b)]
        s = rk.rslora_scaling(16.0, r)
        y = rk.lora_linear(leaves[0], W, leaves[1], leaves[2], s, bias=leaves[3], dropout_p=p, seed=SEED,
                           backend=backend)
        y.backward(dy)
        got = [y] + [t.grad for t in leaves]
        want = [None] * len(got)
        if device.type != "meta":
            mask = rk.dropout_mask(SEED, (M, K), p, device) if p > 0 else None
            ref = [t.detach().double().requires_grad_() for t in (x, A, B, b)]
            y64 = rk.reference.lora_linear(ref[0], W.double(), ref[1], ref[2], s, ref[3], p, mask)
            y64.backward(dy.double())
            want = [y64] + [t.grad for t in ref]
        name = f"{backend} M={M} K={K} N={N} r={r} p={p}"
        out += [(f"{name} {what}", g_, w_) for what, g_, w_ in zip(("y", "dx", "dA", "dB", "db"), got, want)]
    M, K = (SMALL if small else CASES)[0][:2]
    if device.type == "meta":  # precompile's enumeration: rk.dropout_mask wants a device that holds data,
        from rslora_kernels.dropout.kernels import keep_mask_triton  # so launch the kernel it would call
        mask = keep_mask_triton(SEED, M, K, 0.3, device)
    else:
        mask = rk.dropout_mask(SEED, (M, K), 0.3, device)
    out.append((f"dropout_mask {M}x{K}", mask.float(), None))
    N, K, r = 187 if not small else 29, K, 19 if not small else 3
    _, W, _, A, B, _ = _inputs(1, K, N, r, dtype, device)
    merged = W.clone()
    merge_lora_(merged, A, B, 0.25)
    out.append((f"merge {N}x{K} r={r}", merged, None if device.type == "meta" else W.double() + 0.25 * B.double() @ A.double()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--small", action="store_true", help="smaller sizes (the CPU interpreter)")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bad = 0
    for name, got, want in launch_all(torch.device(args.device), dtype, args.small):
        finite = bool(torch.isfinite(got).all())
        err = "" if want is None else \
            f" rel err {float((got.double() - want).norm() / want.norm().clamp_min(1e-30)):.2e}"
        bad += not finite
        print(f"{name}: {'finite' if finite else 'NON-FINITE'}{err}")
    print("ragged: " + ("PASS" if not bad else f"FAIL ({bad} non-finite outputs)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
