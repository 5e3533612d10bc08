"""Sibling projections: one ``rk.lora_linear_group`` vs its members run separately (ours) vs PEFT's layers.

    python -m benchmarks.sweep --group qkv --m 2048 --ranks 64 --dropout 0.1      # CPU: K scaled to 1024
    python -m benchmarks.sweep --group gate-up --device cuda --ranks 16 256

Members (Llama-3-8B, K = 4096): ``qkv`` q 4096, k 1024, v 1024 (grouped-query attention);
``gate-up`` gate 14336, up 14336. On the CPU K and every N are scaled by ``--k / 4096`` (default
K = 1024 there: q 1024, k/v 256; gate/up 3584), so a case takes seconds on 2 cores.

Providers, each fwd+bwd (x needs its grad, W frozen, adapters trained; every member's output
gets its own dy):

* ``group:<backend>`` -- ``rk.lora_linear_group`` (one op for all members);
* ``separate:<backend>`` -- ``rk.lora_linear`` per member (autograd adds the members' dx);
* ``peft`` -- PEFT's ``lora.Linear`` per member (the baseline: speedup = its time over the provider's).

Reported per provider: median ms (interleaved rounds, timing as ``benchmarks.sweep``), and the
bytes autograd saves for backward (distinct storages, parameters excluded, x counted once when
saved: the group saves x once, PEFT saves each member's dropped x and its mask). Written to
``group.md`` (the table printed) and ``group.json`` (rows and environment) under ``--out``.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import rslora_kernels as rk

from . import providers
from .common import ALPHA, Rotating, environment, fmt_bytes, median_ms

MEMBERS = {"qkv": (4096, (4096, 1024, 1024)), "gate-up": (4096, (14336, 14336))}  # Llama-3-8B: K, N per member


def member_sizes(group: str, k: int):
    """(K, [N_i]) of ``group`` with K scaled to ``k`` (every N by the same factor)."""
    K0, Ns = MEMBERS[group]
    return k, [N * k // K0 for N in Ns]


class _Group(nn.Module):
    """Members' base layers and adapters; ``forward(x)`` -> tuple of outputs, one per member."""

    def __init__(self, bases, r, p, backend, grouped):
        super().__init__()
        self.bases = nn.ModuleList(bases)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.randn(r, b.in_features, device=b.weight.device,
                                                                 dtype=b.weight.dtype) * b.in_features ** -0.5)
                                        for b in bases])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.randn(b.out_features, r, device=b.weight.device,
                                                                 dtype=b.weight.dtype) * 0.01) for b in bases])
        self.scaling, self.p, self.backend, self.grouped = rk.rslora_scaling(ALPHA, r), p, backend, grouped

    def forward(self, x):
        n = len(self.bases)
        if self.grouped:
            return rk.lora_linear_group(x, [b.weight for b in self.bases], list(self.lora_A), list(self.lora_B),
                                        [self.scaling] * n, [b.bias for b in self.bases], self.p, backend=self.backend)
        return tuple(rk.lora_linear(x, b.weight, A, B, self.scaling, b.bias, self.p, backend=self.backend)
                     for b, A, B in zip(self.bases, self.lora_A, self.lora_B))


class _PeftGroup(nn.Module):
    def __init__(self, bases, r, p):
        super().__init__()
        self.members = nn.ModuleList([providers.make_layer("peft", b, r, ALPHA, p) for b in bases])

    def forward(self, x):
        return tuple(m(x) for m in self.members)


def make_provider(name: str, bases, r: int, p: float) -> nn.Module:
    if name == "peft":
        return _PeftGroup(bases, r, p)
    kind, backend = name.split(":")
    layer = _Group(bases, r, p, backend, grouped=kind == "group")
    for prm in layer.bases.parameters():
        prm.requires_grad_(False)
    return layer.train()


def measure(layer, M, K, Ns, dtype, device, min_time, rotate):
    """(median ms of fwd+bwd, bytes saved for backward)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = Rotating(lambda: torch.randn(M, K, dtype=dtype, device=device, requires_grad=True), rotate)
    dys = [[torch.randn(M, N, dtype=dtype, device=device) for N in Ns] for _ in range(rotate)]

    def fn():
        i = (xs.i + 1) % rotate
        torch.autograd.backward(layer(xs.next()), dys[i])
        for t in [*params, *xs.items]:
            t.grad = None

    ms = median_ms(fn, device, min_time)
    x = xs.items[0]
    saved, _ = providers.saved_for_backward(lambda: layer(x), exclude=list(layer.parameters()))
    return ms, saved


def run(args) -> int:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    k = args.group_k or (4096 if device.type == "cuda" else 1024)
    K, Ns = member_sizes(args.group, k)
    backends = ["composite"] + (["triton"] if device.type == "cuda" or args.force_triton else [])
    names = ["peft"] + [f"{kind}:{b}" for b in backends for kind in ("separate", "group")]
    env = environment(device)
    rows = []
    for M in args.m:
        for p in args.dropout:
            for r in args.ranks:
                torch.manual_seed(0)
                bases = [nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False) for N in Ns]
                layers = {n: make_provider(n, bases, r, p) for n in names}
                times = {n: [] for n in names}
                saved = {}
                for rnd in range(args.rounds):  # providers take turns, so load changes hit all alike
                    for n in names:
                        ms, saved[n] = measure(layers[n], M, K, Ns, dtype, device, args.min_time / args.rounds,
                                               args.rotate)
                        times[n].append(ms)
                base_ms = statistics.median(times["peft"])
                for n in names:
                    ms = statistics.median(times[n])
                    rows.append(dict(group=args.group, K=K, Ns=Ns, M=M, r=r, dropout=p, provider=n, ms=ms,
                                     speedup_vs_peft=base_ms / ms, saved_bytes=saved[n],
                                     saved_vs_peft=saved[n] / saved["peft"]))
    where = env.get("gpu") or f"CPU ({env['cores']} cores, {env['threads']} threads, load {env['loadavg_at_start'][0]})"
    lines = [f"rslora-kernels group sweep -- {where}, {args.dtype}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']}, {env['date_utc']}",
             f"command: python -m benchmarks.sweep {' '.join(args.argv if args.argv is not None else sys.argv[1:])}",
             f"members ({args.group}): K = {K}, N = {Ns}; fwd+bwd, median of {args.rounds} interleaved rounds", "",
             "| M | r | p | provider | ms | speedup vs peft | saved for bwd | saved / peft's |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['M']} | {x['r']} | {x['dropout']} | {x['provider']} | {x['ms']:.2f} | "
                     f"{x['speedup_vs_peft']:.2f}x | {fmt_bytes(x['saved_bytes'])} | {x['saved_vs_peft']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "group.md").write_text(text)
    with open(out / "group.json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0
