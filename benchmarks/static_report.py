"""Static kernel report: compile every shipped Triton kernel variant for sm_80 and sm_90 without a GPU
and read what the compiler made of it.

    python -m benchmarks.static_report [--arch 80 90] [--dtype fp16 bf16 fp32 tf32] [--quick] [--json out.json]

Per compiled variant (kernel x config x flags x arch x dtype) it reports registers, spills,
shared memory, CTAs per SM, whether ptxas serialized the wgmma pipeline (info C7515), the
instructions of the kernel's hot loop per iteration, and the same count for a tutorial-style matmul
compiled at the same tile (the yardstick). It exits non-zero when a shipped 16-bit (fp16/bf16)
sm_90 variant spills or serializes its wgmma, or when anything fails to compile, and its last line
reads ``<n> variants: <s> spills, <w> serialized wgmma``. docs/static-report.md explains each column.

How, step by step:

1. **Discover** every ``triton.jit`` function in the kernel packages (``KERNEL_PACKAGES``) and swap
   each one, wherever a module binds it, for a recorder: ``rec[grid](*args, **kw)`` records the
   launch instead of running it. No kernel list is kept here.
2. **Record** the real host launchers (``SCENARIOS``: forward, backward, the mask and dropout
   helpers, the merge) on ``meta`` tensors of a training shape (M=8192, K=N=4096), once per config
   in ``configs.candidate_configs(dtype, arch)`` (the ``<family>_config`` functions are made to
   return it) and per flag scenario. Every recorded variant so carries exactly the arguments,
   strides and constexprs a real launch passes.
3. **Specialize** each launch the way Triton's JIT does (ints equal to 1 become constexprs; pointers
   and ints divisible by 16 get the divisibility hint) and compile it with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a process pool.
4. **Inspect**: registers, stack and local bytes from ``cuobjdump -res-usage`` on Triton's cubin;
   shared memory from the metadata plus the cubin; the bundled ``ptxas -v`` run again on the PTX
   (Triton hides its log) for C7515 and the spill stores/loads; the hot loop from the SASS with
   source lines (``nvdisasm -c -g``, see :func:`find_loops`); whether the kernel has a product (``tt.dot`` in the TTIR) and of
   which tile, which picks the tutorial matmul to compile next to it.

Dtypes: ``fp16``, ``bf16``, ``fp32`` (torch's default "highest" matmul precision: tl.dot in IEEE
fp32 on CUDA cores, FFMA by design) and ``tf32`` (``torch.set_float32_matmul_precision("high")``).
The report must see the compiled kernels, not the interpreter: it drops ``TRITON_INTERPRET`` from
its environment before the kernels are imported and refuses to run if they were imported under it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from multiprocessing import get_context

# Packages whose modules hold the kernels and their launchers (a missing one is skipped).
KERNEL_PACKAGES = ("rslora_kernels.ops", "rslora_kernels.dropout")
DTYPES = ("fp16", "bf16", "fp32", "tf32")
SIXTEEN_BIT = ("fp16", "bf16")
# The headline training shape; the full report adds a ragged one (no size a multiple of the tiles).
SHAPE = dict(M=8192, K=4096, N=4096)
RAGGED_SHAPE = dict(M=8000, K=4000, N=4000)
# SM limits per arch (A100 = sm_80, H100 = sm_90), from the CUDA occupancy calculator's tables.
SM_LIMITS = {
    80: dict(regs=65536, smem=164 * 1024, smem_block=163 * 1024, threads=2048, ctas=32, sms=108),
    90: dict(regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, ctas=32, sms=132),
}
REG_UNIT = 256           # registers are allocated per warp in units of 256 (8 per thread)
SMEM_RESERVED = 1024     # shared memory the driver reserves per CTA on sm_80 and later
# Philox4x32's first multiplier (0xD2511F53) as the TTIR prints it (a signed i32) or unsigned:
# present exactly when a kernel runs the dropout stream's rounds.
PHILOX_CONSTANT = re.compile(r"(?<![\w-])(-766435501|3528531795)(?!\w)|0x[dD]2511[fF]53")
# ptxas's info line when it cannot keep wgmma in flight across a pipeline stage.
C7515 = re.compile(r"\(C7515\)[^\n]*wgmma\.mma_async instructions are serialized[^\n]*")


def _clean_env() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default, silenced on 3.9
    interpreted = sys.modules.get("triton.runtime.interpreter")
    interpreted = getattr(interpreted, "InterpretedFunction", None)
    for name, mod in list(sys.modules.items()):
        if interpreted and name.startswith("rslora_kernels.") and \
                any(isinstance(v, interpreted) for v in vars(mod).values()):
            raise RuntimeError(f"{name} was imported under TRITON_INTERPRET=1; "
                               "run the static report in a fresh process without it")


# ----------------------------------------------------------------------------------------------
# 1. Discover the kernels
# ----------------------------------------------------------------------------------------------
def kernel_modules():
    """Every module of ``KERNEL_PACKAGES`` (imported), in a stable order."""
    mods = []
    for name in KERNEL_PACKAGES:
        try:
            pkg = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        mods.append(pkg)
        for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), name + "."):
            mods.append(importlib.import_module(info.name))
    return mods


def _jit_functions(module, wrapped=False):
    """{attribute name: JITFunction} bound in ``module`` (its own and imported ones); ``wrapped``:
    instead the run-time wrappers (``triton.autotune``, ``triton.heuristics``) bound there."""
    from triton.runtime.jit import JITFunction, KernelInterface
    return {attr: obj for attr, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and isinstance(obj, JITFunction) != wrapped}


def kernel_fn(module_name: str, name: str):
    """The JITFunction ``name`` defined in ``module_name`` (what a worker process compiles)."""
    return getattr(importlib.import_module(module_name), name)


class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records instead of launching.
    For a run-time wrapper (autotune, heuristics) it records an error: its configs are chosen at
    run time, so there is no shipped config to compile."""

    def __init__(self, fn, sink, wrapper_name=None):
        self.fn, self.sink, self.wrapper_name = fn, sink, wrapper_name

    def __getitem__(self, grid):
        if self.wrapper_name:
            return lambda *args, **kwargs: self.sink.append((None, self.wrapper_name, None))
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


def _find(modules, name):
    """The object called ``name`` in the module that defines it (not one that re-exports it)."""
    hits = [getattr(m, name) for m in modules
            if name in vars(m) and getattr(getattr(m, name), "__module__", None) == m.__name__]
    if not hits:
        raise LookupError(f"static report: no kernel module defines {name!r} "
                          f"(searched {', '.join(m.__name__ for m in modules)})")
    return hits[0]


# ----------------------------------------------------------------------------------------------
# 2. Record the launches the host code makes
# ----------------------------------------------------------------------------------------------
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


def scenarios(modules, dtype, shape, r):
    """(label prefix, thunk) pairs that call the real launchers on meta tensors. A label prefix P
    names the launches of one call P1, P2, ... in launch order (forward: F1 = shrink, F2 = dual GEMM;
    backward: B1 = shrink, B2 = dual GEMM, then B3's reductions; DoRA with dropout: DF, DB; the group
    op: GF, GB)."""
    import torch
    M, K, N = shape["M"], shape["K"], shape["N"]
    meta = dict(device="meta", dtype=dtype)
    x, W = torch.empty(M, K, **meta), torch.empty(N, K, **meta)
    A, B, b = torch.empty(r, K, **meta), torch.empty(N, r, **meta), torch.empty(N, **meta)
    dy, T = torch.empty(M, N, **meta), torch.empty(M, r, **meta)
    seed = torch.zeros((), dtype=torch.int64, device="meta")
    forward, backward = _find(modules, "lora_forward"), _find(modules, "lora_backward")
    out = []
    for p in (0.0, 0.1):
        # backward's mask state, as the forward returns it: the keep-bits with dropout
        bits = torch.empty((M, -(-K // 32)) if p else (0,), dtype=torch.int32, device="meta")
        for bias in (b, None):
            out.append(("F", lambda p=p, bias=bias: forward(x, W, A, B, bias, 0.5, p, seed)))
        for need_db in (True, False):
            out.append(("B", lambda p=p, need_db=need_db, bits=bits: backward(dy, x, W, A, B, T, 0.5, p, bits,
                                                                  True, True, True, need_db)))
    # r beyond one rank tile, with dropout: F1 = the keep-bits pass, F2 = the shrink reading its
    # bits (with one rank tile the shrink draws them itself), F3 = the dual GEMM
    A2, B2 = torch.empty(2 * r, K, **meta), torch.empty(N, 2 * r, **meta)
    out.append(("F", lambda: forward(x, W, A2, B2, b, 0.5, 0.1, seed)))
    # plan "rank_mm" (T, U, dA, dB by cuBLAS), with dropout: RF1 = the keep-bits pass, RF2 = drop(x),
    # RF3 = the dual GEMM; RB1 = the dual GEMM (dx), RB2 = drop(x) again for dA
    forced_plan = _find(modules, "forced_plan")

    def rank_mm(thunk):
        with forced_plan("rank_mm"):
            thunk()
    out.append(("RF", lambda: rank_mm(lambda: forward(x, W, A, B, b, 0.5, 0.1, seed))))
    out.append(("RB", lambda bits=bits: rank_mm(lambda: backward(dy, x, W, A, B, T, 0.5, 0.1, bits,
                                                                   True, True, True, True))))
    # DoRA with dropout: DF1 = F1, DF2 = y and z; DB1 = B1, DB2 = dx, then B3's reductions
    dora_fwd, dora_bwd = _find(modules, "dora_forward_dropout"), _find(modules, "dora_backward_dropout")
    g = torch.empty(N, device="meta", dtype=torch.float32)
    bits = torch.empty((M, -(-K // 32)), dtype=torch.int32, device="meta")
    for bias in (b, None):
        out.append(("DF", lambda bias=bias: dora_fwd(x, W, A, B, bias, g, 0.5, 0.1, seed)))
    out.append(("DB", lambda: dora_bwd(dy, x, W, A, B, T, g, 0.5, 0.1, bits, True, True, True, True)))
    # the group op, q/k/v-like (N, N/4, N/4; bias on the first): GF1 = the one-pass shrink of every
    # member (F1 per member, GF1-3, where the rank tile is over 64), then the dual GEMM over the stacked
    # N; GB1-3 = B1 per member, GB4 = dx across the members, GB5 = every dA in one pass over x, then dB per member
    group_fwd, group_bwd = _find(modules, "group_forward"), _find(modules, "group_backward")
    Wk, Bk, dyk = torch.empty(N // 4, K, **meta), torch.empty(N // 4, r, **meta), torch.empty(M, N // 4, **meta)
    Ws, As, Bs, dys = [W, Wk, Wk], [A, A, A], [B, Bk, Bk], [dy, dyk, dyk]
    T3 = torch.empty(M, 3 * r, **meta)
    for p in (0.0, 0.1):
        bits = torch.empty((M, -(-K // 32)) if p else (0,), dtype=torch.int32, device="meta")
        out.append(("GF", lambda p=p: group_fwd(x, Ws, As, Bs, [b, None, None], [0.5] * 3, [p] * 3, [seed] * 3)))
        out.append(("GB", lambda p=p, bits=bits: group_bwd(dys, x, Ws, As, Bs, T3, [0.5] * 3, [p] * 3, [bits] * 3,
                                                           True, [True] * 3, [True] * 3, [True, False, False])))
    return out


def helper_scenarios(modules, dtype, shape):
    """The launchers outside the LoRA op: the dropout mask, the composite backend's dropout (one
    tensor and a pair), the merge, the 4-bit dequantization."""
    import torch
    M, K, N = shape["M"], shape["K"], shape["N"]
    x = torch.empty(M, K, device="meta", dtype=dtype)
    seed = torch.zeros((), dtype=torch.int64, device="meta")
    keep_mask, dropout_scale = _find(modules, "keep_mask_triton"), _find(modules, "dropout_scale_triton")
    dropout_pair = _find(modules, "dropout_scale_pair_triton")
    merge = _find(modules, "merge_triton_")
    out = [("mask", lambda: keep_mask(1, M, K, 0.1, "meta")),
           ("dropout", lambda: dropout_scale(x, seed, 0.1, 1 / 0.9)),
           ("dropout pair", lambda: dropout_pair(torch.empty_like(x), 0.5, x, 1 / 0.9, seed, 0.1))]
    for r in (16, 64):  # the merge launcher's two rank tiles
        W = torch.empty(N, K, device="meta", dtype=dtype)
        A, B = torch.empty(r, K, device="meta", dtype=dtype), torch.empty(N, r, device="meta", dtype=dtype)
        out.append(("merge", lambda W=W, A=A, B=B: merge(W, A, B, 0.5)))
    dequant = _find(modules, "dequantize_4bit_triton")
    for nested in (False, True):  # the 4-bit base (QLoRA): bitsandbytes' layout, blocksize 64
        out.append(("dequant", lambda nested=nested: dequant(_meta_weight4bit(N, K, nested), dtype)))
    return out


def _meta_weight4bit(N, K, nested, blocksize=64):
    """A :class:`rslora_kernels.quant.Weight4bit` of ``[N, K]`` on the meta device."""
    import torch
    from rslora_kernels.quant import Weight4bit
    u8, f32 = dict(device="meta", dtype=torch.uint8), dict(device="meta", dtype=torch.float32)
    blocks = -(-N * K // blocksize)
    if not nested:
        return Weight4bit(torch.empty(-(-N * K // 2), **u8), torch.empty(blocks, **f32), (N, K), blocksize, "nf4")
    return Weight4bit(torch.empty(-(-N * K // 2), **u8), torch.empty(blocks, **u8), (N, K), blocksize, "nf4",
                      torch.empty(256, **f32), torch.empty(-(-blocks // 256), **f32), torch.empty((), **f32), 256)


def record_launches(dtype_name: str, arch: int, quick: bool = False):
    """Every kernel launch (label, JITFunction, args, kwargs) the launchers make for ``dtype`` on
    ``arch``, over all candidate configs (``quick``: the extreme ones), flag scenarios, two SM
    counts (B3 splits its M reduction on a full GPU, not on a 1-SM one) and, unless ``quick``, a
    ragged shape. A scenario whose launcher raises gives an ``("error", message)`` entry."""
    import torch
    modules = kernel_modules()
    from rslora_kernels import _runtime
    from rslora_kernels._launch import clear_launch_cache
    configs = _find(modules, "candidate_configs").__module__
    configs = importlib.import_module(configs)

    dtype = _torch_dtype(dtype_name)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    calls, sink = [], []

    def run(prefix, thunk):
        sink.clear()
        # launch plans hold the kernel objects and configs they were made with: make them afresh
        # with the recorders, candidate config and SM count patched in now
        clear_launch_cache()
        try:
            thunk()
        except Exception as exc:  # a launcher that cannot be recorded is a failing row, not a crash
            calls.append(("error", f"{prefix}: {type(exc).__name__}: {exc}"))
            return
        for i, (fn, args, kwargs) in enumerate(sink, 1):
            if fn is None:
                calls.append(("error", f"{prefix}: launched {args}, a kernel wrapped in triton.autotune or "
                                       "triton.heuristics: the static report compiles shipped configs only; "
                                       "launch the plain triton.jit kernel with a config from ops/configs.py"))
                continue
            calls.append((f"{prefix}{i}" if prefix in ("F", "B", "DF", "DB", "GF", "GB", "RF", "RB") else prefix,
                          fn, args, kwargs))

    cands = configs.candidate_configs(dtype, arch)
    if quick:
        cands = _extremes(cands)
    default = {fam: cfg for fam, cfg in reversed(cands)}
    config_owner = {}
    for family in default:
        owners = [m for m in modules + [configs] if f"{family}_config" in vars(m)]
        if not owners:
            raise LookupError(f"candidate_configs names family {family!r} but no kernel module has "
                              f"{family}_config(); the report makes that function return each candidate")
        config_owner[family] = owners
    shapes = [SHAPE] if quick else [SHAPE, RAGGED_SHAPE]
    try:
        with ExitStack() as stack:
            for m in modules + [_runtime]:
                recs = {k: _Recorder(fn, sink) for k, fn in _jit_functions(m).items()}
                recs.update({k: _Recorder(None, sink, f"{m.__name__}.{k}")
                             for k in _jit_functions(m, wrapped=True)})
                runtime = {k: v for k, v in (("cuda_arch", lambda dev: arch),) if k in vars(m)}
                stack.enter_context(_patched(m, **recs, **runtime))
            for sms in (SM_LIMITS[arch]["sms"], 1):
                with ExitStack() as sms_stack:
                    for m in modules + [_runtime]:
                        if "num_sms" in vars(m):
                            sms_stack.enter_context(_patched(m, num_sms=lambda dev, s=sms: s))
                    for family, cfg in cands:
                        chosen = dict(default, **{family: cfg})
                        with ExitStack() as cfg_stack:
                            for fam, owners in config_owner.items():
                                for m in owners:
                                    cfg_stack.enter_context(_patched(
                                        m, **{f"{fam}_config": lambda *a, c=chosen[fam], **k: c}))
                            for shape in shapes:
                                for prefix, thunk in scenarios(modules, dtype, shape, cfg.BLOCK_R):
                                    run(prefix, thunk)
            for prefix, thunk in helper_scenarios(modules, dtype, SHAPE):
                run(prefix, thunk)
    finally:
        torch.set_float32_matmul_precision(precision)
        clear_launch_cache()  # no plan holding a recorder outlives the report
    launched = {(fn.fn.__module__, fn.__name__) for role, *rest in calls if role != "error" for fn in rest[:1]}
    for module, name in unlaunched_kernels(modules, launched):
        calls.append(("error", f"{module}.{name} is a kernel (no other triton.jit function calls it) but no "
                               "scenario launched it: add its launcher to scenarios() in benchmarks/static_report.py"))
    return calls


def unlaunched_kernels(modules, launched):
    """(module, name) of every triton.jit function defined in ``modules`` that is neither in
    ``launched`` nor called by another triton.jit function (a helper like the Philox rounds)."""
    defined = {(m.__name__, k): fn for m in modules for k, fn in _jit_functions(m).items()
               if fn.fn.__module__ == m.__name__ and fn.__name__ == k}
    sources = {key: fn.src for key, fn in defined.items()}
    return sorted(key for key in defined if key not in launched and not any(
        re.search(rf"\b{re.escape(key[1])}\s*\(", src) for other, src in sources.items() if other != key))


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
                          torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
                          torch.int8: "i8"}[value.dtype], "D"
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
    """A picklable description of one compile: kernel, signature, constexprs, attrs, options."""
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(fn.arg_names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in fn.arg_names else options)[k] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name] if param.name in bound else param.default
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
    values = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
    return {"role": role, "module": fn.fn.__module__, "kernel": fn.__name__, "signature": signature,
            "values": values,
            "constexprs": constexprs, "attrs": attrs, "options": options}


def _spec_key(spec):
    return (spec["module"], spec["kernel"], tuple(spec["signature"].items()),
            repr(sorted(spec["constexprs"].items())), repr(sorted(spec["attrs"].items())),
            tuple(sorted(spec["options"].items())))


# ----------------------------------------------------------------------------------------------
# 4. Compile (in a worker process) and read what came out
# ----------------------------------------------------------------------------------------------
def _tool(name) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled {name} not found at {path}")
    return path


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SOURCE = re.compile(r'^\s*//## File "(?P<file>[^"]+)", line (?P<line>\d+)'
                     r'(?: inlined at "(?P<caller>[^"]+)", line (?P<caller_line>\d+))?')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)")


def sass_instructions(listing: str):
    """[(address, text, source)] of one function's SASS, NOPs left out. ``listing``: the output of
    ``nvdisasm -c -gi`` (labels such as `` `(.L_x_1)`` are turned into addresses; ``source`` is
    ``path:line`` from the line info, plus ``<file.py:line`` of the call site for a line of an
    inlined helper) or of ``cuobjdump -sass`` (addresses, no source)."""
    labels, pending, parsed, source = {}, [], [], ""
    for line in listing.splitlines():
        if m := _SOURCE.match(line):
            source = f"{m['file']}:{m['line']}"
            if m["caller"]:  # a helper's line: say where it was called from
                source += f"<{os.path.basename(m['caller'])}:{m['caller_line']}"
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            parsed.append((addr, m.group(2), source))
    resolve = lambda t: re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels[m.group(1)]), t)  # noqa: E731
    return [(a, resolve(t), src) for a, t, src in parsed if not t.startswith("NOP")]


def opcode(text: str) -> str:
    """``HGMMA.64x128x16.F32.BF16`` of ``@P0 HGMMA.64x128x16.F32.BF16 R24, ...`` (predicate dropped)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split(" ")[0]


def mma_opcodes(instrs):
    """Which instructions do the product: tensor-core MMAs (HGMMA on sm_90, HMMA on sm_80) when the
    kernel has any, else FFMA (IEEE fp32 dots run on CUDA cores)."""
    if any(opcode(t).startswith(("HGMMA", "HMMA")) for _, t, _ in instrs):
        return ("HGMMA", "HMMA")
    return ("FFMA",)


def find_loops(instrs):
    """The innermost loops that do products, as dicts {start, end, instructions, mma, source}.

    A loop is a backward branch (``BRA`` to a lower address; the trailing ``BRA`` to itself is
    padding) and its body every instruction from the target to the branch. Loops without product
    instructions (:func:`mma_opcodes`) are left out (e.g. an mbarrier wait's retry loop), and so is a
    product loop that contains another product loop: what remains are the loops whose body runs
    once per reduction step. Triton does not unroll these, so one body is one iteration.
    ``source``: the line the backward branch comes from, which is the loop's ``for`` statement."""
    mma = mma_opcodes(instrs)
    loops = []
    for addr, text, source in instrs:
        m = _BRANCH.match(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t, _ in instrs if target <= a <= addr]
        products = sum(1 for t in body if opcode(t).startswith(mma))
        if products:
            loops.append({"start": target, "end": addr, "instructions": len(body), "mma": products,
                          "source": source})
    return [lp for lp in loops
            if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]


_FOR_RANGE = re.compile(r"^\s*for\s+\w+\s+in\s+(?:tl\.)?range\((?P<args>.*)\)\s*:\s*(#.*)?$")


def trip_count(source, values):
    """Iterations of the loop whose ``for`` statement is at ``source`` (``path:line``), evaluating
    its ``range(...)`` with the launch's integer arguments ``values``; None when the line is not a
    ``for ... in range(...)`` or its bounds are not launch arguments (e.g. a helper's locals)."""
    import linecache
    path, _, line = (source or "").split("<")[0].rpartition(":")
    m = _FOR_RANGE.match(linecache.getline(path, int(line))) if line.isdigit() else None
    if not m:
        return None
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    ns = {**values, "min": min, "max": max, "tl": type("tl", (), {"cdiv": staticmethod(cdiv)})}
    try:
        return len(range(*eval(f"({m['args']},)", {"__builtins__": {}}, ns)))
    except Exception:
        return None


def hot_loop(loops):
    """The loop that stands for the kernel's speed: the one that runs the most iterations at the
    recorded launch (F2's K loop, 64 trips at K=4096, not its rank loop, 1 trip at r=64); where a
    trip count is unknown (loop bounds computed in the kernel), the one with the most product
    instructions per iteration, then the most instructions (never under-report)."""
    if loops and all(lp.get("trips") is not None for lp in loops):
        return max(loops, key=lambda lp: (lp["trips"], lp["mma"], lp["instructions"]))
    return max(loops, key=lambda lp: (lp["mma"], lp["instructions"]), default=None)


_DOT = re.compile(r"tt\.dot\b(?P<attrs>[^:\n]*):\s*tensor<(?P<m>\d+)x(?P<k>\d+)x(?P<a>\w+)>\s*\*\s*"
                  r"tensor<\d+x(?P<n>\d+)x(?P<b>\w+)>")


def ttir_dots(ttir: str):
    """The products in the TTIR: [{m, n, k, dtype, precision}] (precision ieee/tf32 for f32 operands)."""
    out = []
    for d in _DOT.finditer(ttir):
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", d["attrs"])
        precision = None if d["a"] != "f32" else (prec.group(1) if prec else "ieee")
        out.append({"m": int(d["m"]), "n": int(d["n"]), "k": int(d["k"]), "dtype": d["a"], "precision": precision})
    return out


def ctas_per_sm(arch: int, registers: int, shared: int, warps: int):
    """(CTAs per SM, what limits it) from the SM's registers, shared memory, threads and CTA slots."""
    lim = SM_LIMITS[arch]
    if shared > lim["smem_block"]:
        return 0, "smem>block limit"
    regs_per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by = {"regs": lim["regs"] // (regs_per_warp * warps) if registers else lim["ctas"],
          "smem": lim["smem"] // (shared + SMEM_RESERVED),
          "threads": lim["threads"] // (32 * warps),
          "ctas": lim["ctas"]}
    n = min(by.values())
    return n, "/".join(k for k, v in by.items() if v == n)


def ptxas_log(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the kernel's PTX (the bundled ptxas Triton itself uses): the info lines."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(tmp, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def inspect_kernel(kernel, arch: int, values):
    """Resource and code figures of one compiled kernel (a ``triton.compile`` result); ``values``:
    the launch's integer arguments, for the loops' trip counts."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    if "REG" not in usage:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{res}")
    log = ptxas_log(kernel.asm["ptx"], arch)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not spill:
        raise RuntimeError(f"could not parse the ptxas -v log:\n{log}")
    serialized = C7515.search(log)
    instrs = sass_instructions(sass)
    loops = find_loops(instrs)
    for lp in loops:
        lp["trips"] = trip_count(lp["source"], values)
        path, sep, caller = lp["source"].partition("<")
        lp["source"] = os.path.basename(path) + sep + caller
    hot = hot_loop(loops)
    ops = [opcode(t) for _, t, _ in instrs]
    registers = int(usage["REG"])
    shared = int(usage.get("SHARED", 0)) + int(kernel.metadata.shared)
    warps = kernel.metadata.num_warps
    ctas, limiter = ctas_per_sm(arch, registers, shared, warps)
    return {
        "registers": registers,
        "stack_bytes": int(usage.get("STACK", 0)),
        "local_bytes": int(usage.get("LOCAL", 0)),
        "spill_store_bytes": int(spill.group(1)),
        "spill_load_bytes": int(spill.group(2)),
        "shared_bytes": shared,
        "ctas_per_sm": ctas,
        "cta_limiter": limiter,
        "wgmma_serialized": bool(serialized),
        "serialized_reason": serialized.group(0).split("due to", 1)[-1].strip() if serialized else "",
        "hgmma": sum(o.startswith("HGMMA") for o in ops),
        "hmma": sum(o.startswith("HMMA") for o in ops),
        "ffma": sum(o.startswith("FFMA") for o in ops),
        "sass_instructions": len(instrs),
        "loops": [{k: lp[k] for k in ("instructions", "mma", "source", "trips")} for lp in loops],
        "hot_loop_instructions": hot["instructions"] if hot else None,
        "hot_loop_mma": hot["mma"] if hot else None,
        "hot_loop_source": hot["source"] if hot else None,
        "hot_loop_trips": hot["trips"] if hot else None,
        "dots": ttir_dots(kernel.asm["ttir"]),
        "philox": bool(PHILOX_CONSTANT.search(kernel.asm["ttir"])),
    }


def compile_and_inspect(spec, arch: int):
    """Compile one spec for sm_``arch``; return its figures (or the error as ``{"error": ...}``)."""
    _clean_env()
    import triton
    from triton.backends.compiler import GPUTarget
    t0 = time.perf_counter()
    try:
        fn = kernel_fn(spec["module"], spec["kernel"])
        src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                                        attrs=spec["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
        seconds = time.perf_counter() - t0
        return {**inspect_kernel(kernel, arch, spec["values"]), "compile_s": round(seconds, 2)}
    except Exception as exc:  # reported as a row; fails the report
        return {"error": f"{type(exc).__name__}: {exc}"[:4000]}


# ----------------------------------------------------------------------------------------------
# The yardstick: Triton's tutorial matmul (03-matrix-multiplication) at the same tile
# ----------------------------------------------------------------------------------------------
def _tutorial_source():
    import triton
    import triton.language as tl

    @triton.jit
    def tutorial_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                               stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                               INPUT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
                               BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                               GROUP_SIZE_M: tl.constexpr, SIDE_STORE: tl.constexpr):
        # SIDE_STORE (not in the tutorial): a branch with a side store inside the loop, which makes
        # ptxas serialize the wgmma (C7515); the report's detector check compiles it both ways.
        pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
        num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
        num_pid_in_group = GROUP_SIZE_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_SIZE_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
        offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
        b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
        accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_SIZE_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_SIZE_K, other=0.0)
            accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
            if SIDE_STORE:  # a side store under a branch in the loop body, as B1's column sums did
                if pid == 0:
                    tl.store(c_ptr + k * BLOCK_SIZE_K + offs_k, tl.sum(a.to(tl.float32), axis=0).to(c_ptr.dtype.element_ty))
            a_ptrs += BLOCK_SIZE_K * stride_ak
            b_ptrs += BLOCK_SIZE_K * stride_bk
        c = accumulator.to(c_ptr.dtype.element_ty)
        offs_cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
        tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))

    return tutorial_matmul_kernel


_TTIR_TO_SIG = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}


def tutorial_key(row):
    """The yardstick a product kernel is compared with: its widest dot (m, n, k, operand dtype,
    precision) at its warps and stages; None for kernels without a product."""
    if "error" in row or not row["dots"]:
        return None
    d = max(row["dots"], key=lambda d: (d["m"] * d["n"] * d["k"], d["k"]))
    return (row["arch"], d["m"], d["n"], d["k"], d["dtype"], d["precision"], row["warps"], row["stages"])


def compile_tutorial(key, side_store=False):
    """Compile the tutorial matmul (row-major A [M, K], B [K, N], M=N=K=4096) at ``key``'s tile."""
    _clean_env()
    import triton
    from triton.backends.compiler import GPUTarget
    arch, bm, bn, bk, dtype, precision, warps, stages = key
    fn = _tutorial_source()
    ty = "*" + _TTIR_TO_SIG[dtype]
    sig = {"a_ptr": ty, "b_ptr": ty, "c_ptr": ty, "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "i32", "stride_bn": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr", "INPUT_PRECISION": "constexpr",
           "BLOCK_SIZE_M": "constexpr", "BLOCK_SIZE_N": "constexpr", "BLOCK_SIZE_K": "constexpr",
           "GROUP_SIZE_M": "constexpr", "SIDE_STORE": "constexpr"}
    names = list(sig)
    consts = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "INPUT_PRECISION": precision or "tf32",
              "BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8,
              "SIDE_STORE": side_store}
    from triton.backends.compiler import BaseBackend
    div16 = ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_bk", "stride_cm")
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                        constexprs={(names.index(k),): v for k, v in consts.items()},
                                        attrs={(names.index(k),): BaseBackend.parse_attr("D") for k in div16})
        kernel = triton.compile(src, target=GPUTarget("cuda", int(arch[3:]), 32),
                                options={"num_warps": warps, "num_stages": stages})
        return inspect_kernel(kernel, int(arch[3:]), {"M": 4096, "N": 4096, "K": 4096, **{
            k: v for k, v in consts.items() if isinstance(v, int)}})
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


DETECTOR_TILE = ("sm_90", 128, 128, 64, "bf16", None, 8, 3)


def _detector_job(side_store):
    return compile_tutorial(DETECTOR_TILE, side_store)


def detector_check(results):
    """The C7515 detection must flip on a known pair: the tutorial matmul (pipelined) and the same
    kernel with a branch and a side store in its loop (serialized). ``results``: the two compiles."""
    plain, touched = results
    for name, r in (("tutorial", plain), ("tutorial + side store in the loop", touched)):
        if "error" in r:
            raise RuntimeError(f"C7515 detector check: {name} did not compile: {r['error']}")
    if plain["wgmma_serialized"] or not touched["wgmma_serialized"] or not plain["hgmma"]:
        raise RuntimeError("C7515 detector check failed: expected the tutorial matmul pipelined and its "
                           f"side-storing twin serialized, got {plain['wgmma_serialized']} and "
                           f"{touched['wgmma_serialized']}: the ptxas log format may have changed")
    return (f"C7515 detector check (sm_90, bf16, 128x128x64, 8 warps, 3 stages): tutorial matmul "
            f"pipelined ({plain['hgmma']} HGMMA); the same with a branch and side store in its loop "
            f"serialized ({touched['serialized_reason'][:80]}...)")


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def describe(spec):
    """Tiles, flags (the constexprs that are True), warps, stages of a spec."""
    names = list(spec["signature"])
    consts = {names[i[0]]: v for i, v in spec["constexprs"].items()}
    blocks = [f"{k[6:]}={v}" for k, v in consts.items() if k.startswith("BLOCK_")]
    blocks += [f"G={v}" for k, v in consts.items() if k.startswith("GROUP_")]
    flags = [k for k, v in consts.items() if v is True]
    # B3's split-M partials: fp32 outputs of a 16-bit problem
    if spec["signature"].get("out_ptr") == "*fp32" and spec["signature"].get("r_ptr") not in (None, "*fp32"):
        flags.append("SPLIT_M")
    opts = spec["options"]
    return {"tiles": " ".join(blocks), "flags": ",".join(flags) or "-",
            "warps": opts.get("num_warps", 4), "stages": opts.get("num_stages", 3)}


def build_report(archs=(80, 90), dtypes=DTYPES, workers=None, progress=True, kernels=None, quick=False):
    """(rows, detector message): one row per distinct compiled variant and arch, plus one per
    launcher that could not be recorded; the message of :func:`detector_check` when sm_90 is in
    ``archs`` (it raises if the C7515 detection does not flip). ``kernels``: only these kernel
    names; ``quick``: see :func:`record_launches`."""
    _clean_env()
    jobs, rows = [], []
    for arch in archs:
        for dtype in dtypes:
            seen = {}
            for role, *rest in record_launches(dtype, arch, quick):
                if role == "error":
                    if any(r.get("error") == rest[0] and r["arch"] == f"sm_{arch}" and r["dtype"] == dtype
                           for r in rows):
                        continue
                    rows.append({"arch": f"sm_{arch}", "dtype": dtype, "kernel": "?", "role": "?", "tiles": "-",
                                 "flags": "-", "warps": "-", "stages": "-", "error": rest[0]})
                    continue
                fn, args, kwargs = rest
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

    def track(it, total, desc):
        if not progress:
            return it
        from tqdm import tqdm
        return tqdm(it, total=total, desc=desc, file=sys.stderr)

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        detector = [pool.submit(_detector_job, touch) for touch in (False, True)] if 90 in archs else []
        futures = [pool.submit(compile_and_inspect, spec, arch) for arch, _, spec in jobs]
        for (arch, dtype, spec), fut in track(zip(jobs, futures), len(jobs), "compiling"):
            rows.append({"arch": f"sm_{arch}", "dtype": dtype, "kernel": spec["kernel"], "role": spec["role"],
                         **describe(spec), **fut.result()})
        keys = sorted({k for k in map(tutorial_key, rows) if k}, key=repr)
        tut = dict(zip(keys, track(pool.map(compile_tutorial, keys), len(keys), "tutorial matmuls")))
        check = detector_check([f.result() for f in detector]) if detector else None
    for row in rows:
        key = tutorial_key(row)
        t = tut.get(key) if key else None
        if t is None or "error" in t or not row.get("hot_loop_instructions") or not t.get("hot_loop_instructions"):
            row["tutorial"] = None if t is None else {"error": t.get("error", "no loop found")}
            continue
        row["tutorial"] = {"tile": f"{key[1]}x{key[2]}x{key[3]}", "hot_loop_instructions": t["hot_loop_instructions"],
                           "registers": t["registers"], "wgmma_serialized": t["wgmma_serialized"]}
        row["vs_tutorial"] = round(row["hot_loop_instructions"] / t["hot_loop_instructions"], 2)
    return rows, check


def has_spills(row) -> bool:
    return "error" not in row and bool(row["stack_bytes"] or row["local_bytes"]
                                       or row["spill_store_bytes"] or row["spill_load_bytes"])


def tensor_cores_expected(row) -> bool:
    """A kernel with a product must use tensor cores unless all its products are IEEE fp32."""
    return any(d["precision"] != "ieee" for d in row["dots"])


def gated(row) -> bool:
    """Rows the exit code depends on: shipped 16-bit (fp16/bf16) sm_90 variants."""
    return row["arch"] == "sm_90" and row["dtype"] in SIXTEEN_BIT


def check_row(row):
    """Problems with one row (empty list = fine). All are reported; the exit code counts compile
    errors everywhere and spills / serialized wgmma in the gated rows."""
    if "error" in row:
        return [f"error: {row['error']}"]
    arch = int(row["arch"][3:])
    problems = []
    if has_spills(row):
        problems.append(f"spills: stack {row['stack_bytes']} B, local {row['local_bytes']} B, "
                        f"spill stores {row['spill_store_bytes']} B")
    if row["wgmma_serialized"]:
        problems.append(f"wgmma serialized (C7515): {row['serialized_reason']}")
    if row["shared_bytes"] > SM_LIMITS[arch]["smem_block"]:
        problems.append(f"shared memory {row['shared_bytes']} B > {SM_LIMITS[arch]['smem_block']} B")
    if tensor_cores_expected(row):
        if arch >= 90 and row["hgmma"] == 0:
            problems.append("no HGMMA in the sm_90 SASS")
        if arch < 90 and row["hmma"] == 0:
            problems.append("no HMMA in the sm_80 SASS")
    return problems


def failing(row) -> bool:
    """Whether this row makes the report exit non-zero."""
    return "error" in row or (gated(row) and (has_spills(row) or row["wgmma_serialized"]))


def _loops(r):
    """``**hot**@file:line x trips (ratio of tutorial @tile) + other@file:line x trips``."""
    if not r["loops"]:
        return "-"
    tut = r.get("tutorial") or {}
    ratio = f" ({r['vs_tutorial']:.2f}x of {tut['hot_loop_instructions']} @{tut['tile']})" if "vs_tutorial" in r else ""
    fmt = lambda n, src, trips: f"{n}@{src}" + (f" x{trips}" if trips is not None else "")  # noqa: E731
    hot = (r["hot_loop_instructions"], r["hot_loop_source"], r["hot_loop_trips"])
    others = [fmt(lp["instructions"], lp["source"], lp["trips"]) for lp in r["loops"]
              if (lp["instructions"], lp["source"], lp["trips"]) != hot]
    return f"**{hot[0]}**@{hot[1]}" + (f" x{hot[2]}" if hot[2] is not None else "") + ratio + \
        "".join(f" + {o}" for o in others)


def markdown(rows):
    head = ("| arch | dtype | kernel | launch | flags | tiles | w/s | regs | spill B | smem KiB | CTAs/SM | "
            "MMA | wgmma | instr/iter (vs tutorial) | ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        flags = r["flags"]
        if r.get("philox"):  # runs the dropout stream's rounds
            flags = "philox" if flags == "-" else flags + " +philox"
        pre = f"| {r['arch']} | {r['dtype']} | {r['kernel']} | {r['role']} | {flags} | {r['tiles']} | " \
              f"{r['warps']}/{r['stages']} |"
        if "error" in r:
            lines.append(pre + " - | - | - | - | - | - | - | ERROR: " + r["error"].splitlines()[0][:200] + " |")
            continue
        problems = check_row(r)
        mma = f"{r['hgmma']} HGMMA" if r["hgmma"] else f"{r['hmma']} HMMA" if r["hmma"] else \
            f"{r['ffma']} FFMA" if r["dots"] else "-"
        wgmma = ("SERIAL" if r["wgmma_serialized"] else "pipelined") if r["hgmma"] else "-"
        lines.append(
            pre + f" {r['registers']} | {r['stack_bytes'] + r['local_bytes'] + r['spill_store_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {r['ctas_per_sm']} ({r['cta_limiter']}) | {mma} | {wgmma} | {_loops(r)} | "
            f"{('FAIL: ' if failing(r) else 'note: ') + '; '.join(problems) if problems else 'yes'} |")
    return "\n".join(lines)


def markdown_summary(rows):
    """One line per (arch, dtype, kernel): worst case over its compiled variants."""
    head = ("| arch | dtype | kernel | variants | max regs | spilling | min CTAs/SM | max smem KiB | "
            "serialized wgmma | max instr/iter | max vs tutorial | fails gate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = sorted({(r["arch"], r["dtype"], r["kernel"]) for r in rows})
    for key in keys:
        sel = [r for r in rows if (r["arch"], r["dtype"], r["kernel"]) == key]
        ok = [r for r in sel if "error" not in r]
        nfail = sum(map(failing, sel))
        if not ok:
            lines.append(f"| {' | '.join(key)} | {len(sel)} | - | - | - | - | - | - | - | {nfail} (errors) |")
            continue
        hot = [r["hot_loop_instructions"] for r in ok if r["hot_loop_instructions"]]
        ratio = [r["vs_tutorial"] for r in ok if "vs_tutorial" in r]
        lines.append(
            f"| {' | '.join(key)} | {len(sel)} | {max(r['registers'] for r in ok)} | {sum(map(has_spills, ok))} | "
            f"{min(r['ctas_per_sm'] for r in ok)} | {max(r['shared_bytes'] for r in ok) / 1024:.0f} | "
            f"{sum(r['wgmma_serialized'] for r in ok)} | {max(hot) if hot else '-'} | "
            f"{f'{max(ratio):.2f}x' if ratio else '-'} | {nfail or '-'} |")
    return "\n".join(lines)


def final_line(rows) -> str:
    spills = sum(map(has_spills, rows))
    serialized = sum(1 for r in rows if "error" not in r and r["wgmma_serialized"])
    return f"{len(rows)} variants: {spills} spills, {serialized} serialized wgmma"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--kernel", nargs="+", help="only these kernels (names of triton.jit functions)")
    ap.add_argument("--quick", action="store_true",
                    help="per kernel family only the configs with the smallest and largest rank tile, "
                         "headline shape only (the CI test uses this)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    _clean_env()
    import triton
    t0 = time.perf_counter()
    rows, check = build_report(args.arch, args.dtype, args.workers, progress=not args.no_progress,
                        kernels=args.kernel, quick=args.quick)
    print(f"Static kernel report: Triton {triton.__version__}, {len(rows)} compiled variants"
          f"{' (--quick)' if args.quick else ''}, shape M={SHAPE['M']} K={SHAPE['K']} N={SHAPE['N']}"
          f"{'' if args.quick else ' and M=%(M)d K=%(K)d N=%(N)d' % RAGGED_SHAPE}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(markdown_summary(rows))
    print()
    print(markdown(rows))
    if check:
        print("\n" + check)
    bad = [r for r in rows if failing(r)]
    print(f"\nGate (every variant compiles; no spill and no serialized wgmma in a 16-bit sm_90 variant): "
          f"{'PASS' if not bad else f'FAIL, {len(bad)} variants:'}")
    for r in bad:
        print(f"  {r['arch']} {r['dtype']} {r['kernel']} {r['role']} [{r['flags']}] {r['tiles']} "
              f"w{r['warps']}/s{r['stages']}: {'; '.join(check_row(r))}")
    philox_bwd = sorted({f"{r['kernel']} {r['role']}" for r in rows if "error" not in r and r["philox"]
                         and any(x.startswith(("B", "DB", "GB", "RB")) for x in r["role"].split("/"))})
    print(f"Backward launches that run Philox (issue 9 wants none): {', '.join(philox_bwd) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "shape": SHAPE, "quick": args.quick,
                       "detector_check": check, "rows": rows},
                      f, indent=1, default=str)
    print(final_line(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
