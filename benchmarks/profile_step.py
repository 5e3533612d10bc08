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
* ``kernels``: per-step GPU time of each kernel from ``torch.profiler`` (5 steps), the largest first.

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

__all__ = ["host_us_per_step", "kernel_table", "main"]


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


def kernel_table(step, device: torch.device, steps: int = 5, top: int = 14, trace: Path = None):
    """(per-step device ms of all kernels, markdown table of the ``top`` kernels by per-step time)."""
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
    lines = ["| ms / step | calls / step | kernel |", "|---|---|---|"]
    lines += [f"| {ms:.4f} | {n} | `{name[:90]}` |" for ms, n, name in rows[:top]]
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
            total, table = kernel_table(step, device, trace=trace)
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
