"""Benchmark sweep across LoRA ranks: fused kernels vs PEFT-style layers vs the roofline.

    python -m benchmarks.sweep                      # defaults for the device found (CPU: a few minutes)
    python -m benchmarks.sweep --quick              # smoke run
    python -m benchmarks.sweep --shapes 7b-attn --m 8192 --ranks 16 256 --modes fwd+bwd --dropout 0.1

For every (shape, M, dropout p, rank r, provider, mode) it reports

* ``ms``: median time of one call. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed
  between calls, warm-up first); each call issued from Python, so a step whose kernels finish
  before the host has issued them is timed by its host work (``benchmarks.profile_step`` shows
  the split). ``--timing graph`` times replays of the call captured in a CUDA graph instead: the
  GPU's time alone (fwd and fwd+bwd). CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up,
  many repeats, median of blocks). Inputs rotate through several buffers so caches don't flatter.
* ``TFLOP/s``: the op's FLOPs for the mode over ``ms``. With W frozen and x needing its gradient:

      fwd       y = x W^T (2MNK) + T = drop(x) A^T (2MKr) + T B^T (2MNr)    = 2MNK + 2Mr(K+N)
      bwd       dx = dy W (2MNK) + U = dy B (2MNr) + U A (2MrK)
                + dA = U^T drop(x) (2MrK) + dB = dy^T T (2MNr)             = 2MNK + 4Mr(K+N)
      fwd+bwd                                                              = 4MNK + 6Mr(K+N)

  (elementwise work -- dropout, scaling, bias, adds -- is not counted).
* ``roof %``: the roofline time over ``ms``. The roofline time is the mode's FLOPs at the dense
  GEMM rate measured in the same run on the same device for the base GEMM of the shape
  ([M, K] x [K, N]; cuBLAS via torch.mm on a GPU, torch.mm on the CPU), timed again for every
  case, in turn with the providers. A provider doing exactly
  the necessary products at dense-GEMM efficiency would score 100 %.
* ``speedup``: the PEFT-style eager layer's time over this provider's time (same mode and case).
* ``mem``: GPU: peak memory allocated by one call above what was allocated before it
  (``torch.cuda.max_memory_allocated``). CPU: bytes the forward saves for backward (unique
  storages seen by ``torch.autograd.graph.saved_tensors_hooks``, not counting x and the layer's
  parameters, which every provider keeps anyway).

Outputs (under ``--out``): ``sweep.csv``, ``sweep.json`` (rows + environment), ``sweep.md`` (the
tables printed on stdout) and PNG plots of time and speedup vs rank. The CSV (``--csv`` puts it
elsewhere, e.g. one file shared by several sweeps) gets each case's rows as soon as the case is
measured, so a run stopped by a time limit keeps every finished row; SIGTERM (what ``timeout``
sends) stops the sweep after the current measurement and still writes the tables of the rows so far.

Presets (``--preset NAME``, explicit options still win) are the cases of a GPU run
(``benchmarks/gpu_run.sh``); ``benchmarks.precompile`` reads the same presets to compile their
kernels ahead. ``dry-*`` presets are the same plumbing on tiny shapes for the CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from . import dora_providers, providers
from .common import ALPHA, Rotating, environment, fmt_bytes, median_ms
from . import qlora_providers as qprov

# Named shapes (K in, N out) of real models' projections.
SHAPES = {
    "7b-attn": (4096, 4096),        # Llama-2-7B q/k/v/o
    "7b-mlp-up": (4096, 11008),     # Llama-2-7B gate/up
    "7b-mlp-down": (11008, 4096),   # Llama-2-7B down
    "8b-mlp-up": (4096, 14336),     # Llama-3-8B gate/up
}
# CPU defaults: the 7B attention projection scaled down 4x, so the sweep takes minutes on 2 cores.
CPU_SHAPES = {"7b-attn/4": (1024, 1024)}
DEFAULT_RANKS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CPU_RANKS = (4, 16, 64, 256, 1024)
MODES = ("fwd", "bwd", "fwd+bwd")

# The cases of a GPU run, most valuable first (gpu_run.sh steps b and g), as command-line options.
_FUSED_AND_EAGER = ["--providers", "triton", "composite", "eager"]
_WIDE_PROVIDERS = ["--providers", "triton", "composite", "eager", "eager_fp32", "peft"]
PRESETS = {
    "headline": ["--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "64", "256", "2048", "--dropout", "0.1",
                 "--modes", "fwd+bwd", "--dtype", "bf16", *_FUSED_AND_EAGER],
    # the headline in GPU time (CUDA-graph replays), p = 0.1 and 0, with the real PEFT layer
    "wide-graph": ["--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "64", "256", "2048", "--dropout", "0.1", "0.0",
                   "--modes", "fwd+bwd", "--dtype", "bf16", "--timing", "graph",
                   "--providers", "triton", "composite", "eager", "peft"],
    "wide-shapes": ["--shapes", "7b-mlp-up", "7b-mlp-down", "8b-mlp-up", "--m", "8192", "--ranks", "16", "256",
                    "--dropout", "0.1", "--modes", "fwd+bwd", "--dtype", "bf16", *_WIDE_PROVIDERS],
    "wide-ranks": ["--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "64", "256", "1024", "2048", "4", "32", "512",
                   "--dropout", "0.0", "--modes", "fwd+bwd", "--dtype", "bf16", *_WIDE_PROVIDERS],
    "wide-modes": ["--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "256", "2048", "--dropout", "0.1",
                   "--modes", "fwd", "bwd", "--dtype", "bf16", *_FUSED_AND_EAGER],
    "wide-compiled": ["--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "256", "--dropout", "0.1",
                      "--modes", "fwd+bwd", "--dtype", "bf16", "--providers", "eager", "compiled"],
    "wide-dora": ["--dora", "--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "256", "--dropout", "0.0", "0.1",
                  "--modes", "fwd+bwd", "--dtype", "bf16", "--timing", "graph",
                  "--providers", "triton", "composite", "peft-dora"],
    "wide-qlora": ["--quant", "nf4", "--shapes", "7b-attn", "--m", "8192", "--ranks", "16", "256", "--dropout", "0.1",
                   "--modes", "fwd+bwd", "--dtype", "bf16", "--providers", "eager"],  # + peft-qlora and ours (bitsandbytes)
    # the same plumbing on the CPU: tiny ragged shapes, Triton through the interpreter
    "dry-headline": ["--device", "cpu", "--shapes", "72x40", "--m", "33", "--ranks", "3", "--dropout", "0.1",
                     "--modes", "fwd+bwd", "--dtype", "fp32", "--force-triton", *_FUSED_AND_EAGER,
                     "--min-time", "0.01", "--rounds", "1", "--rotate", "2", "--no-plots"],
    "dry-wide": ["--device", "cpu", "--shapes", "40x72", "--m", "17", "--ranks", "5", "--dropout", "0.0",
                 "--modes", "fwd+bwd", "--dtype", "fp32", "--providers", "composite", "eager",
                 "--min-time", "0.01", "--rounds", "1", "--rotate", "2", "--no-plots"],
}
WIDE_PRESETS = ("wide-graph", "wide-dora", "wide-shapes", "wide-ranks", "wide-modes", "wide-compiled", "wide-qlora")


class Stopped(BaseException):
    """Raised by the SIGTERM handler: the sweep stops and writes what it has (a BaseException, so
    that the per-measurement ``except Exception`` does not swallow it)."""


def _raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}")


# ----------------------------------------------------------------------------------------------
# FLOPs and timing
# ----------------------------------------------------------------------------------------------
def op_flops(M: int, K: int, N: int, r: int, mode: str) -> int:
    """FLOPs of the necessary matrix products (see the module docstring)."""
    fwd = 2 * M * N * K + 2 * M * r * (K + N)
    bwd = 2 * M * N * K + 4 * M * r * (K + N)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def dense_gemm_ms(M, K, N, dtype, device, min_time, rotate) -> float:
    """Median time of the base GEMM [M, K] x [K, N] (torch.mm: cuBLAS on a GPU)."""
    W = torch.randn(N, K, dtype=dtype, device=device)
    xs = Rotating(lambda: torch.randn(M, K, dtype=dtype, device=device), rotate)
    return median_ms(lambda: torch.mm(xs.next(), W.t()), device, min_time)


def _zero_grads(params, xs):
    for p in params:
        p.grad = None
    for x in xs:
        x.grad = None


def measure(layer: nn.Module, M: int, K: int, N: int, mode: str, dtype, device, min_time: float, rotate: int,
            with_memory: bool = True, graph: bool = False):
    """(ms, mem) of one provider layer in one mode; see the module docstring for ``mem``.
    ``graph`` (CUDA, modes fwd and fwd+bwd): time replays of the call captured in a CUDA graph
    (``benchmarks.timing.cuda_graph_ms``), i.e. the GPU's time without the host's."""
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = Rotating(lambda: torch.randn(M, K, dtype=dtype, device=device, requires_grad=True), rotate)
    dys = [torch.randn(M, N, dtype=dtype, device=device) for _ in range(rotate)]
    if graph:
        if device.type != "cuda" or mode == "bwd":
            raise ValueError("graph timing needs a CUDA device and mode fwd or fwd+bwd")
        from .timing import cuda_graph_ms
        x0, dy0 = xs.items[0], dys[0]
        step = (lambda: layer(x0)) if mode == "fwd" else (lambda: layer(x0).backward(dy0))
        return cuda_graph_ms(step, [*params, x0]), None
    if mode == "fwd":
        def fn():
            return layer(xs.next())
    elif mode == "fwd+bwd":
        def fn():
            i = (xs.i + 1) % rotate
            layer(xs.next()).backward(dys[i])
            _zero_grads(params, xs.items)
    else:  # bwd: forwards done once, outside the timed region; graphs retained for repeats
        ys = [layer(x) for x in xs.items]

        def fn():
            xs.next()
            ys[xs.i].backward(dys[xs.i], retain_graph=True)
            _zero_grads(params, xs.items)
    ms = median_ms(fn, device, min_time)
    if not with_memory:
        return ms, None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() - before
    else:
        x = xs.items[0]
        mem, _ = providers.saved_for_backward(lambda: layer(x), exclude=[x, *layer.parameters()])
    return ms, mem


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
class _NoBar:
    """Stand-in when tqdm is not installed (e.g. a bare GPU machine): prints nothing."""

    def __init__(self, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    @staticmethod
    def write(s, file=None):
        print(s, file=file)


def run_sweep(args, on_case=None) -> tuple:
    """(rows, notes, dense GEMM rates); ``on_case(rows)`` gets each case's rows as soon as it is measured."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = _NoBar

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    prov = dora_providers if args.dora else providers  # --dora: DoRA layers, speedups over peft-dora
    wanted = args.providers or prov.ALL_PROVIDERS
    unavailable = prov.available(device, dtype, (set(wanted) & set(prov.ALL_PROVIDERS)) | {prov.BASELINE})
    if args.force_triton:
        unavailable.pop("triton", None)
    for p in wanted:
        if p not in prov.ALL_PROVIDERS:
            unavailable[p] = "not a DoRA provider (--dora)" if args.dora else "a DoRA provider: add --dora"
    names = [p for p in wanted if p not in unavailable]
    notes = [f"skipped {p}: {unavailable[p]}" for p in wanted if p in unavailable]
    if prov.BASELINE not in names:
        names.insert(0, prov.BASELINE)  # speedups need the baseline
    if args.quant:  # QLoRA providers on the base quantized to args.quant (benchmarks/qlora_providers.py)
        q_unavailable = qprov.available(device)
        names += [n for n in qprov.PROVIDERS if n not in q_unavailable]
        notes += [f"4-bit providers: {args.quant}, nested absmax"] + [f"skipped {n}: {why}" for n, why in q_unavailable.items()]
    for n in notes:
        tqdm.write(f"note: {n}", file=sys.stderr)

    cases = [(s, M, p, r) for s in args.shapes for M in args.m for p in args.dropout for r in args.ranks]
    bar = tqdm(total=len(cases) * args.rounds * len(names) * len(args.modes), desc="sweep", file=sys.stderr)
    rows, dense = [], {}
    # from here on SIGTERM (timeout's signal) stops the sweep and keeps the rows measured so far
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        _measure_cases(args, prov, cases, names, device, dtype, bar, tqdm, notes, rows, dense, on_case)
    except Stopped as stop:
        notes.append(f"stopped by {stop} after {len({(x['shape'], x['M'], x['dropout'], x['r']) for x in rows})} "
                     f"of {len(cases)} cases")
        tqdm.write(f"note: {notes[-1]}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    dense_rates = {f"M={M} K={K} N={N}": round(2 * M * K * N / (statistics.median(t) * 1e-3) / 1e12, 3)
                   for (M, K, N), t in dense.items()}  # median over the cases
    return rows, notes, dense_rates


def _measure_cases(args, prov, cases, names, device, dtype, bar, tqdm, notes, rows, dense, on_case):
    started = time.perf_counter()
    for done, (shape, M, p, r) in enumerate(cases):
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            notes.append(f"stopped at the time budget ({args.time_budget:.0f} s): {done} of {len(cases)} cases measured")
            tqdm.write(f"note: {notes[-1]}", file=sys.stderr)
            break
        K, N = args.shape_table[shape]
        dense_ms = []
        torch.manual_seed(0)
        base = nn.Linear(K, N, bias=True, device=device, dtype=dtype).requires_grad_(False)
        layers, errors, times, mems = {}, {}, {}, {}
        for name in names:
            try:
                layers[name] = (qprov.make_layer(name, base, r, ALPHA, p, args.quant) if name in qprov.PROVIDERS
                                else prov.make_layer(name, base, r, ALPHA, p))
            except Exception as exc:  # shown in the table, never hidden
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        # providers take turns, round after round, so a change in machine load hits all alike
        for rnd in range(args.rounds):
            dense_ms.append(dense_gemm_ms(M, K, N, dtype, device, args.min_time / args.rounds, args.rotate))
            for name in names:
                for mode in args.modes:
                    bar.set_postfix_str(f"{shape} M={M} p={p} r={r} {name} {mode} round {rnd + 1}")
                    bar.update()
                    if name in errors or (name, mode) in errors:
                        continue
                    try:
                        ms, mem = measure(layers[name], M, K, N, mode, dtype, device, args.min_time / args.rounds,
                                          args.rotate, with_memory=rnd == args.rounds - 1,
                                          graph=args.timing == "graph")
                        times.setdefault((name, mode), []).append(ms)
                        mems[(name, mode)] = mem
                    except Exception as exc:
                        errors[(name, mode)] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                        tqdm.write(f"error: {shape} M={M} p={p} r={r} {name} {mode}: {errors[(name, mode)]}",
                                   file=sys.stderr)
        results = {(name, mode): ((statistics.median(times[(name, mode)]), mems.get((name, mode)), "")
                                  if (name, mode) in times and name not in errors and (name, mode) not in errors
                                  else (float("nan"), None, errors.get(name) or errors.get((name, mode), "not measured")))
                   for name in names for mode in args.modes}
        del layers
        dense.setdefault((M, K, N), []).append(statistics.median(dense_ms))
        first_row = len(rows)
        for mode in args.modes:
            flops = op_flops(M, K, N, r, mode)
            rate = 2 * M * K * N / (dense[(M, K, N)][-1] * 1e-3)  # this case's own measurement
            roof_ms = flops / rate * 1e3
            eager_ms = results[(prov.BASELINE, mode)][0]
            for name in names + ["roofline"]:
                if name == "roofline":
                    ms, mem, err = roof_ms, None, ""
                else:
                    ms, mem, err = results[(name, mode)]
                rows.append({
                    "shape": shape, "K": K, "N": N, "M": M, "r": r, "dropout": p, "mode": mode,
                    "timing": args.timing, "dtype": args.dtype, "provider": name, "ms": ms,
                    "tflops": flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
                    "roofline_pct": 100.0 * roof_ms / ms if ms == ms else float("nan"),
                    "speedup_vs_eager": eager_ms / ms if ms == ms else float("nan"),
                    ("peak_mem_bytes" if device.type == "cuda" else "saved_bytes"): mem,
                    "error": err,
                })
        if on_case is not None:
            on_case(rows[first_row:])


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def markdown_long(rows) -> str:
    mem_key = "peak_mem_bytes" if rows and "peak_mem_bytes" in rows[0] else "saved_bytes"
    mem_head = "peak mem" if mem_key == "peak_mem_bytes" else "saved for bwd"
    lines = [f"| shape | M | r | p | mode | provider | ms | TFLOP/s | roof % | speedup vs eager | {mem_head} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        ms = "error: " + x["error"] if x["error"] else f"{x['ms']:.3f}"
        lines.append(f"| {x['shape']} | {x['M']} | {x['r']} | {x['dropout']} | {x['mode']} | {x['provider']} | {ms} | "
                     f"{x['tflops']:.3f} | {x['roofline_pct']:.0f} | {x['speedup_vs_eager']:.2f}x | "
                     f"{fmt_bytes(x.get(mem_key))} |")
    return "\n".join(lines)


def markdown_pivot(rows, mode="fwd+bwd") -> str:
    """One compact table per (shape, M, p): ms per provider across ranks, speedup in brackets."""
    out = []
    groups = sorted({(x["shape"], x["M"], x["dropout"]) for x in rows if x["mode"] == mode},
                    key=lambda g: (g[0], g[1], g[2]))
    for shape, M, p in groups:
        sel = [x for x in rows if (x["shape"], x["M"], x["dropout"], x["mode"]) == (shape, M, p, mode)]
        names = list(dict.fromkeys(x["provider"] for x in sel))
        ranks = sorted({x["r"] for x in sel})
        out.append(f"\n{mode}, {shape} (K={sel[0]['K']}, N={sel[0]['N']}), M={M}, dropout={p}, {sel[0]['dtype']}: "
                   "median ms (speedup vs eager)\n")
        out.append("| r | " + " | ".join(names) + " |")
        out.append("|---" * (len(names) + 1) + "|")
        for r in ranks:
            cells = []
            for n in names:
                x = next(x for x in sel if x["r"] == r and x["provider"] == n)
                cells.append("error" if x["error"] else f"{x['ms']:.2f} ({x['speedup_vs_eager']:.2f}x)")
            out.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows, out: Path) -> list:
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed: no plots (pip install 'rslora-kernels[bench]')", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for shape, M, p, mode in sorted({(x["shape"], x["M"], x["dropout"], x["mode"]) for x in rows}):
        sel = [x for x in rows if (x["shape"], x["M"], x["dropout"], x["mode"]) == (shape, M, p, mode)]
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in dict.fromkeys(x["provider"] for x in sel):
            pts = sorted((x["r"], x["ms"], x["speedup_vs_eager"]) for x in sel if x["provider"] == name and not x["error"])
            if not pts:
                continue
            style = dict(linestyle="--", color="black") if name == "roofline" else dict(marker="o")
            ax_t.plot([a for a, _, _ in pts], [b for _, b, _ in pts], label=name, **style)
            ax_s.plot([a for a, _, _ in pts], [c for _, _, c in pts], label=name, **style)
        for ax in (ax_t, ax_s):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r")
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("median ms")
        ax_s.set_ylabel("speedup vs PEFT-style eager")
        ax_s.axhline(1.0, color="grey", linewidth=0.8)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{mode}, {shape} (K={sel[0]['K']}, N={sel[0]['N']}), M={M}, dropout={p}, {sel[0]['dtype']}")
        fig.tight_layout()
        path = out / f"sweep_{shape.replace('/', '_')}_M{M}_p{p}_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _expand_preset(argv):
    """Options of ``--preset NAME`` first, then the explicit ones (argparse keeps the last)."""
    argv = list(argv)
    if "--preset" in argv:
        i = argv.index("--preset")
        if i + 1 >= len(argv) or argv[i + 1] not in PRESETS:
            raise SystemExit(f"--preset needs one of: {', '.join(PRESETS)}")
        argv = PRESETS[argv[i + 1]] + argv[:i] + argv[i + 2:]
    return argv


def shape_sizes(shape: str) -> Tuple[int, int]:
    """(K, N) of a named shape (SHAPES, CPU_SHAPES) or of "KxN"; ValueError otherwise."""
    table = dict(SHAPES, **CPU_SHAPES)
    if shape in table:
        return table[shape]
    try:
        k, n = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown shape {shape!r}: use a name ({', '.join(table)}) or KxN") from None
    return k, n


def parse_args(argv=None):
    argv = _expand_preset(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the cases of a GPU run (see the module docstring)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", help=f"names ({', '.join(list(SHAPES) + list(CPU_SHAPES))}) or KxN")
    ap.add_argument("--m", type=int, nargs="+", help="token counts M (default: GPU 8192, CPU 512)")
    ap.add_argument("--ranks", type=int, nargs="+", help=f"default: GPU {' '.join(map(str, DEFAULT_RANKS))}; CPU {' '.join(map(str, CPU_RANKS))}")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--providers", nargs="+", choices=sorted(set(providers.ALL_PROVIDERS + dora_providers.ALL_PROVIDERS)),
                    help="default: all of the mode's (LoRA, or DoRA with --dora)")
    ap.add_argument("--dora", action="store_true", help="DoRA layers (benchmarks/dora_providers.py), baseline peft-dora")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="model dtype (default: GPU bf16, CPU fp32)")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--quant", choices=qprov.QUANT_TYPES,
                    help="also time the QLoRA providers (peft-qlora, qlora-triton, qlora-composite) on the base quantized to this 4-bit type")
    ap.add_argument("--out", default="out/sweep", help="output folder (CSV, JSON, Markdown, PNG)")
    ap.add_argument("--csv", help="append each case's rows to this CSV as soon as they are measured "
                                  "(default OUT/sweep.csv, started afresh)")
    ap.add_argument("--min-time", type=float, help="seconds of timed repeats per measurement, over all rounds (GPU 0.1, CPU 0.6)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per case, median taken (GPU 1, CPU 3)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--rotate", type=int, default=4, help="input buffers to rotate through")
    ap.add_argument("--timing", choices=("eager", "graph"), default="eager",
                    help="eager: each call issued from Python, host work included (what an eager training loop "
                         "sees); graph: replays of the call captured in a CUDA graph, the GPU's time alone")
    ap.add_argument("--time-budget", type=float, help="seconds; start no new case after this (results so far are kept)")
    ap.add_argument("--group", choices=("qkv", "gate-up"),
                    help="sibling projections: rk.lora_linear_group vs its members separately vs PEFT "
                         "(benchmarks/group_sweep.py; uses --m --ranks --dropout --dtype --rounds --min-time)")
    ap.add_argument("--group-k", type=int, help="--group: K (every N scaled with it; default GPU 4096, CPU 1024)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few ranks, one dropout, short timing")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (matplotlib takes seconds to load)")
    ap.add_argument("--force-triton", action="store_true",
                    help="time the triton backend on the CPU too (needs TRITON_INTERPRET=1; very slow)")
    args = ap.parse_args(argv)
    if args.dora and args.quant:
        ap.error("--dora and --quant do not combine: DoRA on a 4-bit base is not fused")
    args.argv = argv
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.shapes = args.shapes or (["7b-attn"] if gpu else list(CPU_SHAPES))
    try:
        args.shape_table = {s: shape_sizes(s) for s in args.shapes}
    except ValueError as e:
        ap.error(str(e))
    args.m = args.m or ([8192] if gpu else [512])
    args.ranks = args.ranks or list(DEFAULT_RANKS if gpu else CPU_RANKS)
    args.min_time = args.min_time or (0.1 if gpu else 0.6)
    args.rounds = args.rounds or (1 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.ranks = args.ranks[:: max(1, len(args.ranks) // 3)][:3]
        args.dropout = args.dropout[-1:]
        args.min_time = min(args.min_time, 0.05 if gpu else 0.3)
    return args


class CsvRows:
    """Appends rows to a CSV as they come, flushed each time (the header once, when the file is new)."""

    def __init__(self, path: Path, fields, fresh: bool):
        self.path, self.fields = path, list(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not path.exists() or path.stat().st_size == 0:
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        else:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.fields:
                raise SystemExit(f"{path} has the columns {header}, this sweep writes {self.fields}")

    def __call__(self, rows):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerows(rows)


def csv_fields(device: torch.device):
    mem = "peak_mem_bytes" if device.type == "cuda" else "saved_bytes"
    return ["shape", "K", "N", "M", "r", "dropout", "mode", "timing", "dtype", "provider", "ms", "tflops",
            "roofline_pct", "speedup_vs_eager", mem, "error"]


def main(argv=None):
    args = parse_args(argv)
    if args.group:
        from . import group_sweep

        return group_sweep.run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    env = environment(device)
    sink = CsvRows(Path(args.csv) if args.csv else out / "sweep.csv", csv_fields(device), fresh=not args.csv)
    rows, notes, dense_rates = run_sweep(args, on_case=sink)
    if not rows:
        print("no case measured:", *notes, sep="\n", file=sys.stderr)
        return 1
    where = env.get("gpu") or (f"CPU ({env['cores']} cores, {env['threads']} threads, "
                               f"load average at start {env['loadavg_at_start'][0]})")
    header = (f"rslora-kernels sweep -- {where}, {args.dtype}, torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']}, {env['date_utc']}"
              + (", timing: CUDA graph replay (GPU time, no host work)" if args.timing == "graph" else "") + "\n"
              f"dense GEMM rate (roofline basis, median over cases), TFLOP/s: {dense_rates}\n"
              f"command: python -m benchmarks.sweep {' '.join(sys.argv[1:] if argv is None else argv)}\n"
              + "".join(f"note: {n}\n" for n in notes))
    modes = [m for m in MODES if any(x["mode"] == m for x in rows)][::-1]  # fwd+bwd first
    text = header + "".join(markdown_pivot(rows, m) for m in modes) + "\n\nAll rows:\n\n" + markdown_long(rows) + "\n"
    print(text)
    (out / "sweep.md").write_text(text)
    with open(out / "sweep.json", "w") as f:
        json.dump({"environment": env, "dense_gemm_tflops": dense_rates, "notes": notes,
                   "args": {k: v for k, v in vars(args).items() if k != "shape_table"}, "rows": rows}, f, indent=1)
    files = [] if args.no_plots else plot(rows, out)
    print(f"wrote {sink.path} (rows as measured), {out}/sweep.json, sweep.md and {len(files)} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
