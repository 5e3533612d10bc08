"""Static kernel report: compile every Triton kernel for sm_80 and sm_90 without a GPU and read the cubin.

    python -m benchmarks.static_report [--arch 80 90] [--dtype fp16 bf16 fp32 tf32] [--quick] [--json out.json]

What it does, step by step:

1. Runs the real host launchers (``lora_forward``, ``lora_backward``, ``_lora_grads``,
   ``dropout.kernels.keep_mask_triton``, ``dropout_scale_triton``, ``merge_triton_``) on ``meta`` tensors of a typical training shape (M=8192, K=N=4096),
   with the kernels swapped for recorders. So every compiled variant carries exactly the arguments,
   strides and constexpr flags (HAS_DROPOUT, COLSUM, HAS_BIAS, DOT_DTYPE, INPUT_PRECISION, tiles)
   that a real launch passes. Scenarios: bias on/off, dropout 0/0.1, bias grad on/off, B3 with and
   without its split-M partials.
2. Repeats that once per config in ``configs.candidate_configs(dtype, arch)`` (the config functions
   are made to return it), so every config the dispatcher can pick gets compiled.
3. Turns each recorded launch into a ``triton.compile(ASTSource(...), target=GPUTarget(...))`` call,
   specializing arguments the way Triton's JIT does (ints equal to 1 become constexprs, pointers and
   ints divisible by 16 get the divisibility hint), and compiles them in a process pool.
4. Reads registers, stack and local (spill) bytes with ``cuobjdump -res-usage``, shared memory from
   the compiled metadata (dynamic) plus the cubin (static), and counts HGMMA (sm_90 warpgroup MMA)
   and HMMA (sm_80 tensor core) instructions in ``cuobjdump -sass``. ``cuobjdump`` is the one
   bundled with Triton (``triton/backends/nvidia/bin``).

Dtypes: ``fp16``, ``bf16``, ``fp32`` (torch's default "highest" matmul precision, so tl.dot runs in
IEEE fp32 on CUDA cores: no tensor cores, by design) and ``tf32`` (fp32 tensors with
``torch.set_float32_matmul_precision("high")``: tl.dot in TF32 on tensor cores).

The report must see the compiled kernels, not the interpreter: it removes ``TRITON_INTERPRET``
from its environment before the kernels module is imported (and refuses to run if it was already
imported in interpreter mode).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context

# Kernels of the LoRA op that do matrix products (and so must use tensor cores where the dtype allows).
GEMM_KERNELS = ("_shrink_kernel", "_dual_gemm_kernel", "_lora_grads_kernel")
# The others: the Philox mask and the composite backend's dropout (elementwise), and the adapter
# merge (ops/merge_kernel.py), whose dot is IEEE fp32 on purpose (a merge runs once, exactness first).
OTHER_KERNELS = ("_mask_kernel", "_dropout_scale_kernel", "_merge_kernel")
# Max shared memory per block (opt-in), bytes: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32", "tf32")
# Typical training shape used for the recorded launches (sizes only set divisibility/strides).
SHAPE = dict(M=8192, K=4096, N=4096)
# SMs per arch (A100, H100 SXM): the launcher's split-M heuristic depends on it.
SMS = {80: 108, 90: 132}


def _clean_env() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    mod = sys.modules.get("rslora_kernels.dropout.kernels")
    if mod is not None and not hasattr(mod._mask_kernel, "arg_names"):
        raise RuntimeError("rslora_kernels' Triton kernels were imported under TRITON_INTERPRET=1; "
                           "run the static report in a fresh process without it")


def expects_tensor_cores(kernel: str, dtype: str) -> bool:
    """Which compiled kernels must show tensor-core MMAs: the three GEMM kernels in every dtype
    except IEEE fp32 (``fp32``), whose dots run on CUDA cores (FFMA) because no tensor core does
    full fp32. The mask and dropout kernels have no product; the merge's product is IEEE fp32."""
    return kernel in GEMM_KERNELS and dtype != "fp32"


def _kernel_module(name):
    """The module that defines the kernel called ``name``."""
    from rslora_kernels.dropout import kernels as dropout_kernels
    from rslora_kernels.ops import merge_kernel, triton_kernels
    if name == "_merge_kernel":
        return merge_kernel
    return dropout_kernels if name in ("_mask_kernel", "_dropout_scale_kernel") else triton_kernels


def _kernel_fn(name):
    """The JITFunction called ``name``."""
    return getattr(_kernel_module(name), name)


# ----------------------------------------------------------------------------------------------
# 1-2. Record the launches the host code makes
# ----------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.fn, args, kwargs))


@contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}[name]


def _extremes(cands):
    """Per kernel family, only the candidate configs with the smallest and the largest rank tile
    (the largest holds the most registers and shared memory; the smallest the narrowest MMA)."""
    out = []
    for family in sorted({f for f, _ in cands}):
        cfgs = sorted((c for f, c in cands if f == family), key=lambda c: (c.BLOCK_R, str(c)))
        out += [(family, c) for c in dict.fromkeys((cfgs[0], cfgs[-1]))]
    return out


def record_launches(dtype_name: str, arch: int, quick: bool = False):
    """Every distinct kernel launch (role, JITFunction, args, kwargs) the launchers make for
    ``dtype`` on ``arch``, over all candidate configs (``quick``: the extreme ones) and flag scenarios."""
    import torch
    from rslora_kernels.ops import configs, merge_kernel
    from rslora_kernels.dropout import kernels as dk
    from rslora_kernels.ops import triton_kernels as tk

    dtype = _torch_dtype(dtype_name)
    M, K, N = SHAPE["M"], SHAPE["K"], SHAPE["N"]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    calls = []
    sink = []
    recorders = {name: _Recorder(getattr(tk, name), sink) for name in GEMM_KERNELS}
    dropout_recorders = {name: _Recorder(getattr(dk, name), sink) for name in ("_mask_kernel", "_dropout_scale_kernel")}

    def run(role_names, thunk):
        sink.clear()
        thunk()
        for role, (fn, args, kwargs) in zip(role_names, sink):
            calls.append((role, fn, args, kwargs))

    cands = configs.candidate_configs(dtype, arch)
    if quick:
        cands = _extremes(cands)
    default = {fam: cfg for fam, cfg in reversed(cands)}
    try:
        with _patched(tk, **recorders, cuda_arch=lambda dev: arch, num_sms=lambda dev: SMS[arch]):
            for family, cfg in cands:
                chosen = dict(default, **{family: cfg})
                r = cfg.BLOCK_R
                with _patched(tk, dual_gemm_config=lambda *a, c=chosen["dual_gemm"], **k: c,
                              shrink_config=lambda *a, c=chosen["shrink"], **k: c,
                              grads_config=lambda *a, c=chosen["grads"], **k: c):
                    meta = dict(device="meta", dtype=dtype)
                    x, W = torch.empty(M, K, **meta), torch.empty(N, K, **meta)
                    A, B, b = torch.empty(r, K, **meta), torch.empty(N, r, **meta), torch.empty(N, **meta)
                    dy, T = torch.empty(M, N, **meta), torch.empty(M, r, **meta)
                    seed = torch.zeros((), dtype=torch.int64, device="meta")
                    for p in (0.0, 0.1):
                        for bias in (b, None):
                            run(("F1", "F2"), lambda: tk.lora_forward(x, W, A, B, bias, 0.5, p, seed))
                        for need_db in (True, False):
                            run(("B1", "B2", "B3"), lambda: tk.lora_backward(
                                dy, x, W, A, B, T, 0.5, p, seed, True, True, True, need_db))
                        for splits in (1, 8):  # direct bf16/fp16 results and fp32 split-M partials
                            run(("B3",), lambda: tk._lora_grads(T, x, dy, T, 0.5, p, seed, dtype, True, True, splits))
        with _patched(dk, **dropout_recorders):
            run(("mask",), lambda: dk.keep_mask_triton(1, M, K, 0.1, "meta"))
            x = torch.empty(M, K, device="meta", dtype=dtype)
            seed = torch.zeros((), dtype=torch.int64, device="meta")
            run(("dropout",), lambda: dk.dropout_scale_triton(x, seed, 0.1, 1 / 0.9))
        with _patched(merge_kernel, _merge_kernel=_Recorder(merge_kernel._merge_kernel, sink)):
            for r in (16, 64):  # the launcher's two rank tiles
                W = torch.empty(N, K, device="meta", dtype=dtype)
                A, B = torch.empty(r, K, device="meta", dtype=dtype), torch.empty(N, r, device="meta", dtype=dtype)
                run(("merge",), lambda: merge_kernel.merge_triton_(W, A, B, 0.5))
    finally:
        torch.set_float32_matmul_precision(precision)
    return calls


# ----------------------------------------------------------------------------------------------
# 3. Turn a recorded launch into triton.compile arguments (the JIT's own specialization rules)
# ----------------------------------------------------------------------------------------------
def _specialize(value):
    """(type, attribute) of one runtime argument, as Triton's JIT computes them at launch."""
    from triton.runtime.jit import MockTensor
    import torch

    if isinstance(value, torch.Tensor):
        value = MockTensor(value.dtype)  # data_ptr 0: aligned, as torch allocations are
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
        return native_specialize_impl(CUDABackend, value, False, True, True)
    except (ImportError, TypeError):  # other Triton versions: the same rules spelled out
        if isinstance(value, MockTensor):
            return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                          torch.int64: "i64", torch.uint8: "u8"}[value.dtype], "D"
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            ty = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            return ty, "D" if value % 16 == 0 else ""
        if isinstance(value, float):
            return "fp32", None
        raise TypeError(f"cannot specialize {type(value)}")


def compile_spec(role, fn, args, kwargs):
    """A picklable description of one compile: kernel name, signature, constexprs, attrs, options."""
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(fn.arg_names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in fn.arg_names else options)[k] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = _specialize(value)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return {"role": role, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options}


def _spec_key(spec):
    return (spec["kernel"], tuple(spec["signature"].items()), repr(sorted(spec["constexprs"].items())),
            repr(sorted(spec["attrs"].items())), tuple(sorted(spec["options"].items())))


# ----------------------------------------------------------------------------------------------
# 4. Compile (in a worker process) and read the cubin
# ----------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled cuobjdump not found at {path}")
    return path


def compile_and_inspect(spec, arch: int):
    """Compile one spec for sm_``arch``; return the resource figures (or the compile error)."""
    _clean_env()
    import triton
    from triton.backends.compiler import GPUTarget
    fn = _kernel_fn(spec["kernel"])
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                                        attrs=spec["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as exc:  # reported as a row, asserted on by the CI test
        return {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    if "REG" not in usage:
        return {"error": f"could not parse cuobjdump -res-usage output:\n{res}"}
    static_smem = int(usage.get("SHARED", 0))
    dynamic_smem = int(kernel.metadata.shared)
    return {
        "registers": int(usage["REG"]),
        "stack_bytes": int(usage.get("STACK", 0)),
        "local_bytes": int(usage.get("LOCAL", 0)),
        "shared_bytes": static_smem + dynamic_smem,
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "compile_s": round(seconds, 2),
    }


def describe(spec):
    """Human-readable tile/flag summary of a spec."""
    names = list(spec["signature"])
    consts = {names[i[0]]: v for i, v in spec["constexprs"].items()}
    blocks = [f"{k[6:]}={v}" for k, v in consts.items() if k.startswith("BLOCK_")]
    if "GROUP_M" in consts:
        blocks.append(f"G={consts['GROUP_M']}")
    flags = [k for k in ("HAS_DROPOUT", "COLSUM", "HAS_BIAS") if consts.get(k) is True]
    out_ptr = {"_lora_grads_kernel": "da_ptr"}.get(spec["kernel"], "out_ptr")
    if spec["kernel"] == "_lora_grads_kernel" and spec["signature"].get(out_ptr) == "*fp32" \
            and spec["signature"].get("x_ptr") != "*fp32":
        flags.append("SPLIT_M")
    opts = spec["options"]
    return {"tiles": " ".join(blocks), "flags": ",".join(flags) or "-",
            "warps": opts.get("num_warps", 4), "stages": opts.get("num_stages", 3),
            "precision": consts.get("INPUT_PRECISION")}


def build_report(archs=(80, 90), dtypes=DTYPES, workers=None, progress=True, kernels=None, quick=False):
    """All rows of the report (one per distinct compiled kernel variant and arch);
    ``kernels``: restrict to these kernel names; ``quick``: see :func:`record_launches`."""
    _clean_env()
    jobs = []
    for arch in archs:
        for dtype in dtypes:
            seen = {}
            for role, fn, args, kwargs in record_launches(dtype, arch, quick):
                if kernels and fn.__name__ not in kernels:
                    continue
                spec = compile_spec(role, fn, args, kwargs)
                key = _spec_key(spec)
                if key in seen:
                    if role not in seen[key]["role"].split("/"):
                        seen[key]["role"] += "/" + role
                    continue
                seen[key] = spec
            jobs += [(arch, dtype, spec) for spec in seen.values()]
    workers = workers or os.cpu_count() or 1
    rows = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(compile_and_inspect, spec, arch) for arch, _, spec in jobs]
        it = zip(jobs, futures)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(jobs), desc="compiling", file=sys.stderr)
        for (arch, dtype, spec), fut in it:
            row = {"arch": f"sm_{arch}", "dtype": dtype, "kernel": spec["kernel"], "role": spec["role"],
                   **describe(spec), **fut.result()}
            row["tensor_cores_expected"] = expects_tensor_cores(spec["kernel"], dtype)
            rows.append(row)
    return rows


def check_row(row):
    """Problems with one row (empty list = fine): compile error, spills, shared memory over the
    device limit, missing tensor-core instructions where they are expected."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    arch = int(row["arch"][3:])
    problems = []
    if row["stack_bytes"] or row["local_bytes"]:
        problems.append(f"spills: stack {row['stack_bytes']} B, local {row['local_bytes']} B")
    if row["shared_bytes"] > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {row['shared_bytes']} B > {SMEM_LIMIT[arch]} B")
    if row["tensor_cores_expected"]:
        if arch >= 90 and row["hgmma"] == 0:
            problems.append("no HGMMA in the sm_90 SASS")
        if arch < 90 and row["hmma"] == 0:
            problems.append("no HMMA in the sm_80 SASS")
    return problems


def markdown(rows):
    head = ("| arch | dtype | kernel | launch | flags | tiles | warps/stages | regs | spill B | smem KiB | "
            "HGMMA | HMMA | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['kernel']} | {r['role']} | {r['flags']} | {r['tiles']} "
                         f"| {r['warps']}/{r['stages']} | - | - | - | - | - | COMPILE ERROR |")
            continue
        problems = check_row(r)
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['kernel']} | {r['role']} | {r['flags']} | {r['tiles']} | "
            f"{r['warps']}/{r['stages']} | {r['registers']} | {r['stack_bytes'] + r['local_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {r['hgmma']} | {r['hmma']} | {'yes' if not problems else 'NO: ' + '; '.join(problems)} |")
    return "\n".join(lines)


def markdown_summary(rows):
    """One line per (arch, dtype, kernel): worst case over its compiled variants."""
    head = ("| arch | dtype | kernel | variants | max regs | max spill B | max smem KiB | min HGMMA | min HMMA | "
            "all pass |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = list(dict.fromkeys((r["arch"], r["dtype"], r["kernel"]) for r in rows))
    for key in sorted(keys):
        sel = [r for r in rows if (r["arch"], r["dtype"], r["kernel"]) == key]
        ok = [r for r in sel if "error" not in r]
        if not ok:
            lines.append(f"| {' | '.join(key)} | {len(sel)} | - | - | - | - | - | COMPILE ERROR |")
            continue
        lines.append(
            f"| {' | '.join(key)} | {len(sel)} | {max(r['registers'] for r in ok)} | "
            f"{max(r['stack_bytes'] + r['local_bytes'] for r in ok)} | {max(r['shared_bytes'] for r in ok) / 1024:.0f} | "
            f"{min(r['hgmma'] for r in ok)} | {min(r['hmma'] for r in ok)} | "
            f"{'yes' if len(ok) == len(sel) and not any(check_row(r) for r in sel) else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--kernel", nargs="+", choices=GEMM_KERNELS + OTHER_KERNELS, help="only these kernels")
    ap.add_argument("--quick", action="store_true",
                    help="per kernel only the configs with the smallest and largest rank tile (the CI test uses this)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    _clean_env()
    import triton
    t0 = time.perf_counter()
    rows = build_report(args.arch, args.dtype, args.workers, progress=not args.no_progress, kernels=args.kernel, quick=args.quick)
    print(f"Static kernel report: Triton {triton.__version__}, {len(rows)} compiled variants, "
          f"shape M={SHAPE['M']} K={SHAPE['K']} N={SHAPE['N']}, {time.perf_counter() - t0:.0f} s\n")
    print(markdown_summary(rows))
    print()
    print(markdown(rows))
    bad = [r for r in rows if check_row(r)]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} variants pass (no spills, shared memory within the limit, "
          "tensor-core MMAs where expected)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "shape": SHAPE, "rows": rows}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
