"""Direct kernel launches (rslora_kernels/_launch.py).

Without a GPU the direct path cannot launch a real kernel, so the tests here drive it with a
stand-in kernel that records what Triton's JIT would be given and what the direct path gives the
compiled kernel's launcher: the same arguments, in the same order, and the JIT again whenever
anything Triton specializes on changes. A second test checks, on the real kernels, that every
launch site passes its constexprs as the tail of the kernel's signature (otherwise the direct
path would stay off for it). On a GPU the CUDA numerics tests run every kernel through it.
"""
import types

import pytest
import torch

from rslora_kernels import _launch


class _Compiled:
    """What ``kernel[grid](...)`` returns: a compiled kernel with a launcher (``run``)."""

    function = "fn-handle"
    packed_metadata = "packed"

    def __init__(self, log):
        self.log = log

    @property
    def run(self):
        return lambda *a: self.log.append(("direct", a))


class _Kernel:
    """A JIT function stand-in: ``arg_names`` and ``kernel[grid](*args, **kwargs)``; the fixture
    makes the launcher take it for a JITFunction (anything else goes through its own ``[grid]``)."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "EVEN"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def jit_launch(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)
        return jit_launch


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on, with a stand-in Triton (no hooks) and driver."""
    monkeypatch.delenv("RSLORA_KERNELS_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]),
                                                                launch_exit_hook=None))
    _launch.clear_launch_cache()
    monkeypatch.setattr(_launch, "_triton", (knobs, types.SimpleNamespace(active=_Driver()), _Kernel))
    yield knobs
    _launch.clear_launch_cache()


def _kinds(log):
    return [entry[0] for entry in log]


def test_second_launch_is_direct_with_the_same_arguments(direct):
    kernel, x = _Kernel(), torch.empty(64)
    constexprs, options = {"BLOCK": 32, "EVEN": True}, {"num_warps": 4}
    _launch.launch(kernel, (5,), (x, 64, 0.5), constexprs, options)
    _launch.launch(kernel, (5,), (x, 64, 0.5), constexprs, options)
    assert _kinds(kernel.log) == ["jit", "direct"]
    assert kernel.log[0][1:] == ((5,), (x, 64, 0.5), {"BLOCK": 32, "EVEN": True, "num_warps": 4})
    # the launcher's arguments: grid padded to 3, stream, handles, no launch metadata or hooks,
    # then every signature argument in order, constexprs included
    assert kernel.log[1][1] == (5, 1, 1, 1234, "fn-handle", "packed", None, None, None, x, 64, 0.5, 32, True)


def test_bound_launch_is_launch_with_its_fixed_part_precomputed(direct):
    """A BoundLaunch (a launch plan's launch) hands Triton and the launcher exactly what launch()
    would for the same arguments, and shares its compiled-kernel cache: the same key."""
    kernel, x = _Kernel(), torch.empty(64)
    constexprs, options = {"BLOCK": 32, "EVEN": True}, {"num_warps": 4}
    bound = _launch.BoundLaunch(kernel, (5,), (64,), constexprs, options)
    bound((x,), (0.5,))
    bound((x,), (0.25,))                # another float: same binary
    _launch.launch(kernel, (5,), (x, 64, 0.5), constexprs, options)
    bound((x[1:],), (0.5,))             # misaligned tensor: another binary
    assert _kinds(kernel.log) == ["jit", "direct", "direct", "jit"]
    assert kernel.log[0][1:] == ((5,), (x, 64, 0.5), {"BLOCK": 32, "EVEN": True, "num_warps": 4})
    assert kernel.log[1][1] == (5, 1, 1, 1234, "fn-handle", "packed", None, None, None, x, 64, 0.25, 32, True)
    assert kernel.log[2][1] == (5, 1, 1, 1234, "fn-handle", "packed", None, None, None, x, 64, 0.5, 32, True)
    assert bound == _launch.BoundLaunch(kernel, (5,), (64,), dict(constexprs), dict(options))
    assert bound != _launch.BoundLaunch(kernel, (5,), (65,), constexprs, options)


def test_floats_share_a_binary_but_ints_alignment_and_dtypes_do_not(direct):
    kernel = _Kernel()
    base = torch.empty(64)
    go = lambda t, n, s, block=32: _launch.launch(kernel, (1,), (t, n, s), {"BLOCK": block, "EVEN": True}, {})  # noqa: E731
    go(base, 64, 0.5)
    go(base, 64, 0.25)                  # another float value: same binary
    go(base, 65, 0.5)                   # another int: Triton may specialize on it
    go(base[1:], 64, 0.5)               # 4 bytes in: no longer 16-byte aligned
    go(base.double(), 64, 0.5)          # another dtype
    go(base, 64, 0.5, block=64)         # another constexpr
    go(base[4:], 64, 0.5)               # 16 bytes in: aligned again, same binary as the first
    assert _kinds(kernel.log) == ["jit", "direct", "jit", "jit", "jit", "jit", "direct"]
    assert _launch._arg_key((True,)) != _launch._arg_key((1,))  # Triton types a bool u1, an int 1 a constant


def test_jit_path_when_disabled_hooked_or_not_launchable(direct, monkeypatch):
    x = torch.empty(8)
    kernel = _Kernel()
    direct.runtime.launch_enter_hook.calls.append(print)  # a profiler's hook: the JIT calls it
    for _ in range(2):
        _launch.launch(kernel, (1,), (x, 8, 1.0), {"BLOCK": 8, "EVEN": False}, {})
    assert _kinds(kernel.log) == ["jit", "jit"]
    direct.runtime.launch_enter_hook.calls.clear()

    kernel = _Kernel()  # constexprs that are not the signature's tail, in order: never direct
    for _ in range(2):
        _launch.launch(kernel, (1,), (x, 8, 1.0), {"EVEN": False, "BLOCK": 8}, {})
    assert _kinds(kernel.log) == ["jit", "jit"]

    monkeypatch.setenv("RSLORA_KERNELS_DIRECT_LAUNCH", "0")
    _launch.clear_launch_cache()
    assert not _launch.direct_launch_enabled()
    kernel = _Kernel()
    for _ in range(2):
        _launch.launch(kernel, (1,), (x, 8, 1.0), {"BLOCK": 8, "EVEN": False}, {})
    assert _kinds(kernel.log) == ["jit", "jit"]


def test_every_launch_site_passes_constexprs_as_the_signature_tail(kernel_launches, device):
    """Run the op (forward and backward, dropout on, bias, split-M reductions) with every launch
    recorded; each kernel's constexprs, the first of its keyword arguments (launch options follow),
    must be exactly its signature after the runtime args."""
    import rslora_kernels as rk

    from rslora_kernels.dropout import kernels as dk
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 37, 40, 24, 5
    x = torch.randn(M, K, generator=g).to(device).requires_grad_()
    W, b = torch.randn(N, K, generator=g).to(device), torch.randn(N, generator=g).to(device).requires_grad_()
    A = torch.randn(r, K, generator=g).to(device).requires_grad_()
    B = torch.randn(N, r, generator=g).to(device).requires_grad_()
    rk.lora_linear(x, W, A, B, 0.5, bias=b, dropout_p=0.1, seed=7, backend="triton").sum().backward()
    dk.dropout_scale_triton(x.detach(), torch.tensor(7, device=device), 0.1, 2.0)  # the composite backend's on CUDA
    dk.keep_bits_triton(torch.tensor(7, device=device), M, K, 0.1)  # the pass before F1 when r spans rank tiles
    ys = rk.lora_linear_group(x, [W, W[:7]], [A, A[:3]], [B, B[:7, :3]], [0.5, 2.0], [b, None], [0.1, 0.0],
                              seeds=[7, 8], backend="triton")  # the group's dual GEMM and dx launches
    (ys[0].sum() + ys[1].sum()).backward()
    from rslora_kernels import quant
    packed = torch.randint(0, 256, (24 * 64 // 2,), generator=g, dtype=torch.uint8).to(device)
    w4 = quant.Weight4bit(packed, torch.rand(24 * 64 // 64, generator=g).to(device), (24, 64), 64, "nf4")
    quant.dequantize_4bit(w4, torch.float32, impl="triton")
    seen = {}
    for launch in kernel_launches:
        tail = list(launch.kernel.arg_names[len(launch.args):])
        seen[launch.name] = (tail, list(launch.kwargs)[:len(tail)])
    assert {"_keep_bits_kernel", "_shrink_kernel", "_dual_gemm_kernel", "_m_reduce_kernel",
            "_dropout_scale_kernel", "_dequant_4bit_kernel", "_group_dual_gemm_kernel", "_group_dx_kernel",
            "_group_shrink_kernel", "_group_da_kernel"} <= set(seen)
    for name, (signature_tail, passed) in seen.items():
        assert signature_tail == passed, f"{name}: signature tail {signature_tail}, launch passes {passed}"


def test_cache_is_bounded(direct, monkeypatch):
    """Sizes that change every call add keys; the cache starts over past MAX_CACHED entries."""
    monkeypatch.setattr(_launch, "MAX_CACHED", 4)
    kernel, x = _Kernel(), torch.empty(8)
    for n in range(10):
        _launch.launch(kernel, (1,), (x, n + 2, 1.0), {"BLOCK": 8, "EVEN": False}, {})
        assert len(_launch._COMPILED) <= 4
    _launch.launch(kernel, (1,), (x, 11, 1.0), {"BLOCK": 8, "EVEN": False}, {})  # still cached
    assert _kinds(kernel.log)[-1] == "direct"


def test_other_kernel_objects_keep_their_own_path(direct):
    """A stand-in that is not a JITFunction (the static report's recorder) is always called."""
    class Recorder(_Kernel.__bases__[0]):
        def __init__(self):
            self.calls = 0

        def __getitem__(self, grid):
            def rec(*args, **kwargs):
                self.calls += 1
            return rec
    rec = Recorder()
    for _ in range(3):
        _launch.launch(rec, (1,), (torch.empty(4), 4, 1.0), {"BLOCK": 8, "EVEN": False}, {})
    assert rec.calls == 3 and not _launch._COMPILED
