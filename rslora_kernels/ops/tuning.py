"""Measured choices: tile configs and the faster backend per shape, from committed per-GPU tables.

``python -m benchmarks.tune`` times, on one GPU, every candidate tile config of each kernel family
and the whole op on both fused backends, and writes one JSON table. Tables committed here, as
``tuned/<normalized GPU name>.json``, are read lazily (the first time a CUDA launch asks; nothing
is looked up at import) and answer two questions:

* :func:`tuned_config`: which tile config a kernel family uses for a problem. Each config function
  in :mod:`rslora_kernels.ops.configs` asks here first and falls back to its rules when the answer
  is None (no table for this GPU, no entry of that family and dtype, or not on CUDA).
* :func:`table_backend`: the backend the table measured faster near this shape, or None where
  nothing was measured near it (:func:`auto_backend`: "composite" there, the table-only answer).

Table keys are (family, dtype, M bucket, N, K, rank bucket) for configs and (dtype, M bucket, N,
K, rank bucket) for backends. Buckets are powers of two (the next one at or above the size); N and
K are kept exact. "Nearest" is the smallest sum over those four numbers of |log2(entry / query)|;
ties go to the entry at or above the query in more dimensions (a larger rank tile still covers
the rank), then to the first one in the table. A config entry is used at any distance: every
config computes the same result, and a measured config near the shape is better evidence than the
rules. A backend entry is used only within a factor of two in every dimension, since the cost of a
wrong guess there is the gap between two whole implementations.

Every entry records the hash of the kernel sources it was measured on (:func:`kernel_hash`), and
only entries whose hash matches the running sources are used: a table measured on other kernels
answers nothing (configs follow the rules, ``auto`` measures on first use, the plan is "fused") until it
is re-measured. :func:`tuned_plan` answers a third question, where the rank GEMMs of the Triton
backend run (``PLANS``).

Where no table entry is near, ``backend="auto"`` measures on first use instead
(:mod:`rslora_kernels.ops.autotune`, which asks :func:`table_backend` first), and :func:`tuned_plan`
asks it for the plan it measured (:func:`set_first_use_plans`). Tile configs are never tuned at run
time: a config is a pure function of the table and the sizes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import torch

from .. import _runtime
from .._launch import clear_plans

__all__ = ["TUNED_DIR", "TABLE_ENV", "FORMAT_VERSION", "KERNEL_SOURCES", "PLANS", "ConfigRequest", "bucket",
           "dtype_name", "normalized_gpu_name", "kernel_hash", "load_table", "table_for_gpu", "reload_tables",
           "current_entries", "nearest_entries", "tuned_config", "forced_configs", "configs_forced", "rules_only",
           "auto_backend", "table_backend", "tuned_plan", "forced_plan", "set_first_use_plans"]

TUNED_DIR = Path(__file__).with_name("tuned")
TABLE_ENV = "RSLORA_KERNELS_TUNED_TABLE"  # path of a table to use instead of the committed one
FORMAT_VERSION = 1
BACKEND_CHOICES = ("triton", "composite")
# Where the Triton backend runs its rank GEMMs (T = drop(x) A^T, U = dy B, dA, dB): "fused", its
# own kernels (F1, B1, B3); "rank_mm", cuBLAS (torch.mm into preallocated outputs, drop(x) formed
# once in x's dtype). The dual GEMMs (F2, B2) keep their fused epilogues in both.
PLANS = ("fused", "rank_mm")
# The sources whose code decides what a measurement measured (relative to the package): the
# kernels and their launchers, the tile rules, the composite backend, the dropout stream's kernels,
# and DoRA's, the group's and the 4-bit dequantization's kernels (auto measures those ops on first use)
KERNEL_SOURCES = ("ops/triton_kernels.py", "ops/configs.py", "ops/composite.py", "dropout/kernels.py",
                  "ops/dora_kernels.py", "ops/group_kernels.py", "ops/dequant_kernel.py")


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
def bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    b = 1
    while b < n:
        b *= 2
    return b


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float16", "float32": the dtype's name in tables."""
    return str(dtype).replace("torch.", "")


def normalized_gpu_name(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=1)
def kernel_hash() -> str:
    """16 hex digits of the SHA-256 of ``KERNEL_SOURCES`` (line endings normalized): what a table
    entry records, and must match, to be used. Any edit of those files, comments included, makes
    the tables measured before it stale."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in KERNEL_SOURCES:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def load_table(path) -> Optional[dict]:
    """The table at ``path``; None for a dry-run table (made on the CPU interpreter, timings
    meaningless). A file that is not a table of this format raises ValueError naming it."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tuning table {path}: cannot be read as JSON ({e})") from e
    if not isinstance(table, dict):
        raise ValueError(f"tuning table {path}: expected a JSON object, got {type(table).__name__}")
    if table.get("dry_run", False):
        return None
    if table.get("format") != FORMAT_VERSION:
        raise ValueError(f"tuning table {path}: format {table.get('format')!r}, expected {FORMAT_VERSION} "
                         "(re-run python -m benchmarks.tune)")
    missing = [k for k in ("gpu", "arch", "configs", "backends") if k not in table]
    if missing:
        raise ValueError(f"tuning table {path}: missing {missing}")
    return table


_tables: Dict[str, Optional[dict]] = {}


def table_for_gpu(name: str) -> Optional[dict]:
    """The table for the GPU called ``name`` (cached): the file named by $RSLORA_KERNELS_TUNED_TABLE
    if set and made on a GPU of that name, else the committed ``tuned/<normalized name>.json``;
    None if there is none (or it is a dry-run table)."""
    key = normalized_gpu_name(name)
    if key not in _tables:
        _tables[key] = _find_table(key)
    return _tables[key]


def _find_table(key: str) -> Optional[dict]:
    override = os.environ.get(TABLE_ENV)
    if override:
        table = load_table(override)
        if table is not None and normalized_gpu_name(table["gpu"]) == key:
            return table
        warnings.warn(f"${TABLE_ENV}={override} is not a table measured on this GPU ({key}); ignoring it")
    path = TUNED_DIR / f"{key}.json"
    return load_table(path) if path.exists() else None


def reload_tables() -> None:
    """Forget every loaded table and looked-up entry (after writing or replacing a table)."""
    _tables.clear()
    _lookup_config.cache_clear()
    _lookup_plan.cache_clear()
    clear_plans()  # launch plans hold configs and backend choices read from the tables


# ----------------------------------------------------------------------------------------------
# Nearest entry
# ----------------------------------------------------------------------------------------------
def _log2(n: int) -> float:
    return math.log2(max(n, 1))


def current_entries(entries: List[dict]) -> List[dict]:
    """The entries measured on the running kernel sources (their ``kernels`` is :func:`kernel_hash`)."""
    h = kernel_hash()
    return [e for e in entries if e.get("kernels") == h]


def nearest_entries(entries: List[dict], M: int, N: int, K: int, r: int, within: Optional[float] = None) -> List[dict]:
    """The entries (already filtered to one family and dtype) nearest to (M, N, K, r), all of
    those tied for nearest, in table order. ``within``: ignore entries more than that many
    powers of two away in any one dimension."""
    query = (_log2(bucket(M)), _log2(N), _log2(K), _log2(bucket(r)))
    scored = []
    for e in entries:
        gaps = [key - q for key, q in zip((_log2(e["M"]), _log2(e["N"]), _log2(e["K"]), _log2(e["r"])), query)]
        if within is not None and max(abs(g) for g in gaps) > within:
            continue
        below = sum(g < 0 for g in gaps)  # ties prefer entries at or above the query
        scored.append((round(sum(abs(g) for g in gaps), 9), below, e))
    best = min(((distance, below) for distance, below, _ in scored), default=None)
    return [e for distance, below, e in scored if (distance, below) == best]


# ----------------------------------------------------------------------------------------------
# Tile configs
# ----------------------------------------------------------------------------------------------
class ConfigRequest(NamedTuple):
    """One question a config function asks: its family and the sizes it was called with. For the
    shrink family N is 0 (its output is [M, r]; K is the reduction: K for F1, N for B1)."""
    family: str
    dtype: str
    M: int
    N: int
    K: int
    r: int
    arch: int


_forced: Optional[Callable[[ConfigRequest], Optional[dict]]] = None


@contextmanager
def forced_configs(choose: Callable[[ConfigRequest], Optional[dict]]) -> Iterator[None]:
    """Within the block, every config function returns ``TileConfig(**choose(request))``, or
    follows its rules where ``choose`` returns None; no table is read. The tuner forces candidate
    configs (and records the requests) this way."""
    global _forced
    previous, _forced = _forced, choose
    try:
        yield
    finally:
        _forced = previous


def configs_forced() -> bool:
    """Whether a :func:`forced_configs` block is active (launch plans are not cached then)."""
    return _forced is not None


def rules_only():
    """Within the block, every config comes from the rules in configs.py (no table)."""
    return forced_configs(lambda request: None)


def tuned_config(family: str, M: int, N: int, K: int, r: int, dtype: torch.dtype, arch: int) -> Optional[dict]:
    """TileConfig fields for this launch from the table of the current GPU (nearest entry of this
    family and dtype), or None: use the rules. Called first thing by every config function."""
    if _forced is not None:
        return _forced(ConfigRequest(family, dtype_name(dtype), M, N, K, r, arch))
    if arch == 0:  # CPU / interpreter
        return None
    name = _runtime.gpu_name()
    if name is None:  # e.g. the static report compiling for sm_90 on a machine without CUDA
        return None
    config = _lookup_config(name, arch, family, dtype_name(dtype), bucket(M), N, K, bucket(r))
    return dict(config) if config is not None else None


@lru_cache(maxsize=4096)
def _lookup_config(gpu: str, arch: int, family: str, dtype: str, M: int, N: int, K: int, r: int) -> Optional[dict]:
    table = table_for_gpu(gpu)
    if table is None or table["arch"] != arch:
        return None
    entries = [e for e in current_entries(table["configs"]) if e["family"] == family and e["dtype"] == dtype]
    nearest = nearest_entries(entries, M, N, K, r)
    return nearest[0]["config"] if nearest else None


# ----------------------------------------------------------------------------------------------
# backend="auto" on CUDA
# ----------------------------------------------------------------------------------------------
def auto_backend(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> str:
    """"triton" where this GPU's table measured the Triton backend faster than the composite one
    near (M, N, K, r) in ``dtype`` (every nearest entry within a factor of two agreeing);
    "composite" otherwise, including where nothing was measured."""
    return _measured_backend(device, dtype, bucket(M), N, K, bucket(r))


def table_backend(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> Optional[str]:
    """What this GPU's table answers near (M, N, K, r) in ``dtype``: "triton" (every nearest entry
    within a factor of two measured it faster), "composite" (some did not), or None: no current
    entry is that near (then ``auto`` measures on first use: :mod:`rslora_kernels.ops.autotune`)."""
    return _table_backend(device, dtype, bucket(M), N, K, bucket(r))


def _table_backend(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> Optional[str]:
    name = _runtime.gpu_name(device)
    table = table_for_gpu(name) if name is not None else None
    if table is None:
        return None
    entries = [e for e in current_entries(table["backends"]) if e["dtype"] == dtype_name(dtype)]
    nearest = nearest_entries(entries, M, N, K, r, within=1.0)
    if not nearest:
        return None
    return "triton" if all(e["backend"] == "triton" for e in nearest) else "composite"


def _measured_backend(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> str:
    return _table_backend(device, dtype, M, N, K, r) or "composite"


# Under torch.compile the lookup runs at trace time and its answer is a constant of the graph (its
# file I/O cannot be traced; the buckets of M it depends on are guarded in auto_backend). This line
# is what torch.compiler.assume_constant_result(_measured_backend) does (torch 2.6 to 2.13), done
# by hand because that call imports torch._dynamo, and with it Triton, at package import.
# tests/test_tuning.py checks that the public decorator still sets this attribute.
_measured_backend._dynamo_marked_constant = True
_table_backend._dynamo_marked_constant = True


# ----------------------------------------------------------------------------------------------
# The Triton backend's plan: where the rank GEMMs run
# ----------------------------------------------------------------------------------------------
_forced_plan: Optional[str] = None


@contextmanager
def forced_plan(plan: str) -> Iterator[None]:
    """Within the block, :func:`tuned_plan` answers ``plan`` (one of ``PLANS``) everywhere, CPU
    included; the tuner times both plans and the tests run the cuBLAS plan this way."""
    global _forced_plan
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    previous, _forced_plan = _forced_plan, plan
    try:
        yield
    finally:
        _forced_plan = previous


def plan_forced() -> bool:
    """Whether a :func:`forced_plan` block is active (op-level launch plans are not cached then)."""
    return _forced_plan is not None


def tuned_plan(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> str:
    """The plan of the Triton backend for this call: the one this GPU's table measured faster near
    (M, N, K, r) in ``dtype`` (entries of the running kernels, within a factor of two in every
    dimension, every nearest one agreeing); where the table has no entry that near, the plan ``auto``
    measured faster on first use for this key (:mod:`rslora_kernels.ops.autotune`); "fused" otherwise."""
    if _forced_plan is not None:
        return _forced_plan
    key = (dtype_name(dtype), bucket(M), N, K, bucket(r))
    if device.type == "cuda":
        name = _runtime.gpu_name(device)
        plan = _lookup_plan(name, *key) if name is not None else None
        if plan is not None:
            return plan
    if _first_use_plan is not None:
        plan = _first_use_plan(device, *key)
        if plan is not None:
            return plan
    return "fused"


# (device, dtype name, M bucket, N, K, rank bucket) -> the plan measured on first use, or None.
# rslora_kernels.ops.autotune installs it (it imports this module, so this one cannot import it).
_first_use_plan: Optional[Callable[..., Optional[str]]] = None


def set_first_use_plans(lookup: Optional[Callable[..., Optional[str]]]) -> None:
    """Install the lookup :func:`tuned_plan` asks where the table has no entry (see ``_first_use_plan``)."""
    global _first_use_plan
    _first_use_plan = lookup


@lru_cache(maxsize=4096)
def _lookup_plan(gpu: str, dtype: str, M: int, N: int, K: int, r: int) -> Optional[str]:
    """The table's plan near the key; None where it has no current entry within a factor of two."""
    table = table_for_gpu(gpu)
    if table is None:
        return None
    entries = [e for e in current_entries(table.get("plans", [])) if e["dtype"] == dtype]
    nearest = nearest_entries(entries, M, N, K, r, within=1.0)
    if not nearest:
        return None
    plans = {e["plan"] for e in nearest}
    return plans.pop() if len(plans) == 1 and plans <= set(PLANS) else "fused"
