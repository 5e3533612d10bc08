"""``python -m rslora_kernels.verify``: every backend's output and grads against the float64 oracle.

Runs :func:`rslora_kernels.selfcheck.self_check` (the check ``auto`` runs on first use) over a grid
of op kinds, backends, shapes, ranks, dtypes and dropout, prints one row per check (its worst
tensor's error against its bound) and every failing tensor, and exits with status 1 when any check
fails (2 for bad options). Defaults fit the device: on CUDA the registered backends that run there
at a few mid-size shapes; on the CPU "composite" and "reference" at small shapes, plus "triton" in
Triton's interpreter when ``TRITON_INTERPRET=1`` is set or ``--backends`` names it.

Examples::

    python -m rslora_kernels.verify
    python -m rslora_kernels.verify --ops lora,dora --backends triton --dtypes bfloat16 --ranks 16,256
    python -m rslora_kernels.verify --import mypkg.backends --backends mine   # a backend of your own
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from .selfcheck import CHECKABLE_DTYPES, OPS, Case, CheckResult, self_check

__all__ = ["main", "default_backends", "cases"]

_DTYPES = {str(d).replace("torch.", ""): d for d in CHECKABLE_DTYPES}
_DTYPES.update({"fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32})

# (M, N, K): ragged on purpose (no tile multiple), one small M (decode-like) where it is cheap
_CPU_SHAPES = ((37, 29, 21), (5, 48, 40))
_CPU_RANKS = (4, 16)
_CUDA_SHAPES = ((1000, 768, 1024), (33, 1536, 640), (2048, 4096, 4096))
_CUDA_RANKS = (8, 64, 256)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_backends(device: torch.device) -> List[str]:
    """The registered backends that run on ``device`` (on the CPU, "triton" only in the interpreter)."""
    from .ops.lora_linear import registered_backends

    return [name for name, spec in registered_backends().items() if spec.runs_on(device)]


def _applies(op: str, backend: str, x_dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``backend`` takes this op, device and dtypes (what the op would otherwise refuse)."""
    from .ops.lora_linear import registered_backends

    spec = registered_backends()[backend]
    if not spec.runs_on(device) or x_dtype not in spec.dtypes or adapter_dtype not in spec.dtypes:
        return False
    if op == "dora" and spec.backward is None and backend != "reference":
        return False  # DoRA runs on fused backends and on the reference only
    return True


def cases(ops: Sequence[str], backends: Sequence[str], shapes, ranks, dtypes, adapter_dtypes, dropouts, biases,
          device: torch.device, seed: int = 0):
    """(backend, :class:`Case`) for every applicable combination, in table order."""
    out = []
    for op, backend, (M, N, K), r, dt, ad, p, bias in itertools.product(
            ops, backends, shapes, ranks, dtypes, adapter_dtypes, dropouts, biases):
        ad = dt if ad is None else ad
        if torch.finfo(ad).bits < torch.finfo(dt).bits:
            continue  # adapters narrower than x: not a valid call
        if (op == "group" and N < 3) or not _applies(op, backend, dt, ad, device):
            continue
        out.append((backend, Case(op, M, N, K, r, dt, None if ad == dt else ad, p, bias, device, seed)))
    # one row per distinct check (fp32 adapters with fp32 x is the same case as "same")
    return list(dict.fromkeys(out))


def _parse_list(text: str, conv, what: str):
    try:
        return [conv(v.strip()) for v in text.split(",") if v.strip()]
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}: {e}") from None


def _shape(v: str):
    M, N, K = (int(s) for s in v.lower().split("x"))
    return M, N, K


def _adapter(v: str):
    return None if v == "same" else _DTYPES[v]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m rslora_kernels.verify",
        description="Check every backend's output and grads against the float64 reference by the numerics rule "
                    "(err <= 2 * err of PyTorch in the same dtype + 4 ulps; NaN never passes). Exit status 1 on any "
                    "failure.")
    ap.add_argument("--ops", default=",".join(OPS), help=f"op kinds, of {', '.join(OPS)} (default: all)")
    ap.add_argument("--backends", default=None,
                    help="registered backends (default: those that run on the device; on the CPU 'triton' only "
                         "with TRITON_INTERPRET=1); naming 'triton' on the CPU turns the interpreter on")
    ap.add_argument("--shapes", default=None, help="MxNxK list (default: small ragged shapes on the CPU, "
                                                   "mid-size ones on CUDA)")
    ap.add_argument("--ranks", default=None, help="adapter ranks r (default: 4,16 on the CPU; 8,64,256 on CUDA)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="x dtypes (float16, bfloat16, float32)")
    ap.add_argument("--adapter-dtypes", default="same,float32",
                    help="adapter dtypes: 'same' (x's) and/or a dtype at least as wide (default: same,float32)")
    ap.add_argument("--dropout", default="0,0.1", help="dropout probabilities (default: 0,0.1)")
    ap.add_argument("--bias", choices=("on", "off", "both"), default="on")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic tensors and the dropout masks")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (e.g. one that calls rslora_kernels.register_backend); repeatable")
    ap.add_argument("--all-tensors", action="store_true", help="one row per tensor, not per check")
    return ap


def _row(cols: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()


_HEAD = ("op", "backend", "x/adapters", "M", "N", "K", "r", "p", "bias", "tensor", "error", "bound", "err/bound",
         "")


def _cells(backend: str, case: CheckResult, t) -> List[str]:
    c = case.case
    ad = _short(c.dtype) + ("/" + _short(c.adapter_dtype) if c.adapter_dtype else "")
    head = [c.op, backend, ad, str(c.M), str(c.N), str(c.K), str(c.r), f"{c.dropout_p:g}", "yes" if c.bias else "no"]
    if t is None:
        return head + ["-", "-", "-", "-", f"FAIL: {case.error}" if case.error else "ok"]
    if t.problem is not None:
        return head + [t.name, "-", "-", "-", f"FAIL: {t.problem}"]
    return head + [t.name, f"{t.err:.3e}", f"{t.bound:.3e}", f"{t.ratio:.2f}", "ok" if t.ok else "FAIL"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        for module in args.imports:
            importlib.import_module(module)
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        ops = _parse_list(args.ops, str, "--ops")
        for op in ops:
            if op not in OPS:
                raise ValueError(f"--ops: {op!r} is not one of {', '.join(OPS)}")
        from .ops.lora_linear import registered_backends
        if args.backends is None:
            backends = default_backends(device)
        else:
            backends = _parse_list(args.backends, str, "--backends")
            for name in backends:
                if name not in registered_backends():
                    raise ValueError(f"--backends: {name!r} is not registered (registered: "
                                     f"{', '.join(sorted(registered_backends()))}; --import a module that registers it)")
            if "triton" in backends and device.type == "cpu":
                _interpret_triton()
            for name in backends:
                if not registered_backends()[name].runs_on(device):
                    raise ValueError(f"--backends: {name!r} does not run on {device.type}")
        cpu = device.type == "cpu"
        shapes = _parse_list(args.shapes, _shape, "--shapes") if args.shapes else list(_CPU_SHAPES if cpu else _CUDA_SHAPES)
        ranks = _parse_list(args.ranks, int, "--ranks") if args.ranks else list(_CPU_RANKS if cpu else _CUDA_RANKS)
        dtypes = _parse_list(args.dtypes, lambda v: _DTYPES[v], "--dtypes")
        adapters = _parse_list(args.adapter_dtypes, _adapter, "--adapter-dtypes")
        dropouts = _parse_list(args.dropout, float, "--dropout")
        biases = {"on": [True], "off": [False], "both": [True, False]}[args.bias]
        todo = cases(ops, backends, shapes, ranks, dtypes, adapters, dropouts, biases, device, args.seed)
    except (ValueError, TypeError, ImportError, argparse.ArgumentTypeError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 2
    if not todo:
        print("verify: no applicable checks for these options", file=sys.stderr)
        return 2

    print(f"rslora_kernels verify on {_device_name(device)}; torch {torch.__version__}, {_triton_version()}; "
          f"backends: {', '.join(backends)}")
    widths = [6, max(9, *(len(b) for b in backends)), 17, 5, 5, 5, 4, 4, 4, 12, 9, 9, 9, 0]
    print(_row(_HEAD, widths))
    failed: List[CheckResult] = []
    start = time.perf_counter()
    for backend, case in todo:
        result = self_check(backend, case)
        if not result.ok:
            failed.append(result)
        shown = result.tensors if args.all_tensors else [result.worst]
        if not args.all_tensors and not result.ok and result.error is None:
            shown = [t for t in result.tensors if not t.ok]  # every failing tensor of a failed check
        for t in shown:
            print(_row(_cells(backend, result, t), widths))
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    if failed:
        names = sorted({r.backend for r in failed})
        print(f"FAILED: {len(failed)} of {len(todo)} checks, backends: {', '.join(names)} ({seconds:.1f} s)")
        return 1
    print(f"all {len(todo)} checks passed ({seconds:.1f} s)")
    return 0


def _interpret_triton() -> None:
    """Turn Triton's CPU interpreter on for --backends triton on the CPU: possible only before the
    kernels are imported (Triton reads the variable when a kernel is defined)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "rslora_kernels.ops.triton_kernels" in sys.modules:
        raise ValueError("--backends triton on the CPU needs TRITON_INTERPRET=1 set before the kernels are imported")
    os.environ["TRITON_INTERPRET"] = "1"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu" + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "")


def _triton_version() -> str:
    try:
        import triton
        return f"triton {triton.__version__}"
    except ImportError:
        return "no triton"


if __name__ == "__main__":
    sys.exit(main())
