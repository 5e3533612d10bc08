"""CPU figures of QLoRA: ours on a 4-bit base vs PEFT's 4-bit LoRA layer, side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.qlora_cpu [--M 2048] [--K 1024] [--N 1024] [--r 64] [--p 0.1]
                                                    [--quant nf4] [--out benchmarks/results]

One fp32 layer, frozen bitsandbytes 4-bit base (nested absmax, as QLoRA), trainable adapters,
x requiring grad (a layer inside a network). Methods take turns round after round, so machine
noise hits them alike; medians over the repeats after warm-up:

* qlora-composite -- ``rk.LoRALinear.from_linear(bnb.nn.Linear4bit)``, backend "composite";
* peft-qlora      -- PEFT's ``lora.bnb.Linear4bit`` (``use_rslora=True``);
* for context, the same two on the dense fp32 base: composite and peft.

"saved bytes": the distinct storages autograd keeps for backward (``saved_tensors_hooks``) during the
forward, x counted; the layer's parameters and the 4-bit weight's quant state are not (they exist
before the call). "dequant ms": one dequantization of the 4-bit weight to fp32 on its own (each
4-bit method does two per step: forward and backward). The load average is printed: the box is shared.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import rslora_kernels as rk
from rslora_kernels.quant import Weight4bit, dequantize_4bit

from . import providers as prov
from . import qlora_providers as qprov


def _quant_state_tensors(layer):
    """The 4-bit weights' own tensors (packed data, scales): they exist anyway, like parameters."""
    return [t for m in layer.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"
            for t in Weight4bit.from_bnb(m.weight).tensors()]


def run(M, K, N, r, p, quant, repeats, warmup, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(K, N).requires_grad_(False)
    layers = {
        "qlora-composite": qprov.make_layer("qlora-composite", base, r, 16.0, p, quant),
        "peft-qlora": qprov.make_layer("peft-qlora", base, r, 16.0, p, quant),
        "composite (16-bit base)": prov.make_layer("composite", base, r, 16.0, p),
        "peft (16-bit base)": prov.make_layer("peft", base, r, 16.0, p),
    }
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    times = {name: [] for name in layers}
    for i in range(warmup + repeats):
        for name, layer in layers.items():
            dt = prov.fwd_bwd_seconds(lambda: layer(x), dy, [x, *layer.parameters()])
            if i >= warmup:
                times[name].append(dt)
    w4 = Weight4bit.from_bnb(layers["qlora-composite"].base_layer.weight)
    deq = {}
    for impl in ("auto", "torch"):
        ts = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            dequantize_4bit(w4, torch.float32, impl=impl)
            ts.append(time.perf_counter() - t0)
        deq[impl] = 1e3 * statistics.median(ts[warmup:])
    rows = []
    for name, layer in layers.items():
        nbytes, what = prov.saved_for_backward(lambda: layer(x), [*layer.parameters(), *_quant_state_tensors(layer)],
                                               label=x)
        rows.append({"method": name, "ms": 1e3 * statistics.median(times[name]), "saved_bytes": nbytes, "saved": what})
    return rows, deq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--quant", choices=qprov.QUANT_TYPES, default="nf4")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for qlora_cpu_<date>.md/.json (default: print only)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    rows, deq = run(args.M, args.K, args.N, args.r, args.p, args.quant, args.repeats, args.warmup)
    load_after = os.getloadavg()
    here = Path(__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=here).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
           "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)]}
    try:
        import bitsandbytes
        import peft
        env.update(bitsandbytes=bitsandbytes.__version__, peft=peft.__version__)
    except ImportError:
        pass
    ref = {r["method"]: r for r in rows}["peft-qlora"]
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python -m benchmarks.qlora_cpu " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# QLoRA on the CPU: fwd+bwd of one layer, fp32, M={args.M}, K={args.K}, N={args.N}, r={args.r}, "
             f"p={args.p}, {args.quant} (nested absmax)", "", f"`{command}`", "",
             f"{env['date_utc']}, commit {commit}, torch {env['torch']}, bitsandbytes {env.get('bitsandbytes')}, "
             f"peft {env.get('peft')}, {env['threads']} thread(s) on {env['cpu_count']} cores, 1-min load average "
             f"{env['loadavg_1m_before_after'][0]} before / {env['loadavg_1m_before_after'][1]} after; medians of "
             f"{args.repeats} after {args.warmup} warm-up, methods interleaved.", "",
             "| method | fwd+bwd ms | speed vs peft-qlora | saved bytes | bytes vs peft-qlora |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['ms']:.1f} | {ref['ms'] / row['ms']:.2f}x | {row['saved_bytes']:,} | "
                     f"{row['saved_bytes'] / ref['saved_bytes']:.3f}x |")
    lines += ["", f"One dequantization of the 4-bit weight to fp32: {deq['auto']:.2f} ms (default CPU path: "
              f"bitsandbytes' native kernel, exact here since K is a multiple of the blocksize), "
              f"{deq['torch']:.2f} ms (PyTorch path).", "", "Saved for backward (x counted; parameters and quant state not):"]
    lines += [f"- {row['method']}: " + ", ".join(row["saved"]) for row in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{env['date_utc'][:10]}_qlora_cpu"  # benchmarks/results/ names: <date>_<what>
        stem.with_suffix(".md").write_text(text + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"env": env, "args": {k: v for k, v in vars(args).items()},
                                                         "rows": rows, "dequant_ms": deq}, indent=1) + "\n")
        print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
