"""What the sweeps share: the adapters' alpha, the median time of a call, rotating inputs, the
run's environment record, byte sizes for tables.

Lives below :mod:`benchmarks.sweep` and the benchmarks it dispatches to (``--group``:
:mod:`benchmarks.group_sweep`), so those import it rather than each other.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["ALPHA", "median_ms", "Rotating", "environment", "fmt_bytes"]

ALPHA = 16.0  # the adapters' alpha in the sweeps: scaling = alpha / sqrt(r) (rsLoRA)


def median_ms(fn, device: torch.device, min_time: float) -> float:
    """Median milliseconds of ``fn()`` after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=max(10, int(min_time * 250)), rep=max(40, int(min_time * 1000)),
                              return_mode="median"))
    from torch.utils.benchmark import Timer
    for _ in range(2):
        fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return m.median * 1e3


class Rotating:
    """Cycles through several input buffers so no call finds its inputs already in cache."""

    def __init__(self, make, count: int):
        self.items = [make() for _ in range(count)]
        self.i = -1

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def environment(device: torch.device) -> dict:
    import triton
    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": device.type, "threads": torch.get_num_threads()}
    here = Path(__file__).resolve().parent
    if os.environ.get("COMMIT"):  # named by the caller (gpu_run.sh): a lease's .git may be stale
        env["commit"] = os.environ["COMMIT"]
    else:
        try:
            git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=here).stdout.strip()  # noqa: E731
            env["commit"] = (git("rev-parse", "--short", "HEAD") or "unknown") + \
                ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
        except OSError:
            env["commit"] = "unknown"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
        env["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]  # other processes skew CPU timings
    return env


def fmt_bytes(b) -> str:
    """Bytes for a table: B, KiB, MiB or GiB; '-' for None."""
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
