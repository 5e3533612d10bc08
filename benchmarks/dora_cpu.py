"""CPU figures of DoRA: ours vs PEFT's DoRA layer, and our DoRA vs our LoRA (forward+backward).

    python -m benchmarks.dora_cpu [--M 2048] [--K 1024] [--N 1024] [--r 64] [--ps 0 0.1] [--repeats 15]
                                  [--threads T] [--out benchmarks/results/dora_cpu_<date>.md]

Side by side in one run, round-robin over the methods (machine noise hits all alike), medians
after warm-up, fp32:

* ours-dora  -- ``rk.LoRALinear(use_dora=True, backend="composite")`` (what ``rk.peft.patch`` runs);
* peft-dora  -- a real PEFT ``lora.Linear`` with ``use_dora=True`` (PEFT's own forward);
* ours-lora  -- ``rk.LoRALinear(backend="composite")``, the same layer without DoRA (the overhead);
* 1 GEMM     -- one ``torch.mm`` of the base shape ([M, K] x [K, N]), the yardstick: with dropout,
                PEFT's formula needs x W^T and drop(x) W^T forward and dy W and ((g-1) dy) W
                backward, 4 base GEMMs for PEFT and for us alike; without dropout 2;
* floor      -- those base GEMMs and the rank-r ones (x A^T, T B^T, dy B, dy^T T, U^T x, U A, and
                W A^T for the norms), bare ``torch.mm`` into preallocated outputs: no elementwise
                pass, no autograd. Any exact method that runs these products densely takes at
                least this long, so ``peft-dora / floor`` bounds the speedup any rewrite can reach;
* floor-sparse (p > 0) -- the same with the two dropout-only base GEMMs replaced by products over
                the dropped elements alone (drop(x) = (x - x*D) / (1-p), D the dropped positions:
                a CSR product (x*D) W^T and a sampled product D*(dy' W)), the CSR matrices built
                outside the timing: a lower bound on the sparse-correction rewrite.

x requires grad (a layer inside a network), the base is frozen; A, B (and the magnitude) train.
"saved" counts the storages autograd still holds for backward after the forward (graphs that
die within the forward, like PEFT's detached ``B A``, are not counted), parameters excluded,
once with x (``saved``) and once without (``saved-x``: what the layer adds to the activations).
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stdout
from typing import Callable, Dict, List

import torch
from torch import nn

import rslora_kernels as rk

from . import providers

ALPHA = 16.0


def peft_dora_layer(base: nn.Linear, r: int, p: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

    model = get_peft_model(Holder(), LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=p, target_modules=["proj"],
                                                use_rslora=True, use_dora=True))
    return model.base_model.model.proj


def ours_layer(base: nn.Linear, r: int, p: float, use_dora: bool) -> nn.Module:
    return rk.LoRALinear.from_linear(base, r, ALPHA, dropout=p, rank_stabilized=True, backend="composite",
                                     use_dora=use_dora)


def _same_adapters(layers: Dict[str, nn.Module], seed: int) -> None:
    """Non-zero B (and magnitudes off their init) shared by every layer, so nothing is skippable."""
    g = torch.Generator().manual_seed(seed)
    peft = layers["peft-dora"]
    with torch.no_grad():
        A = peft.lora_A["default"].weight
        B = peft.lora_B["default"].weight.copy_(torch.randn(peft.lora_B["default"].weight.shape, generator=g) * 0.02)
        m = peft.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.1 * torch.rand(m.shape, generator=g))
        for name, layer in layers.items():
            if name != "peft-dora":
                layer.lora_A.weight.copy_(A)
                layer.lora_B.weight.copy_(B)
                if layer.use_dora:
                    layer.lora_magnitude_vector.weight.copy_(m)


def floor_steps(x: torch.Tensor, W: torch.Tensor, r: int, p: float, seed: int) -> Dict[str, Callable[[], None]]:
    """The bare products of one DoRA step (see the module docstring): "floor" and, with dropout,
    "floor-sparse". Operands are fresh random tensors of the layer's shapes; outputs preallocated."""
    g = torch.Generator().manual_seed(seed)
    M, K = x.shape
    N = W.shape[0]
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    dy, T, U = torch.randn(M, N, generator=g), torch.randn(M, r, generator=g), torch.randn(M, r, generator=g)
    outs = {"MN": torch.empty(M, N), "MK": torch.empty(M, K), "Mr": torch.empty(M, r), "Nr": torch.empty(N, r),
            "rK": torch.empty(r, K)}
    Wt = W.t()

    def rank_and_norm():
        torch.mm(x, A.t(), out=outs["Mr"])       # T = x A^T
        torch.mm(T, B.t(), out=outs["MN"])       # T B^T
        torch.mm(dy, B, out=outs["Mr"])          # U = dy B
        torch.mm(dy.t(), T, out=outs["Nr"])      # dB
        torch.mm(U.t(), x, out=outs["rK"])       # dA
        torch.mm(U, A, out=outs["MK"])           # U A
        torch.mm(W, A.t(), out=outs["Nr"])       # W A^T (row norms)

    def dense_base():
        torch.mm(x, Wt, out=outs["MN"])          # x W^T
        torch.mm(dy, W, out=outs["MK"])          # dy W

    def floor():
        dense_base()
        if p > 0.0:                              # drop(x) W^T, ((g-1) dy) W
            torch.mm(x, Wt, out=outs["MN"])
            torch.mm(dy, W, out=outs["MK"])
        rank_and_norm()

    steps = {"floor": floor}
    if p > 0.0:
        dropped = torch.rand(M, K, generator=g) < p
        with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            x_dropped = (x.detach() * dropped).to_sparse_csr()
            dropped_csr = dropped.float().to_sparse_csr()

        def floor_sparse():
            dense_base()
            torch.sparse.mm(x_dropped, Wt)       # (x*D) W^T
            torch.sparse.sampled_addmm(dropped_csr, dy, W, beta=0.0)  # D * (dy' W)
            rank_and_norm()

        steps["floor-sparse"] = floor_sparse
    return steps


def run(M: int, K: int, N: int, r: int, ps, repeats: int, warmup: int, seed: int = 0) -> List[Dict]:
    torch.manual_seed(seed)
    base = nn.Linear(K, N)
    base.requires_grad_(False)
    rows = []
    for p in ps:
        layers = {"ours-dora": ours_layer(base, r, p, True), "peft-dora": peft_dora_layer(base, r, p),
                  "ours-lora": ours_layer(base, r, p, False)}
        _same_adapters(layers, seed + 1)
        for layer in layers.values():
            layer.train()
        x = torch.randn(M, K, requires_grad=True)
        dy = torch.randn(M, N)
        if p == 0.0:  # same math: ours and PEFT agree (a sanity check, not a test)
            y_ours, y_peft = layers["ours-dora"](x), layers["peft-dora"](x)
            assert torch.allclose(y_ours, y_peft, rtol=1e-4, atol=1e-4), (y_ours - y_peft).abs().max()
        times = {name: [] for name in layers}
        times["1 GEMM"] = []
        Wt = base.weight.t()
        floors = floor_steps(x.detach(), base.weight, r, p, seed + 2)
        times.update({name: [] for name in floors})
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            torch.mm(x.detach(), Wt)
            if i >= warmup:
                times["1 GEMM"].append(time.perf_counter() - t0)
            for name, step in floors.items():
                t0 = time.perf_counter()
                step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
            for name, layer in layers.items():
                t = providers.fwd_bwd_seconds(lambda: layer(x), dy, [x, *layer.parameters()])
                if i >= warmup:
                    times[name].append(t)
        for name, layer in layers.items():
            params = [prm for prm in layer.parameters()]
            with_x, shapes = providers.saved_for_backward(lambda: layer(x), params, label=x, held_only=True)
            without_x = with_x - (x.untyped_storage().nbytes() if any(w.endswith("(x)") for w in shapes) else 0)
            rows.append({"p": p, "method": name, "ms": 1e3 * statistics.median(times[name]),
                         "saved": with_x, "saved_no_x": without_x, "what": shapes})
        for name in ("1 GEMM", *floors):
            rows.append({"p": p, "method": name, "ms": 1e3 * statistics.median(times[name]),
                         "saved": None, "saved_no_x": None, "what": []})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--out", help="also write the report (with machine, date, commit, command, load) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    buf = io.StringIO()
    with redirect_stdout(buf):
        report(args)
    text = buf.getvalue()
    if args.out:
        try:
            commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
        header = (f"# DoRA on the CPU: ours vs PEFT's DoRA, fwd+bwd of one layer\n\n"
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
                  f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} thread(s), 1-min load average {load_before:.2f} before / "
                  f"{os.getloadavg()[0]:.2f} after.\n\n"
                  f"Command: `python -m benchmarks.dora_cpu {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
        with open(args.out, "w") as f:
            f.write(header + "```\n" + text + "```\n")
    print(text, end="")


def report(args):
    print(f"fp32, M={args.M}, K={args.K}, N={args.N}, r={args.r}, fwd+bwd, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} after {args.warmup} warm-up")
    rows = run(args.M, args.K, args.N, args.r, args.ps, args.repeats, args.warmup)
    print(f"{'p':>4} {'method':<10} {'fwd+bwd ms':>10} {'speedup':>8} {'saved B':>12} {'vs peft':>8} "
          f"{'saved-x B':>12} {'vs peft':>8} {'GEMMs':>6}")
    by_p: Dict[float, Dict[str, Dict]] = {}
    for row in rows:
        by_p.setdefault(row["p"], {})[row["method"]] = row
    for p, group in by_p.items():
        peft = group["peft-dora"]
        gemm = group["1 GEMM"]["ms"]
        for name, row in group.items():
            if row["saved"] is None:
                bound = f"{peft['ms'] / row['ms']:>7.2f}x" if name.startswith("floor") else ""
                print(f"{p:>4} {name:<10} {row['ms']:>10.1f} {bound:>8} {'':>12} {'':>8} {'':>12} {'':>8} "
                      f"{row['ms'] / gemm:>6.2f}")
                continue
            print(f"{p:>4} {name:<10} {row['ms']:>10.1f} {peft['ms'] / row['ms']:>7.2f}x {row['saved']:>12,d} "
                  f"{row['saved'] / peft['saved']:>7.3f}x {row['saved_no_x']:>12,d} "
                  f"{row['saved_no_x'] / peft['saved_no_x']:>7.3f}x {row['ms'] / gemm:>6.2f}")
        lora, dora = group["ours-lora"], group["ours-dora"]
        print(f"{p:>4} ours-dora / ours-lora time: {dora['ms'] / lora['ms']:.2f}x")
    print("speedup: peft-dora time / method time (for a floor: the most any rewrite of that kind can reach); "
          "vs peft: method bytes / peft-dora bytes; GEMMs: method time / time of one base GEMM")
    for row in rows:
        if row["saved"] is None:
            continue
        print(f"  p={row['p']} {row['method']:<10} saved: {', '.join(row['what'])}")


if __name__ == "__main__":
    main()
