"""``backend="auto"`` where no committed table answers: measured on first use, self-checked, remembered per GPU.

The rule (docs/tuning.md, "Which backend runs where, and why") is decided here and in
:func:`rslora_kernels.ops.lora_linear.choose_auto_backend`, which asks :func:`choose`:

1. A current committed table entry near the call's shape answers first (:func:`tuning.table_backend`).
2. Else a decision already taken for the call's *signature* on this machine -- in this process, or
   in the per-user cache file -- answers.
3. Else, where measuring is safe, the first call of the signature measures: every eligible candidate
   (a registered fused backend that runs on the device in the call's dtypes; ``triton`` once per plan
   of ``tuning.PLANS`` where the op runs the LoRA kernels) is self-checked against the float64 oracle
   (:func:`rslora_kernels.selfcheck.self_check`) and timed forward+backward on tensors this module
   makes (never the user's), and the fastest that passed is chosen and written to the cache file.
4. Else None: the caller's fallback (composite).

A signature is (op, device type, x dtype, adapter dtype, M bucket, N, K, rank bucket, dropout on/off,
bias on/off), buckets being the next power of two, so ragged batches share one decision per bucket.
A candidate that fails its self-check is never chosen again on this GPU (the cache file records it)
and one warning names the GPU, the versions, the shape and the worst error.

The cache file is keyed by GPU name, kernel-source hash (:func:`tuning.kernel_hash`), torch and
Triton versions (one file per key, under ``$RSLORA_KERNELS_CACHE_DIR``, else
``$XDG_CACHE_HOME/rslora_kernels``, else ``~/.cache/rslora_kernels``); it is written atomically
(a temporary file, then ``os.replace``) under a file lock, and a process re-reads it under the lock
before measuring, so ranks of one node starting together measure each signature once.

Never measured: while torch.compile traces (the recorded decision is then a trace-time constant),
under a fake-tensor mode, during CUDA-graph capture, in a backward pass, on devices other than CUDA
(the CPU only when tests switch it on: :func:`_testing`), or with ``RSLORA_KERNELS_AUTOTUNE=0``,
which turns this module off altogether (table-only ``auto``).

The measuring itself is device-generic: an op registers a :class:`Measurer` (its candidates, a
forward+backward step on synthetic tensors, a self-check), and a timer turns a step into ms
(:func:`cuda_timer` on CUDA; tests inject one). This module imports no op (they import it):
:mod:`rslora_kernels.ops.autotune_steps` registers the measurers of the package's four ops.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _runtime
from .._launch import clear_plans
from . import tuning

__all__ = ["AUTOTUNE_ENV", "CACHE_DIR_ENV", "BUDGET_ENV", "MAX_SIGNATURES", "Problem", "Signature", "Candidate",
           "Decision", "CheckOutcome", "Measurer", "register_measurer", "choose", "signature", "enabled",
           "cache_dir", "cache_path", "decisions", "autotune_report", "clear", "cuda_timer"]

AUTOTUNE_ENV = "RSLORA_KERNELS_AUTOTUNE"        # "0": no first-use measuring (the table, else composite)
CACHE_DIR_ENV = "RSLORA_KERNELS_CACHE_DIR"      # where the decisions file lives
BUDGET_ENV = "RSLORA_KERNELS_AUTOTUNE_BUDGET"   # seconds of timing per signature (warm-up and checks not counted)
DEFAULT_BUDGET_S = 2.0
# Signatures measured per process: a workload whose shapes wander (new N, K or rank every call) stops
# paying first-use costs after this many; later new signatures run the fallback.
MAX_SIGNATURES = 64
LOCK_TIMEOUT_S = 900.0  # how long a process waits for another one measuring; then it runs the fallback
FORMAT = 1
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# What is asked, and the key it is remembered under
# ----------------------------------------------------------------------------------------------
class Problem(NamedTuple):
    """What ``auto`` is asked about: the call's (M, N, K, r) -- for a group, N is the members'
    total width and r the largest rank --, the op ("lora", "dora", "qlora", "group"), the dropout
    probability and whether there is a bias. A plain (M, N, K, r) tuple means a LoRA op without
    dropout or bias."""
    M: int
    N: int
    K: int
    r: int
    op: str = "lora"
    dropout_p: float = 0.0
    bias: bool = False


class Signature(NamedTuple):
    """The key a decision is remembered under (see the module docstring)."""
    op: str
    device: str
    dtype: str
    adapter_dtype: str
    M: int
    N: int
    K: int
    r: int
    dropout: bool
    bias: bool

    def key(self) -> str:
        return (f"{self.op}|{self.device}|{self.dtype}|{self.adapter_dtype}|M{self.M}|N{self.N}|K{self.K}|r{self.r}"
                f"|p{int(self.dropout)}|b{int(self.bias)}")

    @classmethod
    def from_key(cls, key: str) -> "Signature":
        op, device, dtype, adapter, M, N, K, r, p, b = key.split("|")
        return cls(op, device, dtype, adapter, int(M[1:]), int(N[1:]), int(K[1:]), int(r[1:]), p == "p1", b == "b1")

    def describe(self) -> str:
        ad = "" if self.adapter_dtype == self.dtype else f"/{self.adapter_dtype} adapters"
        return (f"{self.op} {self.dtype}{ad} M<={self.M} N={self.N} K={self.K} r<={self.r} "
                f"{'dropout' if self.dropout else 'no dropout'}, {'bias' if self.bias else 'no bias'}")


def signature(device: torch.device, dtype: torch.dtype, adapter_dtype: Optional[torch.dtype],
              problem: Sequence) -> Signature:
    """The :class:`Signature` of a call (``problem``: a :class:`Problem` or (M, N, K, r))."""
    M, N, K, r = problem[0], problem[1], problem[2], problem[3]
    op = problem[4] if len(problem) > 4 else "lora"
    p = problem[5] if len(problem) > 5 else 0.0
    bias = problem[6] if len(problem) > 6 else False
    return Signature(op, device.type, tuning.dtype_name(dtype), tuning.dtype_name(adapter_dtype or dtype),
                     tuning.bucket(M), N, K, tuning.bucket(r), p > 0.0, bool(bias))


class Candidate(NamedTuple):
    """A path ``auto`` may choose: a registered backend, and for "triton" the plan it runs under."""
    backend: str
    plan: Optional[str] = None

    @property
    def label(self) -> str:
        return self.backend if self.plan is None else f"{self.backend}:{self.plan}"

    @classmethod
    def from_label(cls, label: str) -> "Candidate":
        backend, _, plan = label.partition(":")
        return cls(backend, plan or None)


@dataclass
class Decision:
    """What ``auto`` runs for one signature on one machine, and why.

    ``source``: "measured" (here, now), "cache" (read from the cache file), "table" (a committed
    table answered), "fallback" (not measured, e.g. while tracing: the caller's default, measured
    later where safe), "failed" (measuring itself failed: the caller's default in this process).
    ``ms``: each timed candidate's median forward+backward ms; ``failed``: candidate -> why it was
    not timed (its self-check's worst error, an exception, an earlier failure on this GPU)."""
    signature: Signature
    choice: Optional[str]
    source: str
    why: str
    ms: Dict[str, float] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    problem: Optional[Tuple] = None

    @property
    def backend(self) -> Optional[str]:
        return Candidate.from_label(self.choice).backend if self.choice else None

    @property
    def plan(self) -> Optional[str]:
        return Candidate.from_label(self.choice).plan if self.choice else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["signature"] = self.signature.key()
        d["problem"] = list(self.problem) if self.problem is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "cache") -> "Decision":
        return cls(Signature.from_key(d["signature"]), d["choice"], source, d["why"], dict(d.get("ms", {})),
                   dict(d.get("failed", {})), float(d.get("seconds", 0.0)),
                   tuple(d["problem"]) if d.get("problem") is not None else None)


# ----------------------------------------------------------------------------------------------
# What an op provides: its candidates, a step to time, a self-check
# ----------------------------------------------------------------------------------------------
class CheckOutcome(NamedTuple):
    """A self-check's verdict: ``ok``; ``what``: the worst result against its bound, or the error."""
    ok: bool
    what: str


@dataclass(frozen=True)
class Measurer:
    """How one op is measured. ``candidates(device, sig)`` lists the eligible :class:`Candidate`\\ s;
    ``step(candidate, problem, sig, device)`` returns a callable running one forward+backward on
    synthetic tensors it made; ``check(candidate, problem, sig, device)`` returns a
    :class:`CheckOutcome` against the float64 oracle. The engine runs both under the candidate's
    plan (``_trial_plan``)."""
    candidates: Callable[[torch.device, Signature], List[Candidate]]
    step: Callable[[Candidate, Problem, Signature, torch.device], Callable[[], object]]
    check: Callable[[Candidate, Problem, Signature, torch.device], CheckOutcome]


_MEASURERS: Dict[str, Measurer] = {}


def register_measurer(op: str, measurer: Measurer) -> None:
    """Make ``auto`` of ``op`` measurable on first use (:mod:`rslora_kernels.ops.autotune_steps`)."""
    _MEASURERS[op] = measurer


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def cuda_timer(candidate: Candidate, step: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median ms of ``step()`` on ``device`` by CUDA events, host work included (what an eager loop
    sees); as many repetitions (3 to 100) as ``budget_s`` allows after one sizing call. The caller
    has already warmed the step up (compiles absorbed)."""
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        end.synchronize()
        first = max(start.elapsed_time(end), 1e-3)
        reps = int(min(100, max(3, budget_s * 1e3 / first)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


@dataclass
class _Settings:
    """Private switches for the tests: measure on the CPU, with an injected timer."""
    cpu: bool = False
    timer: Optional[Callable[[Candidate, Callable[[], object], torch.device, float], float]] = None
    warmup: int = 2


_settings = _Settings()


@contextlib.contextmanager
def _testing(cpu: bool = True, timer=None, warmup: int = 2) -> Iterator[None]:
    """Within the block, measure on the CPU too (tests: registered fake backends, the Triton
    interpreter) with ``timer`` (default: wall clock around one call)."""
    global _settings
    previous, _settings = _settings, _Settings(cpu, timer, warmup)
    clear_plans()  # resolved backends are plans
    try:
        yield
    finally:
        _settings = previous
        clear_plans()


def _wall_timer(candidate, step, device, budget_s) -> float:
    t0 = time.perf_counter()
    step()
    return 1e3 * (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Where measuring is allowed
# ----------------------------------------------------------------------------------------------
def enabled() -> bool:
    """False when ``RSLORA_KERNELS_AUTOTUNE`` is "0", "false", "off" or "no": table-only ``auto``."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _fake_mode_active() -> bool:
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except AttributeError:  # a torch without the key: no fake mode to detect here
        return False


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _unsafe(device: torch.device) -> Optional[str]:
    """Why measuring now would be unsafe or meaningless, or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if _fake_mode_active():
        return "fake tensors"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    if _in_backward():
        return "in a backward pass"
    return None


def _applies(device: torch.device) -> bool:
    """Whether first-use decisions exist for ``device`` at all: CUDA unless switched off by
    ``RSLORA_KERNELS_AUTOTUNE``; the CPU only inside the tests' :func:`_testing`."""
    return enabled() and (device.type == "cuda" or (device.type == "cpu" and _settings.cpu))


def _measurable(device: torch.device, op: str) -> bool:
    if op not in _MEASURERS:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _settings.cpu


# ----------------------------------------------------------------------------------------------
# The machine and its cache file
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _machine(device: torch.device) -> Tuple[str, str, str, str]:
    """(device name, kernel hash, torch version, Triton version): what a decision is valid for."""
    name = _runtime.gpu_name(device) if device.type == "cuda" else device.type
    return (name or device.type, tuning.kernel_hash(), torch.__version__, _version("triton"))


# the machine key of each device (asked at every decision; the version look-ups read package metadata)
_MACHINES: Dict[torch.device, Tuple[str, str, str, str]] = {}


def cache_dir() -> Path:
    """``$RSLORA_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/rslora_kernels``, else ``~/.cache/rslora_kernels``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rslora_kernels"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-")


def cache_path(device: torch.device) -> Path:
    """The decisions file of ``device``'s machine key (see :func:`_machine`)."""
    name, kernels, torch_v, triton_v = _machine(device)
    stem = f"autotune-{_slug(name)}-kernels-{kernels}-torch-{_slug(torch_v)}-triton-{_slug(triton_v)}"
    return cache_dir() / f"{stem}.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on ``path`` + ".lock" across processes (yields False if it could not be
    taken in ``LOCK_TIMEOUT_S``). ``filelock`` is a dependency of torch; fcntl where it is missing."""
    lock_path = str(path) + ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import filelock
    except ImportError:
        filelock = None
    if filelock is not None:
        lock = filelock.FileLock(lock_path, timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except filelock.Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
        return
    import fcntl

    with open(lock_path, "a") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read_file(path: Path) -> dict:
    """The cache file's content ({} when absent; a file that cannot be read is treated as empty,
    with one warning: it is rewritten at the next decision)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} autotune cache")
        return data
    except (FileNotFoundError, NotADirectoryError):  # nothing cached (yet)
        return {}
    except (OSError, ValueError) as e:
        _warn_once(("read", str(path)), f"rslora_kernels: ignoring the autotune cache {path} ({e})")
        return {}


def _write_file(path: Path, data: dict) -> None:
    """``data`` to ``path`` atomically: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# The store: decisions of this process, per machine key
# ----------------------------------------------------------------------------------------------
class _Store:
    """One machine key's decisions in this process, the cache file's content mirrored lazily."""

    def __init__(self, machine: Tuple[str, str, str, str], path: Path):
        self.machine, self.path = machine, path
        self.decisions: Dict[Signature, Decision] = {}
        self.failed: Dict[str, dict] = {}    # "op/label" -> {"what", "signature"}: never chosen on this GPU
        self.plans: Dict[str, str] = {}      # plan key -> the triton plan measured faster first
        self.loaded = False
        self.measured = 0

    def header(self) -> dict:
        name, kernels, torch_v, triton_v = self.machine
        return {"format": FORMAT, "gpu": name, "kernels": kernels, "torch": torch_v, "triton": triton_v}

    def merge(self, data: dict) -> None:
        """Take what the file holds that this process does not know yet (an entry that cannot be
        read is skipped, with one warning: it is measured again)."""
        try:
            for key, d in data.get("decisions", {}).items():
                sig = Signature.from_key(key)
                if sig not in self.decisions or self.decisions[sig].source in ("fallback", "table"):
                    self.decisions[sig] = Decision.from_json(d)
            for k, v in data.get("failed", {}).items():
                self.failed.setdefault(k, dict(v))
            for k, v in data.get("plans", {}).items():
                if v in tuning.PLANS:
                    self.plans.setdefault(k, v)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            _warn_once(("merge", str(self.path)), f"rslora_kernels: skipping unreadable entries of the autotune "
                       f"cache {self.path} ({type(e).__name__}: {e})")

    def load(self) -> None:
        if not self.loaded:
            self.merge(_read_file(self.path))
            self.loaded = True

    def content(self) -> dict:
        return {**self.header(), "decisions": {s.key(): d.to_json() for s, d in self.decisions.items()
                                               if d.source in ("measured", "cache")},
                "failed": dict(self.failed), "plans": dict(self.plans)}


_STORES: Dict[Tuple[str, str, str, str], _Store] = {}
_LOCK = threading.RLock()  # one measurement at a time in a process


def _store(device: torch.device) -> _Store:
    machine = _MACHINES.get(device)
    if machine is None:
        machine = _MACHINES[device] = _machine(device)
    store = _STORES.get(machine)
    if store is None:
        store = _STORES[machine] = _Store(machine, cache_path(device))
    return store


def clear() -> None:
    """Forget this process's decisions (the cache file stays): the next call of each signature reads
    the file again, and measures what it does not hold."""
    _STORES.clear()
    _MACHINES.clear()
    _warned.clear()
    clear_plans()


def _plan_key(sig: Signature) -> str:
    return f"{sig.dtype}|M{sig.M}|N{sig.N}|K{sig.K}|r{sig.r}"


def _first_use_plan(device: torch.device, dtype: str, M: int, N: int, K: int, r: int) -> Optional[str]:
    """:func:`tuning.tuned_plan`'s question where no table answers: the plan measured first on this
    machine for this key (asked once per launch-plan signature, so reading the file here is cheap);
    while a candidate is measured, its plan."""
    if _trial_plan is not None:
        return _trial_plan
    if not _applies(device):
        return None
    with _LOCK:
        store = _store(device)
        store.load()
        return store.plans.get(f"{dtype}|M{M}|N{N}|K{K}|r{r}")


# The plan of the candidate being measured: tuned_plan answers it, so the Triton backend's launch plans
# are built once per candidate and cached as in real use (tuning.forced_plan would rebuild them every
# call: host time that is not the candidate's)
_trial_plan: Optional[str] = None
tuning.set_first_use_plans(_first_use_plan)


# ----------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------
def choose(device: torch.device, dtype: Optional[torch.dtype], adapter_dtype: Optional[torch.dtype],
           problem: Optional[Sequence]) -> Optional[str]:
    """The backend ``auto`` runs for this call by the rule of the module docstring, or None (no
    table entry, no decision, and none may be measured now): the caller's fallback."""
    if problem is None or dtype is None or dtype not in KERNEL_DTYPES or (
            adapter_dtype is not None and adapter_dtype not in KERNEL_DTYPES):
        return None
    sig = signature(device, dtype, adapter_dtype, problem)
    if torch.compiler.is_compiling():  # a trace-time constant: the table or what was recorded, never a measurement
        return _recorded_choice(device, dtype, *sig)
    return _choose(device, dtype, sig, tuple(problem))


def _table(device: torch.device, dtype: torch.dtype, sig: Signature) -> Optional[str]:
    if device.type != "cuda":
        return None
    return tuning._table_backend(device, dtype, sig.M, sig.N, sig.K, sig.r)


def _recorded_choice(device, dtype, *fields) -> Optional[str]:
    sig = Signature(*fields)
    answer = _table(device, dtype, sig)
    if answer is not None or not _applies(device):
        return answer
    with _LOCK:
        store = _store(device)
        store.load()
        d = store.decisions.get(sig)
    return d.backend if d is not None and d.source in ("measured", "cache") else None


# Under torch.compile dynamo calls this at trace time and bakes its answer into the graph (as
# tuning._measured_backend; see there why the marking is done by hand)
_recorded_choice._dynamo_marked_constant = True


def _choose(device: torch.device, dtype: torch.dtype, sig: Signature, problem: tuple) -> Optional[str]:
    answer = _table(device, dtype, sig)
    if answer is not None or not _applies(device):
        if answer is not None and enabled():  # shown by autotune_report
            with _LOCK:
                _store(device).decisions.setdefault(sig, Decision(sig, answer, "table", "a committed table answers"))
        return answer
    with _LOCK:
        store = _store(device)
        store.load()
        d = store.decisions.get(sig)
        if d is not None and d.source in ("measured", "cache", "failed"):  # (table, fallback: for the report)
            return d.backend  # None: nothing passed there, or measuring failed: the fallback runs
        if not _measurable(device, sig.op) or problem[0] == 0:
            return None
        why_not = _unsafe(device)
        if why_not is not None:
            store.decisions[sig] = Decision(sig, None, "fallback", f"not measured: {why_not}")
            return None
        if store.measured >= MAX_SIGNATURES:
            store.decisions.setdefault(sig, Decision(sig, None, "fallback",
                                                     f"{MAX_SIGNATURES} signatures measured in this process already"))
            return None
        try:
            d = _measure_locked(store, sig, problem, device)
        except Exception as e:  # noqa: BLE001  (measuring must never break the user's step: the fallback runs)
            _warn_once(("measure", sig), f"rslora_kernels: measuring backend='auto' at {sig.describe()} failed "
                       f"({type(e).__name__}: {e}); it runs composite there in this process")
            store.decisions[sig] = Decision(sig, None, "failed", f"measuring failed: {type(e).__name__}: {e}")
            return None
    return d.backend if d is not None else None


def _measure_locked(store: _Store, sig: Signature, problem: tuple, device: torch.device) -> Optional[Decision]:
    """Measure ``sig`` under the cache file's lock, unless another process did while this one waited."""
    with contextlib.ExitStack() as stack:
        try:
            locked = stack.enter_context(_file_lock(store.path))
        except OSError as e:  # an unwritable cache directory: decisions last for this process only
            _warn_unwritable(store, e)
            locked = None
        if locked is False:
            _warn_once(("lock", str(store.path)), f"rslora_kernels: could not lock {store.path} in "
                       f"{LOCK_TIMEOUT_S:.0f} s; 'auto' runs composite where nothing was measured")
            return None
        if locked:
            store.merge(_read_file(store.path))
            d = store.decisions.get(sig)
            if d is not None and d.source in ("measured", "cache"):
                return d
        d = _measure(store, sig, Problem(*problem), device)
        store.measured += 1
        store.decisions[sig] = d
        if locked:
            try:
                _write_file(store.path, store.content())
            except OSError as e:
                _warn_unwritable(store, e)
    clear_plans()  # launch plans cached before this decision may hold another plan or backend
    return d


def _warn_unwritable(store: _Store, e: OSError) -> None:
    _warn_once(("write", str(store.path)), f"rslora_kernels: cannot use the autotune cache {store.path} ({e}); "
               f"decisions last for this process only (set ${CACHE_DIR_ENV} to a writable directory)")


def _versions(store: _Store) -> str:
    name, kernels, torch_v, triton_v = store.machine
    return f"{name}, torch {torch_v}, Triton {triton_v}, kernels {kernels}"


def _measure(store: _Store, sig: Signature, problem: Problem, device: torch.device) -> Decision:
    """Self-check and time every eligible candidate of ``sig``; the fastest that passed wins."""
    measurer = _MEASURERS[sig.op]
    timer = _settings.timer or (cuda_timer if device.type == "cuda" else _wall_timer)
    budget = _budget()
    started = time.perf_counter()
    ms: Dict[str, float] = {}
    failed: Dict[str, str] = {}
    candidates = measurer.candidates(device, sig)
    plan = store.plans.get(_plan_key(sig))
    for c in candidates:
        if c.plan is not None and plan is not None and c.plan != plan:
            failed[c.label] = f"plan {plan} was measured faster first at this (dtype, M, N, K, r)"
    candidates = [c for c in candidates if c.label not in failed]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad(), \
            _no_autocast(device):
        try:
            for c in candidates:
                _measure_one(store, measurer, c, sig, problem, device, timer, budget / max(len(candidates), 1),
                             ms, failed)
        finally:
            _try_plan(None)
    seconds = time.perf_counter() - started
    if not ms:
        return Decision(sig, None, "measured", "no candidate passed its self-check and ran", ms, failed, seconds,
                        tuple(problem))
    best = min(ms, key=ms.get)
    triton_plans = {label: t for label, t in ms.items() if Candidate.from_label(label).plan is not None}
    if triton_plans and _plan_key(sig) not in store.plans:
        store.plans[_plan_key(sig)] = Candidate.from_label(min(triton_plans, key=triton_plans.get)).plan
    return Decision(sig, best, "measured", f"fastest of {len(ms)} that passed the self-check", ms, failed, seconds,
                    tuple(problem))


def _measure_one(store: _Store, measurer: Measurer, c: Candidate, sig: Signature, problem: Problem,
                 device: torch.device, timer, budget_s: float, ms: Dict[str, float], failed: Dict[str, str]) -> None:
    """Self-check ``c``, then time it: its ms goes to ``ms``, or why it was not timed to ``failed``."""
    earlier = store.failed.get(f"{sig.op}/{c.label}")
    if earlier is not None:
        failed[c.label] = f"failed its self-check on this GPU before ({earlier['what']})"
        return
    _try_plan(c.plan)
    try:
        outcome = measurer.check(c, problem, sig, device)
    except torch.cuda.OutOfMemoryError as e:  # not the kernel's fault: skipped here, not banned
        failed[c.label] = f"out of memory in its self-check ({str(e).splitlines()[0]})"
        return
    except Exception as e:  # noqa: BLE001  (a candidate that raises is a failed candidate)
        outcome = CheckOutcome(False, f"raised {type(e).__name__}: {e}")
    if not outcome.ok:
        failed[c.label] = f"failed its self-check: {outcome.what}"
        store.failed[f"{sig.op}/{c.label}"] = {"what": outcome.what, "signature": sig.key()}
        _warn_once(("check", store.machine, sig.op, c.label),
                   f"rslora_kernels: backend {c.label!r} failed its self-check against the float64 reference on "
                   f"{_versions(store)}, at {sig.describe()} (M={problem.M}): {outcome.what}. "
                   f"backend='auto' will not choose it for the {sig.op} op on this GPU.")
        return
    try:
        step = measurer.step(c, problem, sig, device)
        for _ in range(_settings.warmup):  # absorbs compiles and first-call launch-plan building
            step()
        ms[c.label] = float(timer(c, step, device, budget_s))
    except torch.cuda.OutOfMemoryError as e:
        failed[c.label] = f"out of memory ({str(e).splitlines()[0]})"
    except Exception as e:  # noqa: BLE001
        failed[c.label] = f"raised {type(e).__name__}: {e}"


def _try_plan(plan: Optional[str]) -> None:
    """Run what follows under ``plan`` (None: the usual plan), with launch plans built afresh."""
    global _trial_plan
    _trial_plan = plan
    clear_plans()


def _budget() -> float:
    try:
        return max(0.0, float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_S)))
    except ValueError:
        return DEFAULT_BUDGET_S


class _no_autocast:
    """Autocast off on ``device``'s type (no-op where it is unavailable): the synthetic tensors
    carry the call's dtypes already."""

    def __init__(self, device: torch.device):
        self._ctx = (torch.autocast(device.type, enabled=False)
                     if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext())

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# What was decided
# ----------------------------------------------------------------------------------------------
def decisions() -> List[Decision]:
    """Every decision this process took or read, in the order taken."""
    return [d for store in _STORES.values() for d in store.decisions.values()]


def autotune_report() -> str:
    """One block per signature ``auto`` decided by measurement or read from the cache in this
    process: each candidate's forward+backward ms (or why it was not timed), the choice and why."""
    lines = []
    for store in _STORES.values():
        if not store.decisions:
            continue
        lines.append(f"{_versions(store)} (cache: {store.path})")
        for d in store.decisions.values():
            seconds = f", first use {d.seconds:.1f} s" if d.source == "measured" else ""
            lines.append(f"  {d.signature.describe()}: runs {d.choice or 'the fallback (composite)'} "
                         f"[{d.source}{seconds}: {d.why}]")
            for label, t in sorted(d.ms.items(), key=lambda kv: kv[1]):
                lines.append(f"    {label:<18} {t:10.4f} ms" + ("  <- chosen" if label == d.choice else ""))
            for label, why in d.failed.items():
                lines.append(f"    {label:<18} not timed: {why}")
    return "\n".join(lines) if lines else "backend='auto' has measured nothing in this process."
