"""The dropout stream's C++ implementation (csrc/) against the Triton kernel and the PyTorch definition.

Masks must agree bit for bit; row counters beyond 2^32 are exercised through ``row_offset`` (the
counter arithmetic of a tensor with more than 2^31 elements, without allocating one).
"""
import math
import re
import warnings

import pytest
import torch
import triton
import triton.language as tl

import rslora_kernels as rk
from rslora_kernels.dropout import csrc
from rslora_kernels.dropout import drop_threshold, keep_mask_torch
from rslora_kernels.dropout import kernels as tk

SEEDS = [0, 1, 2**32 - 1, 2**32 + 7, 2**62 + 12345, 2**63 - 1]  # high key word zero, set, all ones


@pytest.fixture(scope="module")
def ops():
    reason = csrc.missing_tool()
    if reason is not None:
        pytest.skip(f"C++ extension cannot be built here: {reason}")
    ops = csrc.csrc_ops()
    assert ops is not None, f"csrc/ failed to build although a compiler is present: {csrc.csrc_error()}"
    return ops


def test_extension_builds_where_a_compiler_exists(ops):
    m = ops.philox_keep_mask(5, 3, 9, 0.5, 0)
    assert m.dtype == torch.bool and m.shape == (3, 9) and m.device.type == "cpu"


@pytest.mark.parametrize("shape,seed,p", [
    ((1, 1), SEEDS[0], 0.1), ((3, 5), SEEDS[1], 0.5), ((17, 33), SEEDS[2], 0.1), ((64, 130), SEEDS[3], 0.5),
    ((5, 257), SEEDS[4], 0.1), ((40, 6), SEEDS[5], 0.5), ((33, 64), 987654321, 0.1),
])
def test_cpu_mask_equals_triton_mask(ops, device, shape, seed, p):
    rows, cols = shape
    cpu = ops.philox_keep_mask(seed, rows, cols, p, 0)
    gpu = tk.keep_mask_triton(seed, rows, cols, p, device).cpu()
    assert torch.equal(cpu, gpu)
    assert torch.equal(cpu, keep_mask_torch(seed, rows, cols, p))


@triton.jit
def _offset_mask_kernel(out_ptr, seed_ptr, row_offset, M, K, threshold,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Like _mask_kernel, but stream rows start at the int64 ``row_offset`` (no giant tensor needed)."""
    seed_lo, seed_hi = tk.load_seed(seed_ptr)
    local = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = tk.keep_mask_tile(seed_lo, seed_hi, row_offset + local, col0, threshold, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + local[:, None] * K + cols[None, :], keep.to(tl.uint8),
             mask=(local < M)[:, None] & (cols < K)[None, :])


def _triton_mask_at(seed, rows, cols, p, row_offset, device):
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 32))
    _offset_mask_kernel[grid](out, seed_t, row_offset, rows, cols, drop_threshold(p), BLOCK_M=16, BLOCK_K=32)
    return out.bool().cpu()


@pytest.mark.parametrize("row_offset", [2**31 - 3, 2**32 - 3, 2**32 + 5, 2**40 + 3, 2**62 + 1])
def test_row_counters_beyond_2_31(ops, device, row_offset):
    """Rows of an x with M*K > 2^31 elements (and M >= 2^32): csrc, the PyTorch definition and the
    Triton mask function agree, and the high row word really enters the counter."""
    seed, rows, cols, p = 2**33 + 99, 7, 45, 0.5
    cpu = ops.philox_keep_mask(seed, rows, cols, p, row_offset)
    assert torch.equal(cpu, keep_mask_torch(seed, rows, cols, p, row_offset))
    assert torch.equal(cpu, _triton_mask_at(seed, rows, cols, p, row_offset, device))
    # rows are counters: a window over the same rows gives the same bits
    assert torch.equal(cpu[2:], ops.philox_keep_mask(seed, rows - 2, cols, p, row_offset + 2))
    # row r and row r + 2^32 differ in c2 only; their masks must not coincide
    wide = 512
    hi = ops.philox_keep_mask(seed, 4, wide, p, 2**32 + 11)
    lo = ops.philox_keep_mask(seed, 4, wide, p, 11)
    assert not torch.equal(hi, lo)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_binomial_bounds(ops, p):
    rows, cols = 1000, 1003  # odd: every 16-bit lane j = col & 7 of a Philox call is used
    mask = ops.philox_keep_mask(2**40 + 17, rows, cols, p, 0)
    q = 1.0 - drop_threshold(p) / 2**16  # exact keep probability
    for part in [mask] + [mask[:, j::8] for j in range(8)]:
        n = part.numel()
        kept = int(part.sum())
        assert abs(kept - n * q) <= 5 * math.sqrt(n * q * (1 - q)), (p, kept, n * q)


def test_p_zero_keeps_everything(ops):
    assert bool(ops.philox_keep_mask(3, 20, 21, 0.0, 0).all())


@pytest.mark.parametrize("p", [2**-17, 3 * 2**-17, 5 * 2**-17, 0.1, 1234.5 / 2**16, 1 - 2**-16, 1 - 2**-17, 1 - 2**-30])
def test_threshold_rounding_matches_the_definition(ops, p):
    """The C++ threshold is round(p * 2^16), ties to even, like stream.drop_threshold: on 2^20
    elements about 16 lanes equal any given threshold, so thresholds one apart give different masks."""
    mask = ops.philox_keep_mask(2**33 + 5, 1024, 1024, p, 0)
    assert torch.equal(mask, keep_mask_torch(2**33 + 5, 1024, 1024, p))
    if drop_threshold(p) == 2**16:  # p >= 1 - 2^-17 drops everything
        assert not mask.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dropout_scale_ops(ops, dtype):
    """x * keep * scale (computed in x's op-math type), out of place, in place and paired."""
    seed, p, scale = 2**35 + 3, 0.1, 1.0 / 0.9
    base = torch.randn(83, 50, dtype=torch.float32).to(dtype)
    x = base.t()  # non-contiguous [50, 83]
    keep = keep_mask_torch(seed, 50, 83, p)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.where(keep, x.to(opmath) * scale, 0).to(dtype)
    assert torch.equal(ops.philox_dropout_scale(x, seed, p, scale), expected)
    inplace = x.clone()
    ops.philox_dropout_scale_(inplace, seed, p, scale)
    assert torch.equal(inplace, expected)
    g = torch.randn(50, 83, dtype=torch.float32).to(dtype)
    g_expected = torch.where(keep, g.to(opmath) * 0.25, 0).to(dtype)
    dropped = ops.philox_dropout_scale_pair_(g, x, seed, p, 0.25, scale)
    assert torch.equal(dropped, expected) and torch.equal(g, g_expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dropout_scale_matches_csrc(ops, device, dtype):
    seed, p, scale = 2**50 + 1, 0.5, 2.0
    x = torch.randn(45, 70, dtype=dtype)[:, 3:69]  # sliced view, K not a multiple of 8
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    got = tk.dropout_scale_triton(x.to(device) if device.type != "cpu" else x, seed_t, p, scale).cpu()
    assert torch.equal(got, ops.philox_dropout_scale(x, seed, p, scale))
    # paired (the composite backward's dx and x): one launch, the extension's result for both
    g = torch.randn(45, 66, dtype=dtype).t().contiguous().t()  # column-major [45, 66]
    g_cpu = g.clone()
    dropped_cpu = ops.philox_dropout_scale_pair_(g_cpu, x, seed, p, 0.25, scale)
    g_dev = g.to(device)
    dropped = tk.dropout_scale_pair_triton(g_dev, 0.25, x.to(device), scale, seed_t, p)
    assert torch.equal(dropped.cpu(), dropped_cpu) and torch.equal(g_dev.cpu(), g_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scale_multiplies_nonfinite_values(ops, device, dtype):
    """Dropping multiplies by 0: Inf or NaN at a dropped position gives NaN (x * mask / (1 - p), as
    the reference and torch's dropout compute it), at a kept position Inf * scale and NaN; the C++ ops,
    the Triton kernel (composite on CUDA) and the PyTorch fallback agree."""
    seed, p, scale = 2**34 + 9, 0.5, 2.0
    x = torch.randn(21, 40, dtype=dtype)
    keep = keep_mask_torch(seed, 21, 40, p)
    dropped, kept = (~keep).nonzero()[:3].tolist(), keep.nonzero()[:3].tolist()
    for (r, c), v in zip(dropped + kept, [float("inf"), float("-inf"), float("nan")] * 2):
        x[r, c] = v
    expected = x.to(torch.float32) * keep * scale  # PyTorch: the fallback's and the reference's arithmetic
    assert all(torch.isnan(expected[r, c]) for r, c in dropped)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    g = torch.randn(21, 40, dtype=dtype)
    g[tuple(zip(*(dropped + kept)))] = float("inf")
    g_cpu, g_dev = g.clone(), g.clone().to(device)
    results = {
        "csrc": ops.philox_dropout_scale(x, seed, p, scale),
        "csrc pair": ops.philox_dropout_scale_pair_(g_cpu, x, seed, p, 0.25, scale),
        "triton": tk.dropout_scale_triton(x.to(device), seed_t, p, scale).cpu(),
        "triton pair": tk.dropout_scale_pair_triton(g_dev, 0.25, x.to(device), scale, seed_t, p).cpu(),
    }
    for name, got in results.items():
        torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0, equal_nan=True, msg=name)
    g_expected = (g.to(torch.float32) * keep * 0.25).to(dtype)
    torch.testing.assert_close(g_cpu, g_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g_dev.cpu(), g_expected, rtol=0, atol=0, equal_nan=True)


def test_dropout_mask_on_cpu_uses_the_extension(ops, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("dropout_mask fell back to the PyTorch stream although csrc/ is built")

    monkeypatch.setattr("rslora_kernels.dropout.masking.keep_mask_torch", boom)
    m = rk.dropout_mask(2**40 + 1, (2, 3, 10), 0.3, "cpu")
    assert m.shape == (2, 3, 10)
    assert torch.equal(m.reshape(6, 10), ops.philox_keep_mask(2**40 + 1, 6, 10, 0.3, 0))


def test_unbuildable_extension_warns_once_and_falls_back(monkeypatch):
    """No compiler: a RuntimeWarning naming the cause, then the PyTorch stream (same bits);
    under RSLORA_KERNELS_REQUIRE_CSRC=1 a RuntimeError instead."""
    monkeypatch.setattr(csrc, "missing_tool", lambda: "no C++ compiler found (simulated)")
    monkeypatch.setattr(csrc, "_state", {"tried": False, "error": None})
    monkeypatch.delenv("RSLORA_KERNELS_REQUIRE_CSRC", raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        m = rk.dropout_mask(77, (9, 13), 0.5)
    assert torch.equal(m, keep_mask_torch(77, 9, 13, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        rk.dropout_mask(78, (9, 13), 0.5)
    monkeypatch.setattr(csrc, "_state", {"tried": False, "error": None})
    monkeypatch.setenv("RSLORA_KERNELS_REQUIRE_CSRC", "1")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        rk.dropout_mask(77, (9, 13), 0.5)


def test_bad_arguments_are_rejected(ops):
    with pytest.raises(RuntimeError, match="seed"):
        ops.philox_keep_mask(-1, 2, 2, 0.5, 0)
    with pytest.raises(RuntimeError, match="p must be in"):
        ops.philox_keep_mask(1, 2, 2, 1.0, 0)
    with pytest.raises(RuntimeError, match="shape \\[M, K\\]"):
        ops.philox_dropout_scale(torch.randn(2, 3, 4), 1, 0.5, 2.0)


def test_cpp_constants_match_the_definition():
    """The Philox constants are defined once in Python (dropout/stream.py); the C++ file repeats them
    (a compiled language cannot import them), so this test keeps the copy honest."""
    from rslora_kernels.dropout import stream

    src = (csrc.CSRC_DIR / "philox_dropout.cpp").read_text()
    found = {name: int(value, 16) for name, value in re.findall(r"\b(kM0|kM1|kW0|kW1)\s*=\s*(0x[0-9A-Fa-f]+)u", src)}
    assert found == {"kM0": stream.PHILOX_M0, "kM1": stream.PHILOX_M1, "kW0": stream.PHILOX_W0, "kW1": stream.PHILOX_W1}
    rounds = re.findall(r"\bkRounds\s*=\s*(\d+)", src)
    if rounds:
        assert int(rounds[0]) == stream.PHILOX_ROUNDS
    else:  # the round count is a loop bound in the source
        assert re.search(rf"<\s*{stream.PHILOX_ROUNDS}\s*;", src), "the C++ round count was not found"
