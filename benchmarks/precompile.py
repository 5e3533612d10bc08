"""Compile every Triton kernel variant a GPU run launches, in parallel, into one TRITON_CACHE_DIR.

    python -m benchmarks.precompile                                      # on the GPU machine, all cores
    python -m benchmarks.precompile --arch 90 --cache-dir .triton-cache-sm90   # ahead, on a CPU machine
    python -m benchmarks.precompile --list                               # only enumerate and count
    python -m benchmarks.precompile --check-jit --cache-dir DIR          # prove the JIT finds them all

Why: a cold GPU run spends most of its minutes compiling (about 2 s a variant, one at a time as
the kernels are first launched). Compiled ahead on all cores, the run's timed steps find every
variant in the cache.

How, in two halves:

1. Enumerate. The run's steps -- the sweep presets (``benchmarks.sweep.PRESETS``), the
   determinism cases, the ragged sanitizer cases -- run their real code (provider layers,
   ``rk.lora_linear``, ``dropout_mask``, ``merge_lora_``) on ``meta`` tensors, with Triton's active
   driver replaced by a stand-in that only names the target GPU, and ``JITFunction._do_compile``
   by a recorder. So Triton's own JIT binds each launch's arguments, specializes them (dtypes,
   16-byte alignment, divisibility, ints equal to 1) and computes the signature, constexprs,
   attributes and options it would compile -- the recorder keeps those instead of compiling.
   Whatever kernels the launchers start, today's or ones added later, are found this way: no
   kernel is named here. Meta tensors send custom ops to their fake kernels, which launch nothing,
   so during enumeration the op's two custom ops call the registered backend directly, and the
   runtime queries (``cuda_arch``, ``num_sms``, ``triton_available_for``) answer for the target.
2. Compile. Each distinct variant goes to ``triton.compile(ASTSource(fn, signature, constexprs,
   attrs), target, options)`` in a process pool: the very call the JIT makes, hence the same
   cache key and the same cache entry (``--check-jit`` verifies that by letting the JIT look
   every variant up afterwards and counting entries it had to add).

Cache hits are counted from the cache folder: entries present before compiling are hits (a cache
built ahead, e.g. carried to a GPU machine), new entries are compiles. A cache built with another
Triton version or Python build never hits (Triton's key hashes its own sources and libtriton).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from multiprocessing import get_context
from pathlib import Path

# H100 SXM / H200: sm_90 with 132 SMs (B3's split-M choice depends on the SM count).
DEFAULT_ARCH, DEFAULT_SMS = 90, 132
ROOT = Path(__file__).resolve().parents[1]


def _no_interpreter():
    """The JIT path needs compiled kernels, not the interpreter: drop TRITON_INTERPRET before the
    kernels are defined (Triton reads it in ``@triton.jit``), and refuse if some already were."""
    os.environ.pop("TRITON_INTERPRET", None)
    for name, mod in list(sys.modules.items()):
        if name.startswith("rslora_kernels") and mod is not None:
            if any(type(v).__name__ == "InterpretedFunction" for v in vars(mod).values()):
                raise RuntimeError(f"{name} was imported under TRITON_INTERPRET=1; run benchmarks.precompile "
                                   "in a fresh process without it")


# ----------------------------------------------------------------------------------------------
# 1. Enumerate: run the steps' code with a recording JIT
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    """One compile, exactly as the JIT would request it."""
    module: str
    qualname: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    steps: list

    @property
    def name(self):
        return self.qualname

    def job(self):
        return (self.module, self.qualname, self.signature, self.constexprs, self.attrs, self.options)


class _TargetDriver:
    """Stands in for Triton's active driver: names the target GPU, launches nothing."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextmanager
def _patched_attr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _registry():
    """The backend registry (a live read-only view), with the composite backend registered."""
    import importlib
    import rslora_kernels as rk
    importlib.import_module("rslora_kernels.ops.composite")  # registers the backend
    return rk.registered_backends()


@contextmanager
def _on_any_device(registry):
    """Every registered backend re-registered as running on any device (meta included), then restored."""
    import rslora_kernels as rk
    saved = dict(registry)
    for spec in saved.values():
        rk.register_backend(spec.name, spec.forward, spec.backward, devices=lambda device: True, dtypes=spec.dtypes,
                            replace=True)
    try:
        yield
    finally:
        for spec in saved.values():
            rk.register_backend(spec.name, spec.forward, spec.backward, devices=spec.devices, dtypes=spec.dtypes,
                                replace=True)


@contextmanager
def target_gpu(arch: int, sms: int, record=None):
    """Make the package launch for GPU ``arch`` with ``sms`` SMs on meta tensors.

    ``record(jit_fn, signature, constexprs, attrs, options)`` set: the JIT records instead of
    compiling. None: the JIT compiles (or finds in the cache) and does not launch.
    """
    _no_interpreter()
    import torch
    import rslora_kernels  # noqa: F401
    from rslora_kernels import _runtime
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    answers = [(_runtime.cuda_arch, lambda device: arch), (_runtime.num_sms, lambda device: sms),
               (_runtime.triton_available_for, lambda device: True), (_runtime.interpreting, lambda: False)]
    registry = _registry()
    with ExitStack() as stack:
        # runtime queries, wherever a module imported them
        for mod in [m for name, m in list(sys.modules.items()) if name.startswith("rslora_kernels") and m]:
            for attr, value in list(vars(mod).items()):
                for query, answer in answers:
                    if value is query:
                        stack.enter_context(_patched_attr(mod, attr, answer))
        stack.enter_context(_on_any_device(registry))
        # launches through the JIT only: a compiled kernel must never be launched directly here
        from rslora_kernels import _launch
        stack.enter_context(_patched_attr(_launch, "direct_launch_enabled", lambda: False))
        # the package's custom ops, which would take their fake kernels on meta tensors: their
        # Python implementations run instead
        from rslora_kernels.ops.custom_op import DirectCustomOp
        stack.enter_context(_patched_attr(DirectCustomOp, "__call__", lambda op, *args: op.impl(*args)))
        # autocast has no 'meta' device type (and is off in every step)
        autocast_enabled = torch.is_autocast_enabled
        stack.enter_context(_patched_attr(torch, "is_autocast_enabled", lambda *device: False if device == ("meta",)
                                          else autocast_enabled(*device)))
        previous = driver._active
        driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
        stack.callback(setattr, driver, "_active", previous)
        if record is not None:
            def _record(jit, key, signature, device, constexprs, options, attrs, warmup):
                record(jit, signature, constexprs, attrs, options)
                return None  # the JIT returns without compiling or launching
            stack.enter_context(_patched_attr(JITFunction, "_do_compile", _record))
        else:
            original = JITFunction.run
            stack.enter_context(_patched_attr(JITFunction, "run", lambda self, *a, grid, warmup, **k:
                                              original(self, *a, grid=grid, warmup=True, **k)))
        yield


def _sweep_scenario(preset: str):
    def run():
        import torch
        from torch import nn
        from . import dora_providers, providers
        from . import sweep
        args = sweep.parse_args(["--preset", preset, "--device", "cuda"])
        prov = dora_providers if args.dora else providers  # as the sweep picks its layers
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        fused = [p for p in args.providers if p in _registry()]
        backward = any(m != "fwd" for m in args.modes)
        for shape in args.shapes:
            K, N = args.shape_table[shape]
            for M in args.m:
                for p in args.dropout:
                    for r in args.ranks:
                        base = nn.Linear(K, N, bias=True, device="meta", dtype=dtype).requires_grad_(False)
                        for name in fused:
                            layer = prov.make_layer(name, base, r, sweep.ALPHA, p)
                            x = torch.empty(M, K, device="meta", dtype=dtype, requires_grad=True)
                            y = layer(x)
                            if backward:
                                y.backward(torch.empty(M, N, device="meta", dtype=dtype))
    return run


def _determinism_scenario(dtypes, scale):
    def run():
        import torch
        from . import determinism
        for name in dtypes:
            for case in determinism.cases(scale):
                x, W, b, A, B, dy, s, p = determinism.make_inputs(case, determinism.DTYPES[name], torch.device("meta"))
                determinism.run_once(x, W, b, A, B, dy, s, p, 42, "triton")
    return run


def _ragged_scenario(dtype_name, small):
    def run():
        import torch
        from . import ragged
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        ragged.launch_all(torch.device("meta"), dtype, small)
    return run


def _train_step_scenario(argv):
    """The Triton launches of ``benchmarks.train_step`` with ``argv`` (gpu_run.sh's step b-train-step):
    its Llama-shaped PEFT model patched with backend "triton", each distinct projection run forward and
    backward on meta tensors of the step's shape (x with and without grad: the first layer's q/k/v
    inputs need none). The model itself cannot run on meta (transformers' mask code reads values);
    the other providers launch no Triton kernel ("auto" picks among the same variants)."""
    def run():
        import torch
        import rslora_kernels as rk
        from . import train_step as ts
        args = ts.parse_args([*argv, "--device", "cuda"])
        preset, meta, dtype = args.preset_obj, torch.device("meta"), ts.DTYPES[args.preset_obj.dtype]
        one_layer = dataclasses.replace(preset, layers=1)
        for r in args.ranks:
            for p in args.dropout:
                model, _ = ts.build("triton", one_layer, r, p, meta, dtype, dora=args.dora)
                for layer in [m for m in model.modules() if rk.peft.is_patched(m)]:
                    base = layer.get_base_layer()
                    for needs_dx in (True, False):
                        x = torch.empty(preset.batch, preset.seq, base.in_features, device=meta, dtype=dtype,
                                        requires_grad=needs_dx)
                        layer(x).backward(torch.empty(preset.batch, preset.seq, base.out_features, device=meta,
                                                      dtype=dtype))
    return run


# Step b-train-step's arguments (gpu_run.sh reads these): the GPU preset at two ranks, time-boxed
TRAIN_STEP_ARGS = ["--preset", "gpu", "--ranks", "16", "256", "--dropout", "0.1", "0", "--time-budget", "90"]
DRY_TRAIN_STEP_ARGS = ["--preset", "tiny", "--ranks", "4", "--dropout", "0.1", "0", "--loss-steps", "3", "--warmup", "1"]


# Step c's selection (gpu_run.sh reads these): the bf16/fp16 op tests and the mask-parity tests.
NUMERICS_TESTS = ["tests/test_lora_linear.py", "tests/test_dropout.py", "tests/test_composite.py", "tests/test_layers.py",
                  "tests/test_cuda_graphs.py", "tests/test_dora.py",
                  "-k", "float16 or mask"]
DRY_NUMERICS_TESTS = ["tests/test_dropout.py", "-k", "kernels_use_dropout_mask"]
# Step d's arguments (gpu_run.sh reads these unless TUNE_ARGS is set): 7b-attn at M = 8192, three ranks
TUNE_ARGS = ["--quick", "--ranks", "16", "256", "64", "--time-budget", "50"]


class _MetaDevice:
    """pytest plugin: the tests' device is 'meta' -- the ``device`` fixture and module-level
    ``DEVICE``/``DEV`` globals (tests/conftest.py, test_layers.py). The kernels launch (into the
    recorder) before a test's first check, which then fails on meta: outcomes are ignored."""

    def pytest_collection_modifyitems(self, items):
        import torch
        for mod in {item.module for item in items if getattr(item, "module", None)} | {sys.modules.get("conftest")}:
            for name in ("DEVICE", "DEV"):
                if isinstance(getattr(mod, name, None), torch.device):
                    setattr(mod, name, torch.device("meta"))


def _pytest_scenario(selection):
    def run():
        import importlib
        import pkgutil
        import pytest
        import rslora_kernels
        # every kernel module imported now, while TRITON_INTERPRET is unset (tests/conftest.py sets it
        # on a machine without CUDA, and Triton reads it when a kernel is defined)
        for info in pkgutil.walk_packages(rslora_kernels.__path__, "rslora_kernels."):
            importlib.import_module(info.name)
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            pytest.main(["-q", "--tb=no", "-rN", "--no-header", "-p", "no:cacheprovider", *selection], plugins=[_MetaDevice()])
        finally:
            os.chdir(cwd)
            os.environ.pop("TRITON_INTERPRET", None)
    return run


def _tune_scenario(argv):
    """The tuner's launches (benchmarks.tune with ``argv``): every candidate config of every
    request of every case, forced in turn as the tuner forces it (the timer only calls the step)."""
    def run():
        import torch
        from rslora_kernels._runtime import cuda_arch
        from rslora_kernels.ops import configs
        from rslora_kernels.ops.tuning import rules_only
        from . import tune
        args = tune.parse_args([*argv, "--out", os.devnull])
        meta = torch.device("meta")
        for dtype, M, _, K, N, r in tune.cases(args):
            with rules_only():
                cands = {}
                for family, cfg in configs.candidate_configs(dtype, cuda_arch(meta)):
                    cands.setdefault(family, []).append(cfg)
            x = torch.empty(M, K, device=meta, dtype=dtype, requires_grad=True)
            A = torch.empty(r, K, device=meta, dtype=dtype, requires_grad=True)
            B = torch.empty(N, r, device=meta, dtype=dtype, requires_grad=True)
            inputs = (x, torch.empty(N, K, device=meta, dtype=dtype), A, B, torch.empty(M, N, device=meta, dtype=dtype))
            tune.tune_case(tune.op_runner(inputs, r), [x, A, B], lambda fn, grads: fn() or 0.0, cands,
                           log=lambda *a: None)
    return run


def plan(name: str):
    """{step: scenario} of a run, in gpu_run.sh's step order. 'gpu': the real run; 'dry': --dry-run's
    tiny shapes (compiled for the GPU all the same: a rehearsal of this tool)."""
    from .sweep import WIDE_PRESETS
    if name == "gpu":
        steps = {"b-sweep": _sweep_scenario("headline"),
                 "b-train-step": _train_step_scenario(TRAIN_STEP_ARGS),
                 "c-numerics": _pytest_scenario(NUMERICS_TESTS),
                 "d-tune": _tune_scenario(TUNE_ARGS),
                 "e-determinism": _determinism_scenario(["bf16"], 1),
                 "f-sanitizer": _ragged_scenario("bf16", False)}
        steps.update({f"g-{p}": _sweep_scenario(p) for p in WIDE_PRESETS})
        return steps
    if name == "dry":
        return {"b-sweep": _sweep_scenario("dry-headline"),
                "b-train-step": _train_step_scenario(DRY_TRAIN_STEP_ARGS),
                "c-numerics": _pytest_scenario(DRY_NUMERICS_TESTS),
                "e-determinism": _determinism_scenario(["bf16"], 32),
                "f-sanitizer": _ragged_scenario("bf16", True),
                "g-dry-wide": _sweep_scenario("dry-wide")}
    raise ValueError(f"unknown plan {name!r}: 'gpu' or 'dry'")


def enumerate_variants(plan_name: str, arch: int, sms: int, steps=None):
    """The distinct variants the plan's steps launch, each with the steps that launch it."""
    variants = {}
    current = [None]

    def record(jit, signature, constexprs, attrs, options):
        key = (jit.fn.__module__, jit.fn.__qualname__, repr(signature), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(options))
        v = variants.get(key)
        if v is None:
            v = variants[key] = Variant(jit.fn.__module__, jit.fn.__qualname__, dict(signature), dict(constexprs),
                                        dict(attrs), dict(options.__dict__), [])
        if current[0] not in v.steps:
            v.steps.append(current[0])

    with target_gpu(arch, sms, record):
        for step, scenario in plan(plan_name).items():
            if steps and step not in steps:
                continue
            current[0] = step
            scenario()
    return list(variants.values())


# ----------------------------------------------------------------------------------------------
# 2. Compile in a process pool; count cache entries
# ----------------------------------------------------------------------------------------------
def compile_one(job, arch):
    """Worker: the JIT's compile call for one variant. Returns (seconds, error or None)."""
    _no_interpreter()
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, qualname, signature, constexprs, attrs, options = job
    fn = getattr(importlib.import_module(module), qualname)
    t0 = time.perf_counter()
    try:
        triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # reported, never hidden
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:2000]
    return time.perf_counter() - t0, None


def cache_entries(cache_dir) -> dict:
    """{entry folder: kernel names} of a Triton cache folder (each compiled variant is one folder)."""
    out = {}
    if cache_dir and os.path.isdir(cache_dir):
        for entry in os.scandir(cache_dir):
            if entry.is_dir():
                out[entry.name] = sorted(f[:-5] for f in os.listdir(entry.path)
                                         if f.endswith(".json") and not f.startswith("__grp__"))
    return out


def compile_all(variants, arch: int, workers: int):
    """Compile every variant in ``workers`` processes; returns [(seconds, error)] in order."""
    jobs = [v.job() for v in variants]
    if not jobs:
        return []
    if workers <= 1:  # in this process: no pool to start (the dry run's rehearsal)
        return [compile_one(job, arch) for job in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(compile_one, jobs, [arch] * len(jobs)))


def check_jit(plan_name: str, arch: int, sms: int, cache_dir: str, steps=None) -> int:
    """Run the plan again with the JIT compiling for real (no launch) in a fresh process; returns
    how many cache entries it had to add (0: every key the JIT computed was already there)."""
    code = ("import sys; from benchmarks.precompile import target_gpu, plan\n"
            f"with target_gpu({arch}, {sms}):\n"
            f"    [s() for name, s in plan({plan_name!r}).items() if not {steps!r} or name in {steps!r}]\n")
    before = set(cache_entries(cache_dir))
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.abspath(cache_dir))
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    added = set(cache_entries(cache_dir)) - before
    return len(added)


def _default_target():
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor, torch.cuda.get_device_properties(0).multi_processor_count
    return DEFAULT_ARCH, DEFAULT_SMS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="gpu", choices=("gpu", "dry"), help="the run whose launches to compile")
    ap.add_argument("--step", nargs="+", help="only these steps of the plan")
    ap.add_argument("--arch", type=int, help=f"compute capability x10 (default: this GPU's, else {DEFAULT_ARCH})")
    ap.add_argument("--sms", type=int, help=f"SM count (default: this GPU's, else {DEFAULT_SMS})")
    ap.add_argument("--cache-dir", help="TRITON_CACHE_DIR to fill (default: $TRITON_CACHE_DIR, else Triton's own)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, help="compile only the first N variants (a rehearsal)")
    ap.add_argument("--list", action="store_true", help="enumerate and print the variants; compile nothing")
    ap.add_argument("--check-jit", action="store_true",
                    help="afterwards, let the JIT look every variant up and count what it had to compile anew")
    ap.add_argument("--json", help="write the per-variant results here")
    ap.add_argument("--binary-only", action="store_true",
                    help="keep only the cubin and metadata of each variant (TRITON_STORE_BINARY_ONLY=1: not part "
                         "of Triton's cache key; about a fifth of the size, so a cache built ahead fits a 64 MiB carry)")
    args = ap.parse_args(argv)
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    if args.binary_only:
        os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # the workers inherit it
    _no_interpreter()
    import triton
    arch, sms = _default_target()
    arch, sms = args.arch or arch, args.sms or sms
    cache_dir = os.environ.get("TRITON_CACHE_DIR") or str(Path(triton.knobs.cache.dir))

    t0 = time.perf_counter()
    variants = enumerate_variants(args.plan, arch, sms, args.step)
    t_enum = time.perf_counter() - t0
    per_step = Counter(s for v in variants for s in v.steps)
    per_kernel = Counter(v.name for v in variants)
    print(f"precompile: Triton {triton.__version__}, plan {args.plan!r}, sm_{arch} with {sms} SMs, "
          f"{len(variants)} distinct variants enumerated in {t_enum:.1f} s")
    print("  variants launched per step: " + ", ".join(f"{s} {n}" for s, n in per_step.items()))
    print("  per kernel: " + ", ".join(f"{k} {n}" for k, n in sorted(per_kernel.items())))
    if args.list:
        for v in variants:
            print(f"  {v.name} {'/'.join(v.steps)} {v.signature} {v.constexprs} warps={v.options.get('num_warps')}")
        return 0
    todo = variants[:args.limit] if args.limit is not None else variants
    before = cache_entries(cache_dir)
    t0 = time.perf_counter()
    results = compile_all(todo, arch, args.workers)
    wall = time.perf_counter() - t0
    after = cache_entries(cache_dir)
    errors = [(v, err) for v, (_, err) in zip(todo, results) if err]
    compiled = len(set(after) - set(before))
    hits = len(todo) - compiled - len(errors)
    print(f"  cache {cache_dir}: {len(before)} entries before, {len(after)} after")
    print(f"  compiled {len(todo)} of {len(variants)} variants on {min(args.workers, max(len(todo), 1))} processes "
          f"in {wall:.1f} s: {hits} already in the cache (hits), {compiled} compiled (misses), {len(errors)} failed; "
          f"sum of per-variant times {sum(t for t, _ in results):.1f} s")
    for v, err in errors:
        print(f"  FAILED {v.name} ({'/'.join(v.steps)}): {err}")
    print(f"precompile: hits {hits} misses {compiled} failed {len(errors)} of {len(todo)}")
    status = 1 if errors else 0
    if args.check_jit:
        added = check_jit(args.plan, arch, sms, cache_dir, args.step)
        print(f"check-jit: the JIT looked up every launch of the plan; it compiled {added} variants anew "
              f"({'every key matched' if added == 0 else 'KEYS DIFFER or variants were skipped (--limit)'})")
        status = status or (added != 0 and args.limit is None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": arch, "sms": sms, "plan": args.plan, "hits": hits,
                       "compiled": compiled, "failed": len(errors), "wall_s": round(wall, 1),
                       "variants": [{"kernel": v.name, "steps": v.steps, "seconds": round(t, 2), "error": e}
                                    for v, (t, e) in zip(todo, results)]}, f, indent=1)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
