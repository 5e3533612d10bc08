"""Where one training step's time goes: GPU work, host (Python + launch) work, and the kernels.

    python -m benchmarks.profile_step --out DIR                     # headline case, every provider
    python -m benchmarks.profile_step --ranks 16 256 --dropout 0 0.1 --providers triton composite eager
    python -m benchmarks.profile_step --dora-providers triton composite peft-dora   # DoRA rows too

For each (rank, dropout p, provider) at one shape, fwd+bwd (W frozen, x needing its grad):

* ``step ms``: the sweep's measurement (``benchmarks.sweep.measure``: do_bench, L2 flushed).
* ``host us``: host time to issue one step, with the GPU never waited on (steps issued back to
  back after a sync, total host time over the count). When it exceeds the GPU's time for a step,
  the step is host-bound and ``step ms`` measures Python and launch overhead, not kernels.
* ``graph ms``: the same step captured once in a CUDA graph and replayed
  (``benchmarks.timing.cuda_graph_ms``: no host work at all): the GPU's time for the step.
  ``step ms - graph ms`` is what host overhead costs.
* ``kernels``: per-step GPU time of each kernel from ``torch.profiler`` (5 steps), the largest first,
  and for the Triton backend's kernels what that time achieved: ``GB/s``, the bytes the kernel's
  launches of one step must move (every operand read once, every result written once; no split
  partials, no re-reads from L2) over their time, and ``TFLOP/s``, the products' 2 m n k over it
  (:func:`kernel_work`). A streaming pass far below the memory's bandwidth, or a GEMM far below the
  tensor cores' rate, is the one still slow.

``--dora-providers`` adds DoRA layers (``benchmarks/dora_providers.py``; rows ``dora:<provider>``)
at the first of ``--ranks``, for each dropout p.

Writes ``profile.md`` (and prints it) and, with ``--trace`` on a GPU, a gzipped Chrome trace of one
case per provider.
CPU runs exercise the plumbing (no graphs; the "GPU" columns are then CPU times).
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from . import dora_providers, providers
from .sweep import SHAPES, environment, measure, shape_sizes
from .timing import cuda_graph_ms

__all__ = ["host_us_per_step", "kernel_work", "kernel_table", "main"]


def _step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).backward(dy)
        for p in params:
            p.grad = None
        x.grad = None
    return step


def host_us_per_step(step, device: torch.device, count: int = 30) -> float:
    """Host microseconds to issue one step, never waiting on the GPU (see the module docstring)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(count):
        step()
    host = (time.perf_counter() - t0) / count * 1e6
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host


def kernel_work(name: str, M: int, K: int, N: int, r: int, p: float, elem: int, dora: bool = False):
    """(bytes, FLOPs) one fwd+bwd step's launches of the Triton kernel called ``name`` must do, for
    x [M, K], W [N, K], rank r, dropout p, ``elem`` bytes an element of x, W and the adapters (keep-bits:
    M K / 8 bytes); None for a kernel this does not know (cuBLAS, torch ops, B3's sum of partials,
    whose bytes depend on the split). Launches that share a kernel add up: ``_shrink_kernel`` is F1
    (x A^T) and B1 (dy B), ``_dual_gemm_kernel`` F2 and B2, ``_m_reduce_kernel`` dA and dB (and db).
    With ``dora`` the dual GEMMs are DoRA's DF2 and DB2 (two products a tile)."""
    bits = M * K // 8 if p > 0 else 0
    x, w, dy, t = M * K * elem, N * K * elem, M * N * elem, M * r * elem
    a, b = r * K * elem, N * r * elem
    work = {
        # F1: x, A -> T (and the keep-bits, drawn or read); B1: dy, B -> U
        "_shrink_kernel": (x + a + t + bits + dy + b + t, 2 * M * r * (K + N)),
        # F2: x, W, T, B, bias -> y; B2: dy, W, U, A, bits -> dx
        "_dual_gemm_kernel": (x + w + t + b + N * elem + M * N * elem + dy + w + t + a + bits + M * K * elem,
                              2 * M * N * K * 2 + 2 * M * r * (N + K)),
        # DF2: x, W, T, B, g, bits -> y, z; DB2: dy, W, U, A, g - 1, bits -> dx
        "_dora_fwd_kernel": (x + w + t + b + 4 * N + bits + 2 * M * N * elem, 2 * 2 * M * N * K + 2 * M * N * r),
        "_dora_dx_kernel": (dy + w + t + a + 4 * N + bits + M * K * elem, 2 * 2 * M * K * N + 2 * M * K * r),
        # dA: U, x, bits -> dA; dB: dy, T -> dB, db (fp32)
        "_m_reduce_kernel": (t + x + bits + a + dy + t + b + 4 * N, 2 * M * r * (K + N)),
        "_keep_bits_kernel": (bits, 0),
        # plan rank_mm: drop(x) from x and the bits, once a direction
        "_drop_by_bits_kernel": (2 * (2 * x + bits), 0),
    }
    for kernel, (nbytes, flops) in work.items():
        if kernel in name and not (dora and kernel == "_dual_gemm_kernel"):
            return nbytes, flops
    return None


def kernel_table(step, device: torch.device, steps: int = 5, top: int = 14, trace: Path = None, work=None):
    """(per-step device ms of all kernels, markdown table of the ``top`` kernels by per-step time).
    ``work(name) -> (bytes, FLOPs) | None`` (:func:`kernel_work`) adds the achieved GB/s and TFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    rows = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        if device.type == "cuda" and (t <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        if device.type != "cuda" and not ev.key.startswith(("aten::", "rslora")):
            continue
        rows.append((t / steps / 1e3, ev.count // steps, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = ["| ms / step | calls / step | GB/s | TFLOP/s | kernel |", "|---|---|---|---|---|"]
    for ms, n, name in rows[:top]:
        done = work(name) if work is not None and ms > 0 else None
        rate = (f"{done[0] / ms / 1e6:.0f} | " + (f"{done[1] / ms / 1e9:.1f}" if done[1] else "-")) if done else "- | -"
        lines.append(f"| {ms:.4f} | {n} | {rate} | `{name[:90]}` |")
    return total, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/profile"), help="folder for profile.md (and traces)")
    ap.add_argument("--shape", default="7b-attn", help=f"a name ({', '.join(SHAPES)}) or KxN")
    ap.add_argument("--m", type=int, default=None, help="tokens (default 8192 on a GPU, 256 on the CPU)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--providers", nargs="+", default=["eager", "composite", "triton"])
    ap.add_argument("--dora-providers", nargs="+", default=[], choices=dora_providers.ALL_PROVIDERS,
                    help="also these DoRA layers, at the first rank")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--trace", action="store_true", help="also write a Chrome trace per provider (GPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        K, N = shape_sizes(args.shape)
    except ValueError as e:
        ap.error(str(e))
    M = args.m or (8192 if device.type == "cuda" else 256)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = providers.available(device, dtype, args.providers)
    skip.update({f"dora:{n}": why for n, why in dora_providers.available(device, dtype, args.dora_providers).items()})
    env = environment(device)
    report = [f"# Step profile: {env.get('gpu', device.type)}, {args.shape} (K={K}, N={N}), M={M}, {args.dtype}",
              "", f"torch {env['torch']}, triton {env['triton']}, commit {env.get('commit')}, {env['date_utc']}", "",
              "| r | p | provider | step ms | graph ms | host us | kernels ms | launches |", "|---|---|---|---|---|---|---|---|"]
    details, traced = [], set()
    cases = [(r, p, name, providers) for r in args.ranks for p in args.dropout for name in args.providers]
    cases += [(args.ranks[0], p, f"dora:{name}", dora_providers) for p in args.dropout for name in args.dora_providers]
    for r, p, label, prov in cases:
        if label in skip:
            continue
        torch.manual_seed(0)
        base = nn.Linear(K, N, bias=True).to(device=device, dtype=dtype)
        layer = prov.make_layer(label.removeprefix("dora:"), base, r, 2 * r, p)
        x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
        dy = torch.randn(M, N, dtype=dtype, device=device)
        step = _step_fn(layer, x, dy)
        cells = {}
        try:
            cells["step"] = f"{measure(layer, M, K, N, 'fwd+bwd', dtype, device, 0.3, 2, with_memory=False)[0]:.3f}"
            cells["host"] = f"{host_us_per_step(step, device):.0f}"
            trace = None
            if args.trace and device.type == "cuda" and label not in traced:
                trace, _ = args.out / f"trace_{label.replace(':', '_')}.json", traced.add(label)
            work = lambda name, r=r, p=p, label=label: kernel_work(  # noqa: E731
                name, M, K, N, r, p, torch.finfo(dtype).bits // 8, dora=label.startswith("dora:"))
            total, table = kernel_table(step, device, trace=trace, work=work)
            cells["kernels"] = f"{total:.3f}"
            cells["launches"] = str(sum(int(line.split("|")[2]) for line in table.splitlines()[2:]))
            details.append(f"## r={r} p={p} {label}\n\n{table}\n")
            if trace is not None:  # gzip: traces are large
                with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
                    shutil.copyfileobj(f, g)
                trace.unlink()
            if device.type == "cuda":
                params = [q for q in layer.parameters() if q.requires_grad]
                cells["graph"] = f"{cuda_graph_ms(lambda: layer(x).backward(dy), [*params, x]):.3f}"
        except Exception as e:  # noqa: BLE001 -- one failing measurement must not lose the rest
            details.append(f"## r={r} p={p} {label}: FAILED\n\n```\n{traceback.format_exc()[-1500:]}\n```\n")
            cells.setdefault("err", type(e).__name__)
        report.append(f"| {r} | {p} | {label} | {cells.get('step', '-')} | {cells.get('graph', cells.get('err', '-'))} "
                      f"| {cells.get('host', '-')} | {cells.get('kernels', '-')} | {cells.get('launches', '-')} |")
        print(report[-1], flush=True)
        del layer, base, x, dy, step
    text = "\n".join(report + ["", "launches: kernels in the table (top 14) per step", ""] + details)
    (args.out / "profile.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
