"""Launch plans (rslora_kernels/_launch.py ``planned``; docs/kernels.md, "Host work per launch").

A plan is what a launcher computes from its call's signature alone (tile config, grid,
constexprs, offset width, launch options), cached per signature. These tests check that cached
plans give bit-identical results to plans computed afresh across changes of shape, strides,
dtype, dropout and bias; that every cached plan equals its uncached computation; that the cache is
bounded and cleared with the launch cache, when tables are reloaded and when backends change; and
that forced configs (the tuner) bypass it.
"""
import importlib
import math

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels import _launch
from rslora_kernels.ops import triton_kernels as tk
from rslora_kernels.ops import tuning

from conftest import DEVICE
from numerics import assert_close_to_oracle

lora_linear_module = importlib.import_module("rslora_kernels.ops.lora_linear")  # the package re-exports the function

# (M, K, N, r, dtype, p, bias, weight stored transposed, x a non-contiguous view)
CASES = [
    (8, 40, 24, 4, torch.float32, 0.0, True, False, False),
    (8, 40, 24, 4, torch.float32, 0.1, True, False, False),
    (8, 40, 24, 4, torch.float32, 0.1, False, True, False),   # same shapes, other strides
    (13, 40, 24, 4, torch.float32, 0.1, True, False, True),
    (8, 40, 24, 4, torch.float16, 0.1, True, False, False),   # same shapes, other dtype
    (5, 33, 17, 3, torch.bfloat16, 0.0, False, True, True),
    (21, 64, 48, 8, torch.float32, 0.25, True, False, False),
]


def _inputs(M, K, N, r, dtype, p, bias, w_t, x_view, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + K)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    x = rnd(M, 2 * K)[:, ::2] if x_view else rnd(M, K)
    W = rnd(K, N).t() if w_t else rnd(N, K)
    return (x.to(dtype).requires_grad_(), W.to(dtype), (rnd(r, K) * 0.3).to(dtype).requires_grad_(),
            (rnd(N, r) * 0.3).to(dtype).requires_grad_(), rnd(N).to(dtype).requires_grad_() if bias else None,
            rnd(M, N).to(dtype))


def _step(case):
    """y and the grads of x, A, B (and bias) of one fused fwd+bwd on the Triton backend."""
    x, W, A, B, b, dy = _inputs(*case)
    p = case[5]
    y = rk.lora_linear(x, W, A, B, 0.7, bias=b, dropout_p=p, seed=1234 + case[0], backend="triton")
    wrt = [x, A, B] + ([b] if b is not None else [])
    return [y.detach(), *torch.autograd.grad(y, wrt, dy)]


def _fresh(case):
    """The step with every plan computed afresh (the cache emptied before it)."""
    _launch.clear_launch_cache()
    return _step(case)


def test_cached_plans_are_bit_identical_across_signature_changes():
    fresh = [_fresh(case) for case in CASES]
    _launch.clear_launch_cache()
    for order in (CASES, CASES[::-1], CASES):  # later rounds run on plans cached by other signatures' calls
        for case in order:
            got = _step(case)
            want = fresh[CASES.index(case)]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), case
    held = dict(_launch._PLANS)
    for case in CASES:
        _step(case)
    assert _launch._PLANS.keys() == held.keys(), "a repeated signature made a new plan"
    assert all(_launch._PLANS[k] is held[k] for k in held), "a repeated signature recomputed its plan"


def test_every_cached_plan_equals_its_uncached_computation():
    _launch.clear_launch_cache()
    for case in CASES:
        _step(case)
    makers = {make for make, _ in _launch._PLANS}
    assert {tk._shrink_plan.__wrapped__, tk._dual_gemm_plan.__wrapped__, tk._m_reduce_plan.__wrapped__,
            tk._forward_plan.__wrapped__, tk._backward_plan.__wrapped__, lora_linear_module._call_plan} <= makers
    for (make, key), plan in _launch._PLANS.items():
        assert make(*key) == plan, (make.__name__, key)


def test_plan_keys_tell_strides_apart():
    """Two calls that differ only in W's strides get different plans (the offset width and the
    grid may depend on them)."""
    _launch.clear_launch_cache()
    _step(CASES[1])
    before = set(_launch._PLANS)
    _step(CASES[2][:6] + (True, True, False))
    assert set(_launch._PLANS) - before


def test_offset_width_from_layouts_matches_tensors():
    wide = torch.empty((4, 8))[:, ::2]
    assert tk._offset_dtype(wide) == tk._layouts_offset_dtype((wide.shape, wide.stride()))
    assert tk._layouts_offset_dtype(((2, 3), (2**31, 1))) == tk.tl.int64
    assert tk._layouts_offset_dtype(((0, 3), (2**31, 1))) == tk.tl.int32  # empty: nothing is addressed
    assert tk._contiguous(5, 3) == ((5, 3), (3, 1)) == (tuple(torch.empty(5, 3).shape), torch.empty(5, 3).stride())
    assert tk._contiguous(5, 0)[1] == torch.empty(5, 0).stride()


def test_cache_is_bounded_for_ragged_batches(monkeypatch):
    monkeypatch.setattr(_launch, "MAX_PLANS", 6)
    _launch.clear_launch_cache()
    sizes = list(range(1, 15))
    for M in sizes:
        case = (M, 40, 24, 4, torch.float32, 0.1, True, False, False)
        got = _step(case)
        assert len(_launch._PLANS) <= 6
        want = _fresh(case)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), M


def test_cache_is_cleared_with_the_launch_cache_tables_and_registry():
    _step(CASES[0])
    assert _launch._PLANS
    _launch.clear_launch_cache()
    assert not _launch._PLANS
    _step(CASES[0])
    tuning.reload_tables()
    assert not _launch._PLANS
    _step(CASES[0])
    rk.register_backend("plan_test", lambda *a: None, devices=("cpu",), dtypes=(torch.float32,))
    try:
        assert not _launch._PLANS
    finally:
        rk.unregister_backend("plan_test")


def test_forced_configs_bypass_the_cache():
    """The tuner forces a config per block and records the requests: every call must ask."""
    _launch.clear_launch_cache()
    _step(CASES[0])
    asked = []
    with tuning.forced_configs(lambda request: asked.append(request) or None):
        _step(CASES[0])
        first = len(asked)
        _step(CASES[0])
    assert first > 0 and len(asked) == 2 * first


def test_a_validated_call_signature_still_checks_what_varies_per_call():
    """A call whose signature passed the checks skips them later (docs/kernels.md, "Host work per launch");
    whatever is not in the signature is still checked, and a value that is (scaling, dropout_p,
    their types) makes a new signature, checked afresh."""
    x, W, A, B, b, _ = _inputs(*CASES[1])
    ok = dict(bias=b, dropout_p=0.1, seed=3, backend="triton")
    _launch.clear_launch_cache()
    rk.lora_linear(x, W, A, B, 1, **ok)
    assert any(make is lora_linear_module._call_plan for make, _ in _launch._PLANS)
    bad = [((x, W, A, B, math.nan), ok, ValueError, "scaling"),
           ((x, W, A, B, True), ok, ValueError, "scaling"),              # bool after int 1: another signature
           ((x, W, A, B, 1), dict(ok, dropout_p=1.0), ValueError, "dropout_p"),
           ((x, W, A, B, 1), dict(ok, seed=-1), ValueError, "seed"),
           ((x, W, A, B, 1), dict(ok, seed=torch.tensor(3, dtype=torch.int32)), TypeError, "seed"),
           ((x.tolist(), W, A, B, 1), ok, TypeError, "x"),
           ((x, W, A.double(), B, 1), ok, TypeError, "lora_B"),
           ((x, W[:, :-1], A, B, 1), ok, ValueError, "weight"),
           ((x, W, A, B, 1), dict(ok, bias=b[:-1]), ValueError, "bias"),
           ((x, W, A, B, 1), dict(ok, backend="nope"), ValueError, "backend")]
    for args, kwargs, exc, name in bad:
        for _ in range(2):  # a failed call is never cached
            with pytest.raises(exc, match=name):
                rk.lora_linear(*args, **kwargs)
    y = rk.lora_linear(x, W, A, B, 1, **ok)
    want, same = (rk.lora_linear(*(t.to(dt) for t in (x, W, A, B)), 1.0, **dict(ok, bias=b.to(dt), backend="reference"))
                  for dt in (torch.float64, x.dtype))
    assert_close_to_oracle("y", y, want, same)
