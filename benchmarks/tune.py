"""Measure, on this GPU, the fastest tile config of each kernel family and the faster backend per shape.

    python -m benchmarks.tune --out tuned.json                        # the sweep's headline shapes
    python -m benchmarks.tune --out tuned.json --shapes 7b-attn --ranks 16 256 --dtype bf16 fp16
    python -m benchmarks.tune --out tuned.json --quick                # 7b-attn at r = 16, 256
    python -m benchmarks.tune --out tuned.json --resume               # continue it in the next GPU window
    python -m benchmarks.tune --out dry.json --dry-run                # CPU interpreter, tiny shapes, seconds

For every case (dtype, shape (K, N), M, rank r), with dropout p = 0.1 and bf16/fp16 adapters:

1. One fwd+bwd of the Triton backend, recording every config request the launches make
   (:class:`rslora_kernels.ops.tuning.ConfigRequest`: family, dtype, sizes).
2. Coordinate descent (one pass) over those requests, biggest family first (dual_gemm, grads,
   shrink_masked, shrink; a family unknown here comes last): each
   candidate config of the request's family (``configs.candidate_configs(dtype, arch)``) is forced
   on that request (:func:`~rslora_kernels.ops.tuning.forced_configs`), the others keeping the best
   found so far (the rules before that), and the whole fwd+bwd is timed; the fastest stays. The
   objective is the op's time, not one kernel's, so a config that speeds one launch up by slowing
   the next one down is not picked. A candidate that fails (e.g. out of shared memory on this
   GPU) is recorded with its error and skipped.
3. The whole fwd+bwd with the chosen configs: the Triton backend under each plan
   (``tuning.PLANS``: "fused", its own rank kernels; "rank_mm", T, U, dA, dB by cuBLAS), and the
   composite backend. The faster plan and the faster backend are recorded.

Timing: the fwd+bwd captured in a CUDA graph and replayed under ``triton.testing.do_bench`` (median,
L2 flushed between replays): the GPU's time, without the host work that can dominate an eager step
(``benchmarks.profile_step``); ``--dry-run`` runs
the same code on Triton's CPU interpreter at tiny sizes, one call per measurement, and marks the
table ``"dry_run": true`` (the loader ignores such tables; they only prove the tuner runs).

The table (written after every case, so a run cut short leaves a valid partial table) holds the
GPU name, arch, torch/triton versions, date, commit, the kernel-source hash
(``tuning.kernel_hash``; every entry records it too, and only entries of the running sources are
used), and three lists: ``configs`` (family, dtype, M bucket, N, K, rank bucket -> config, with
every candidate's time), ``plans`` (dtype, M bucket, N, K, rank bucket -> faster plan, both
times) and ``backends`` (the same keys -> faster backend, both times). Where two cases ask the
same config key (F1 of two shapes with the same K), the first case's choice is kept. ``--resume``
continues a table across GPU windows: the cases it already holds for the running kernel sources
are skipped (its entries of other sources are dropped). To ship a table, copy it to
``rslora_kernels/ops/tuned/<normalized GPU name>.json`` (the name is printed) and commit it; see
docs/tuning.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

FAMILY_ORDER = ("dual_gemm", "grads", "shrink_masked", "shrink")  # biggest share of the op's time first
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_RANKS = (16, 64, 256, 1024, 2048)
DEFAULT_M = (2048, 8192)
DEFAULT_SHAPES = ("7b-attn", "7b-mlp-up", "7b-mlp-down", "8b-mlp-up")  # the sweep's named shapes
QUICK = dict(shapes=("7b-attn",), ranks=(16, 256))
DRY_RUN = dict(M=37, shapes={"dry": (40, 24)}, ranks=(5,))  # odd sizes, a few interpreter launches
DROPOUT_P = 0.1
SEED = 1234
ALPHA = 16.0


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def make_timer(device: torch.device, quick: bool) -> Callable:
    """timer(fn, grads) -> milliseconds of one fn() on the GPU, host work excluded: fn is captured
    in a CUDA graph and the replays are timed (``benchmarks.timing.cuda_graph_ms``), so that a
    config is judged by its kernels even where the step is host-bound. Grads are reset to None
    before the capture."""
    if device.type == "cuda":
        from .timing import cuda_graph_ms
        rep = 40 if quick else 100
        return lambda fn, grads: cuda_graph_ms(fn, grads, rep=rep)

    def once(fn, grads):  # the interpreter: one call proves the path, its time means nothing
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------
def make_case(device, dtype, M: int, K: int, N: int, r: int):
    """Inputs of one fwd+bwd: x [M, K] and adapters trainable, W [N, K] frozen, no bias (Llama)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device, dtype)  # noqa: E731
    x = rand(M, K).requires_grad_()
    W = rand(N, K, std=K ** -0.5)
    A = rand(r, K, std=K ** -0.5).requires_grad_()
    B = rand(N, r, std=0.02).requires_grad_()
    dy = rand(M, N)
    return x, W, A, B, dy


def op_runner(inputs, r: int) -> Callable[[str], Callable[[], None]]:
    """run(backend) -> a function doing one fwd+bwd of the op on ``inputs``."""
    import rslora_kernels as rk
    x, W, A, B, dy = inputs
    s = rk.rslora_scaling(ALPHA, r)
    seed = torch.tensor(SEED, dtype=torch.int64, device=x.device)

    def run(backend):
        return lambda: rk.lora_linear(x, W, A, B, s, dropout_p=DROPOUT_P, seed=seed, backend=backend).backward(dy)
    return run


def tune_case(run, grads, timer, candidates: Dict[str, list], log=print):
    """Coordinate descent over the config requests of one fwd+bwd (module docstring, steps 1-3).
    Returns ({request: (best config, [trial, ...])}, {backend: ms}, {plan: ms}); the Triton
    backend's time is its faster plan's."""
    from rslora_kernels.ops.tuning import PLANS, forced_configs, forced_plan

    requests: Dict = {}
    with forced_configs(lambda req: requests.setdefault(req, None)):  # record; the rules decide
        run("triton")()
    if not requests:
        raise RuntimeError("no config request reached rslora_kernels.ops.tuning.tuned_config: "
                           "the config functions in rslora_kernels/ops/configs.py lack their tuning hook")
    unknown = sorted({req.family for req in requests} - set(candidates))
    if unknown:
        raise RuntimeError(f"config families {unknown} have no candidates in configs.candidate_configs")

    chosen: Dict = {}
    results = {}
    order = lambda req: (FAMILY_ORDER.index(req.family) if req.family in FAMILY_ORDER else len(FAMILY_ORDER), req)  # noqa: E731
    for req in sorted(requests, key=order):
        trials = []
        for cfg in candidates[req.family]:
            trial = {"config": dataclasses.asdict(cfg)}
            with forced_configs(lambda q: trial["config"] if q == req else chosen.get(q)):
                try:
                    trial["ms"] = round(timer(run("triton"), grads), 5)
                except Exception as e:  # noqa: BLE001 -- recorded in the table and printed, never hidden
                    trial["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    log(f"    {req.family} {cfg}: FAILED ({trial['error']})")
            trials.append(trial)
        timed = [t for t in trials if "ms" in t]
        if timed:
            best = min(timed, key=lambda t: t["ms"])
            chosen[req] = best["config"]
            results[req] = (best["config"], trials)
            log(f"    {req.family:9s} M={req.M} N={req.N} K={req.K} r={req.r}: best {best['ms']:.4f} ms of "
                f"{len(timed)} candidates ({min(t['ms'] for t in timed):.4f}-{max(t['ms'] for t in timed):.4f} ms)")
        else:
            log(f"    {req.family} M={req.M} N={req.N} K={req.K} r={req.r}: every candidate failed; the rules stay")

    plan_ms = {}
    for plan in PLANS:
        with forced_configs(lambda q: chosen.get(q)), forced_plan(plan):
            plan_ms[plan] = round(timer(run("triton"), grads), 5)
    with forced_configs(lambda q: chosen.get(q)):
        backend_ms = {"triton": min(plan_ms.values()), "composite": round(timer(run("composite"), grads), 5)}
    return results, backend_ms, plan_ms


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def new_table(device: torch.device, dry_run: bool, settings: dict) -> dict:
    from rslora_kernels._runtime import cuda_arch, gpu_name
    from rslora_kernels.ops.tuning import FORMAT_VERSION, kernel_hash

    from .sweep import environment
    env = environment(device)
    return {"format": FORMAT_VERSION, "dry_run": dry_run,
            "gpu": gpu_name(device) or "cpu-interpreter", "arch": cuda_arch(device),
            "torch": env["torch"], "triton": env["triton"], "date_utc": env["date_utc"], "commit": env["commit"],
            "kernels": kernel_hash(), "settings": settings, "complete": False, "skipped": [],
            "configs": [], "plans": [], "backends": []}


def case_key(dtype, M: int, N: int, K: int, r: int) -> tuple:
    """(dtype name, M bucket, N, K, rank bucket): the key of a case's plan and backend entries."""
    from rslora_kernels.ops.tuning import bucket, dtype_name
    return dtype_name(dtype), bucket(M), N, K, bucket(r)


def add_case(table: dict, results, backend_ms: dict, plan_ms: dict, dtype, M: int, N: int, K: int, r: int) -> None:
    """Add one case's choices under bucketed keys (a key already present keeps its first choice),
    each entry marked with the running kernel sources' hash."""
    from rslora_kernels.ops.tuning import bucket, kernel_hash

    h = kernel_hash()
    keys = {tuple(e[k] for k in ("family", "dtype", "M", "N", "K", "r")) for e in table["configs"]}
    for req, (config, trials) in results.items():
        key = (req.family, req.dtype, bucket(req.M), req.N, req.K, bucket(req.r))
        if key in keys:
            continue
        keys.add(key)
        table["configs"].append(dict(zip(("family", "dtype", "M", "N", "K", "r"), key), config=config,
                                     op_ms=min(t["ms"] for t in trials if "ms" in t), candidates=trials, kernels=h))
    at = dict(zip(("dtype", "M", "N", "K", "r"), case_key(dtype, M, N, K, r)))
    table["plans"].append(dict(at, plan=min(plan_ms, key=plan_ms.get), ms=plan_ms, kernels=h))
    table["backends"].append(dict(at, backend=min(backend_ms, key=backend_ms.get), ms=backend_ms, kernels=h))


def resumed_table(path: Path, table: dict, log=print) -> dict:
    """``table`` (a new one) carrying over what the table at ``path`` measured on this GPU with the
    running kernel sources; its entries of other sources are dropped (they are never used). A
    missing file gives ``table`` as it is; a table of another GPU or arch, or a dry run mixed with
    a real one, is an error."""
    from rslora_kernels.ops.tuning import current_entries
    if not path.exists():
        return table
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {path} cannot be read as a table ({e})") from e
    for key in ("gpu", "arch", "dry_run"):
        if old.get(key) != table[key]:
            raise ValueError(f"--resume: {path} has {key} = {old.get(key)!r}, this run {table[key]!r}")
    kept = {name: current_entries(old.get(name, [])) for name in ("configs", "plans", "backends")}
    dropped = sum(len(old.get(name, [])) - len(v) for name, v in kept.items())
    log(f"--resume: {len(kept['backends'])} cases of {path} measured on these kernel sources are kept"
        + (f"; {dropped} entries of other sources dropped" if dropped else ""))
    return dict(table, **kept)


def done_cases(table: dict) -> set:
    """Keys (:func:`case_key`) of the cases the table holds for the running kernel sources."""
    from rslora_kernels.ops.tuning import current_entries
    return {tuple(e[k] for k in ("dtype", "M", "N", "K", "r")) for e in current_entries(table["backends"])}


def table_json(table: dict) -> str:
    """JSON with one line per entry: committed tables diff entry by entry."""
    def field(key, value):
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return f" {json.dumps(key)}: [\n" + ",\n".join(f"  {json.dumps(e)}" for e in value) + "\n ]"
        return f" {json.dumps(key)}: {json.dumps(value)}"
    return "{\n" + ",\n".join(field(k, v) for k, v in table.items()) + "\n}\n"


def write_table(path: Path, table: dict) -> None:
    """Atomically: a reader (or a run killed mid-write) never sees half a table."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(table_json(table))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv):
    from .sweep import SHAPES
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="where to write the JSON table")
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                    help=f"named (K, N) shapes (default: {' '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--m", nargs="+", type=int, default=None,
                    help=f"rows of x (default: {' '.join(map(str, DEFAULT_M))}; 8192 with --quick)")
    ap.add_argument("--ranks", nargs="+", type=int, default=None, help=f"default: {' '.join(map(str, DEFAULT_RANKS))}")
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    ap.add_argument("--quick", action="store_true", help="7b-attn at r = 16, 256, shorter timing")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU interpreter, tiny shapes, one call per timing; the table is marked dry_run")
    ap.add_argument("--resume", action="store_true",
                    help="continue the table at --out: skip the cases it holds for the running kernel sources")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds; no new case starts after this (the table says which were skipped)")
    args = ap.parse_args(argv)
    if args.ranks is not None and min(args.ranks) < 1:
        ap.error("--ranks must be >= 1")
    if args.m is not None and min(args.m) < 1:
        ap.error("--m must be >= 1")
    return args


def cases(args):
    """(dtype, M, shape name, K, N, r) in run order: the first M and shape's ranks first."""
    from .sweep import SHAPES
    if args.dry_run:
        ms, shapes, ranks = (DRY_RUN["M"],), DRY_RUN["shapes"], args.ranks or DRY_RUN["ranks"]
    else:
        names = args.shapes or (QUICK["shapes"] if args.quick else DEFAULT_SHAPES)
        ms = args.m or ((8192,) if args.quick else DEFAULT_M)
        shapes, ranks = {n: SHAPES[n] for n in names}, args.ranks or (QUICK["ranks"] if args.quick else DEFAULT_RANKS)
    return [(DTYPES[d], M, name, K, N, r)
            for d in args.dtype for M in ms for name, (K, N) in shapes.items() for r in ranks]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is first imported
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("benchmarks.tune: no CUDA device; tables are measured on a GPU (use --dry-run to check the tuner "
              "on the CPU interpreter)", file=sys.stderr)
        return 2
    from rslora_kernels.ops import configs
    from rslora_kernels.ops.tuning import normalized_gpu_name, rules_only
    from rslora_kernels._runtime import cuda_arch

    arch = cuda_arch(device)
    candidates: Dict[str, list] = {}
    for dtype in {DTYPES[d] for d in args.dtype}:
        with rules_only():  # the candidate set, whatever an existing table says
            for family, cfg in configs.candidate_configs(dtype, arch):
                candidates.setdefault((dtype, family), []).append(cfg)
    todo = cases(args)
    settings = {"dropout_p": DROPOUT_P, "alpha": ALPHA, "bias": False, "adapters": "x dtype",
                "timer": "once (interpreter)" if device.type == "cpu" else "CUDA graph replay, triton.testing.do_bench median",
                "quick": args.quick, "cases": [[str(d).replace("torch.", ""), M, name, K, N, r] for d, M, name, K, N, r in todo]}
    table = new_table(device, args.dry_run, settings)
    if args.resume:
        table = resumed_table(args.out, table)
    done = done_cases(table)
    timer = make_timer(device, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"tuning on {table['gpu']} (sm_{arch}), torch {table['torch']}, triton {table['triton']}, "
          f"commit {table['commit']}, kernels {table['kernels']}: {len(todo)} cases -> {args.out}")
    t_start = time.monotonic()
    for i, (dtype, M, name, K, N, r) in enumerate(todo):
        if case_key(dtype, M, N, K, r) in done:
            print(f"[{i + 1}/{len(todo)}] {str(dtype).replace('torch.', '')} {name} M={M} r={r}: in the table (--resume)")
            continue
        if time.monotonic() - t_start > args.time_budget:
            table["skipped"] = [list(c) for c, (d, m, _, k, n, rr) in zip(settings["cases"][i:], todo[i:])
                                if case_key(d, m, n, k, rr) not in done]
            print(f"time budget of {args.time_budget:.0f} s used up: {len(table['skipped'])} cases skipped "
                  "(--resume continues)")
            break
        print(f"[{i + 1}/{len(todo)}] {str(dtype).replace('torch.', '')} {name} M={M} K={K} N={N} r={r}")
        inputs = make_case(device, dtype, M, K, N, r)
        family_cands = {f: c for (d, f), c in candidates.items() if d == dtype}
        results, backend_ms, plan_ms = tune_case(op_runner(inputs, r), [inputs[0], inputs[2], inputs[3]], timer,
                                                 family_cands)
        print(f"    fwd+bwd: triton {backend_ms['triton']:.4f} ms (" +
              ", ".join(f"{k} {v:.4f}" for k, v in plan_ms.items()) +
              f"), composite {backend_ms['composite']:.4f} ms -> {min(backend_ms, key=backend_ms.get)}")
        add_case(table, results, backend_ms, plan_ms, dtype, M, N, K, r)
        done.add(case_key(dtype, M, N, K, r))
        write_table(args.out, table)
    else:
        table["complete"] = True
    write_table(args.out, table)
    kind = "dry-run table (ignored by the loader)" if args.dry_run else \
        f"table; to ship it: cp {args.out} rslora_kernels/ops/tuned/{normalized_gpu_name(table['gpu'])}.json"
    print(f"wrote {args.out}: {len(table['configs'])} config entries, {len(table['backends'])} backend entries "
          f"({time.monotonic() - t_start:.0f} s); a {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
