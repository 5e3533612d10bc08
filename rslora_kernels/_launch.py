"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

Why: one fwd+bwd step of the Triton backend makes several launches (counted in docs/kernels.md,
Launches per step), and on the GPU machines we measured
(benchmarks/results/2026-11-27_h200_step_profile.md) Triton's generic launch path (bind the
arguments, specialize each one, hash a cache key, check globals) plus our config lookups cost more
host time per step than the kernels take on the GPU: the step was host-bound.

How: the first launch of a kernel for a given *specialization key* goes through Triton's JIT
(compiling if needed) and returns the compiled kernel; later launches with the same key call that
compiled kernel's launcher directly. The key holds everything Triton specializes a kernel on for
these call sites: each tensor's dtype and whether its address is 16-byte aligned, each integer's
exact value (Triton specializes on ``== 1`` and divisibility by 16), the type of each float, None,
and every constexpr and launch option -- so two calls with equal keys need the same binary.

The JIT path is kept whenever it must be: under the interpreter, when a launch hook is installed
(profilers such as proton), for kernel objects that are not plain JITFunctions (the static report's
recorders), and for any Triton whose compiled kernels lack the launcher attributes used here
(checked once per kernel). ``RSLORA_KERNELS_DIRECT_LAUNCH=0`` turns direct launches off.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ._runtime import interpreting

__all__ = ["launch", "BoundLaunch", "direct_launch_enabled", "clear_launch_cache", "MAX_CACHED", "planned", "recall", "remember", "clear_plans", "MAX_PLANS",
           "call_signature"]

_COMPILED: Dict[tuple, tuple] = {}  # key -> (kernel, its compiled kernel)
# Keys hold exact integer values (sizes, strides), so workloads whose sizes change every call (ragged
# batches) would add entries without end: past this many the cache starts over (the JIT path
# refills it; only host time is at stake).
MAX_CACHED = 1024
# (triton.knobs, triton.runtime.driver, JITFunction) once direct launches were found allowed, False
# once found disallowed by the environment (read once: until clear_launch_cache), None before
_triton = None


def direct_launch_enabled() -> bool:
    """Whether launches may bypass Triton's JIT entry point (see the module docstring)."""
    global _triton
    if _triton is None:
        if os.environ.get("RSLORA_KERNELS_DIRECT_LAUNCH", "1") in ("0", "", "false") or interpreting():
            _triton = False
            return False
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        _triton = knobs, driver, JITFunction
    elif _triton is False:
        return False
    hooks = _triton[0].runtime
    return not _has_hooks(hooks.launch_enter_hook) and not _has_hooks(hooks.launch_exit_hook)


def _has_hooks(hook) -> bool:
    """A launch hook is None (older Triton) or a HookChain, empty unless a tool added to it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def clear_launch_cache() -> None:
    """Forget every compiled kernel held for direct launches (the next launch of each goes through
    the JIT) and every launch plan, and read RSLORA_KERNELS_DIRECT_LAUNCH and TRITON_INTERPRET again."""
    global _triton
    _COMPILED.clear()
    clear_plans()
    _triton = None


# ----------------------------------------------------------------------------------------------
# Launch plans: what a launcher computes from its call's signature alone, once per signature
# ----------------------------------------------------------------------------------------------
_PLANS: Dict[tuple, object] = {}
# Keys hold exact sizes and strides: ragged batches would add entries without end, so past this many
# the cache starts over (plans are recomputed; only host time is at stake)
MAX_PLANS = 512


def clear_plans() -> None:
    """Forget every launch plan (after anything they were computed from changed: the tuned tables)."""
    _PLANS.clear()


def recall(owner, key):
    """The plan held for ``(owner, key)``, or None. ``owner`` names what computed it (a function)."""
    return _PLANS.get((owner, key))


def remember(owner, key, plan):
    """Hold ``plan`` for ``(owner, key)`` (bounded: past ``MAX_PLANS`` entries the cache starts over);
    returns it."""
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[(owner, key)] = plan
    return plan


def call_signature(*args) -> Optional[tuple]:
    """A hashable key of a call's arguments, for a per-signature plan of the checks a call passed:
    a tensor by its type, shape, dtype and device, anything else by its type and value. None under
    torch.compile's tracing (sizes may be symbolic) or when an argument is not hashable (the checks
    then run and name it)."""
    if torch.compiler.is_compiling():
        return None
    key = tuple((type(a), a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a) for a in args)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def planned(make: Callable[..., object], uncached_while: Optional[Callable[[], bool]] = None) -> Callable[..., object]:
    """``make(*key)`` memoized in the plan cache: ``make`` must be a pure function of its arguments
    (hashable: sizes, strides, dtypes, devices, flags) and of process state that only
    :func:`clear_launch_cache` resets (the environment, the tuned tables). ``uncached_while()``
    true: call ``make`` every time (the tuner forcing configs)."""
    def plan(*key):
        if uncached_while is not None and uncached_while():
            return make(*key)
        entry = _PLANS.get((make, key))
        if entry is not None:
            return entry
        return remember(make, key, make(*key))
    plan.__wrapped__ = make  # the uncached computation (tests compare the two)
    plan.__name__ = getattr(make, "__name__", "plan")
    plan.__doc__ = make.__doc__
    return plan


def _arg_key(args: Sequence) -> tuple:
    # an int: itself; a float: its type (Triton does not specialize on float values); a tensor:
    # (dtype, 16-byte aligned); anything else (None, a bool): its type and value. Ints first: most
    # arguments are sizes and strides
    return tuple([a if type(a) is int else float if type(a) is float
                  else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a)
                  for a in args])


def launch(kernel, grid: Tuple[int, ...], args: Sequence, constexprs: Dict[str, object], options: Dict[str, int]) -> None:
    """``kernel[grid](*args, **constexprs, **options)``, directly where that is safe.

    ``args`` are the kernel's runtime arguments in signature order and ``constexprs`` its
    remaining (constexpr) parameters, in signature order after them; ``options`` are launch
    options (num_warps, num_stages)."""
    if not (direct_launch_enabled() and isinstance(kernel, _triton[2])):  # a stand-in (e.g. a recorder): its own path
        kernel[grid](*args, **constexprs, **options)
        return
    _launch_direct(kernel, grid, tuple(grid) + (1,) * (3 - len(grid)), args, _arg_key(args),
                   (tuple(constexprs.values()), tuple(options.values())), constexprs, options)


def _launch_direct(kernel, grid: Tuple[int, ...], grid3: Tuple[int, int, int], args: Sequence, arg_key: tuple, tail_key: tuple,
                   constexprs: Dict[str, object], options: Dict[str, int]) -> None:
    """The direct path of :func:`launch`: ``arg_key`` is ``_arg_key(args)`` and ``tail_key`` the
    constexpr and option values, ``grid3`` the grid padded to three dims (precomputed by a
    :class:`BoundLaunch`)."""
    driver = _triton[1].active  # what the JIT launches on: the current device, its current stream
    device = driver.get_current_device()
    # id(kernel), not the kernel: hashing a JITFunction hashes its source-derived cache key on every
    # call. The entry holds the kernel too, so an id reused by another kernel object never matches
    key = (id(kernel), device, arg_key, *tail_key)
    held, compiled = _COMPILED.get(key, (None, None))
    if held is kernel:
        compiled.run(grid3[0], grid3[1], grid3[2], driver.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constexprs.values())
        return
    compiled = kernel[grid](*args, **constexprs, **options)
    if _launchable(kernel, compiled, len(args), constexprs):
        if len(_COMPILED) >= MAX_CACHED:
            _COMPILED.clear()
        _COMPILED[key] = (kernel, compiled)


class BoundLaunch:
    """One launch site with everything fixed but its tensors and trailing runtime scalars: a launch
    plan's launch (docs/kernels.md, "Host work per launch").

    ``bound(tensors, scalars)`` is ``launch(kernel, grid, tensors + ints + scalars, constexprs,
    options)``: the kernel's signature takes its tensors first, then ``ints`` (sizes, strides and
    other values fixed by the plan's signature), then ``scalars`` (values that vary per call, such
    as the adapter's scale). What :func:`launch` would compute per call from the fixed part (the
    padded grid, the specialization key of ``ints``, the constexpr and option values) is computed
    once here. Equal when kernel, grid, ints, constexprs and options are (plans compare by value)."""

    __slots__ = ("kernel", "grid", "ints", "constexprs", "options", "_grid3", "_ints_key", "_tail_key", "_kwargs",
                 "_run")

    def __init__(self, kernel, grid: Tuple[int, ...], ints: tuple, constexprs: Dict[str, object],
                 options: Dict[str, int]):
        self.kernel, self.grid, self.ints = kernel, tuple(grid), tuple(ints)
        self.constexprs, self.options = dict(constexprs), dict(options)
        self._grid3 = self.grid + (1,) * (3 - len(self.grid))
        self._ints_key = _arg_key(self.ints)
        self._tail_key = (tuple(self.constexprs.values()), tuple(self.options.values()))
        self._kwargs = {**self.constexprs, **self.options}
        # what ``kernel[grid](...)`` calls for Triton's own kernel classes (JIT, interpreter), called
        # without the proxy ``[grid]`` builds; anything else (a recorder) is launched by ``[grid]``
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        # (looked up at each call: a profiler or the host benchmark may replace the class's run)
        self._run = type(kernel) in (JITFunction, InterpretedFunction)

    def __eq__(self, other) -> bool:
        return (type(other) is BoundLaunch and self.kernel is other.kernel and
                (self.grid, self.ints, self.constexprs, self.options)
                == (other.grid, other.ints, other.constexprs, other.options))

    __hash__ = None

    def __repr__(self) -> str:
        name = getattr(self.kernel, "__name__", type(self.kernel).__name__)
        return f"BoundLaunch({name}, grid={self.grid}, ints={self.ints}, constexprs={self.constexprs})"

    def __call__(self, tensors: tuple, scalars: tuple = ()) -> None:
        args = tensors + self.ints + scalars
        if not (direct_launch_enabled() and isinstance(self.kernel, _triton[2])):
            if self._run:
                self.kernel.run(*args, grid=self.grid, warmup=False, **self._kwargs)
            else:
                self.kernel[self.grid](*args, **self._kwargs)
            return
        _launch_direct(self.kernel, self.grid, self._grid3, args, _arg_key(tensors) + self._ints_key + _arg_key(scalars),
                       self._tail_key, self.constexprs, self.options)


def _launchable(kernel, compiled, n_args: int, constexprs) -> bool:
    """Whether ``compiled`` can be launched directly with (args, constexprs) as given: the
    attributes used exist and the constexprs are the signature's tail, in order."""
    names = getattr(kernel, "arg_names", None)
    return (names is not None and list(names[n_args:]) == list(constexprs)
            and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")))
