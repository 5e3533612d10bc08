"""The dropout stream: Philox known answers, the lane mapping, kernel mask == rk.dropout_mask, keep
rate, seeding, and non-finite values through dropout (a multiply: Inf/NaN at a dropped position is NaN)."""
import math
from fractions import Fraction

import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle, assert_same_nonfinite_and_close
from rslora_kernels.dropout import STREAM_VERSION, drop_threshold, keep_mask_torch, philox4x32
from rslora_kernels.dropout.stream import PHILOX_ROUNDS

# Known-answer vectors published with Random123 (Salmon et al., SC'11; its kat_vectors file) for
# Philox4x32 at 7 rounds (the stream's) and 10 (the generator's default): (rounds, counter, key, output).
RANDOM123_KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_py(counter, key, rounds):
    """Philox4x32 from the paper, on Python ints, written for this test (not the package's code)."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * x0, 0xCD9E8D57 * x2
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ x3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return x0, x1, x2, x3


def _keep_py(seed, row, col, p):
    """The stream's keep decision for one element, straight from the definition in docs/design.md:
    counter (col >> 3, row lo, row hi, 0), lane j = col & 7 is half j & 1 of word j >> 1, kept iff
    lane >= round(p * 2^16) (computed exactly, ties to even)."""
    words = _philox_py((col >> 3, row & 0xFFFFFFFF, row >> 32, 0), (seed & 0xFFFFFFFF, seed >> 32), 7)
    j = col & 7
    lane = (words[j >> 1] >> (16 * (j & 1))) & 0xFFFF
    return lane >= round(Fraction(p) * 2**16)


@pytest.mark.parametrize("rounds, counter, key, expected", RANDOM123_KAT)
def test_philox_known_answers(rounds, counter, key, expected):
    assert _philox_py(counter, key, rounds) == expected  # the test's own Philox is right...
    assert tuple(int(v) for v in philox4x32(counter, key, rounds)) == expected  # ...and so is the package's


def test_stream_version_names_the_definition():
    assert rk.DROPOUT_STREAM == STREAM_VERSION == "philox4x32-7-u16"
    assert PHILOX_ROUNDS == 7


@pytest.mark.parametrize("seed, row_offset", [(0, 0), (2**63 - 1, 5), (2**32 + 7, 2**32 - 3), (987654321, 2**40 + 1)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.77])
def test_stream_lanes_match_the_definition(seed, row_offset, p):
    """keep_mask_torch (which the C++ and Triton masks are compared with) against the test's own
    element-by-element implementation: counters, lane order, threshold."""
    rows, cols = 3, 21  # three Philox calls per row, the last one partly used
    got = keep_mask_torch(seed, rows, cols, p, row_offset=row_offset)
    expected = torch.tensor([[_keep_py(seed, row_offset + r, c, p) for c in range(cols)] for r in range(rows)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("p, threshold", [
    (0.0, 0), (2**-17, 0), (3 * 2**-17, 2), (5 * 2**-17, 2), (0.1, 6554), (0.5, 32768),
    (1 - 2**-16, 65535), (1 - 2**-17, 65536), (1 - 2**-40, 65536),
])
def test_threshold_is_p_rounded_to_a_multiple_of_2_16(p, threshold):
    """round(p * 2^16), ties to even; from 1 - 2^-17 on every element is dropped."""
    assert drop_threshold(p) == threshold == round(Fraction(p) * 2**16)
    if threshold == 65536:
        assert not keep_mask_torch(3, 4, 40, p).any()
    if threshold == 0:
        assert keep_mask_torch(3, 4, 40, p).all()


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**63 - 1])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (33, 130), (64, 259)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_triton_mask_kernel_matches_stream(seed, shape, p, device):
    """The Triton kernels' stream (mask kernel) equals the PyTorch definition bit for bit."""
    from rslora_kernels.dropout.kernels import keep_mask_triton
    got = keep_mask_triton(seed, shape[0], shape[1], p, device).cpu()
    assert torch.equal(got, keep_mask_torch(seed, shape[0], shape[1], p))


def test_stream_counters_beyond_2_31_elements():
    """Rows past 2^32 (M*K far beyond 2^31) use the high counter word: distinct, well-mixed draws."""
    K = 64
    low = keep_mask_torch(11, 4, K, 0.5, row_offset=0)
    high = keep_mask_torch(11, 4, K, 0.5, row_offset=2**32)
    assert not torch.equal(low, high)  # the row's high 32 bits are part of the counter
    near = keep_mask_torch(11, 4, K, 0.5, row_offset=2**32 - 2)
    assert torch.equal(near[2:], keep_mask_torch(11, 2, K, 0.5, row_offset=2**32))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    n_rows, n_cols = 301, 1003
    mask = rk.dropout_mask(2024, (n_rows, n_cols), p)
    q = 1 - drop_threshold(p) / 2**16  # the exact keep probability
    for part in [mask] + [mask[:, j::8] for j in range(8)]:  # overall and in each of the 8 lanes
        n = part.numel()
        kept = part.sum().item()
        assert abs(kept - n * q) <= 5 * math.sqrt(n * q * (1 - q)), (kept, n * q)
    # lanes that share a Philox word (8g, 8g+1) or a call (8g, 8g+2 .. 8g+7) are not correlated
    for j in range(1, 8):
        a, b = mask[:, 0::8][:, :125].float().flatten(), mask[:, j::8][:, :125].float().flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel()), (j, corr)


def _mask_seen_by_kernels(seed, x, p, device):
    """Recover the kernel's mask: with W = 0, A = I, B = I, s = 1, y = x*mask/(1-p) and dx = dy*mask/(1-p)."""
    M, K = x.shape
    eye = torch.eye(K, device=device)
    xr = x.clone().requires_grad_()
    y = rk.lora_linear(xr, torch.zeros(K, K, device=device), eye, eye, 1.0, dropout_p=p, seed=seed, backend="triton")
    y.backward(torch.ones_like(y))
    return y != 0, xr.grad != 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernels_use_dropout_mask_forward_and_backward(p, device):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(77, 21, generator=g) + 0.5).to(device)  # no zeros: y != 0 exactly where kept
    fwd_mask, bwd_mask = _mask_seen_by_kernels(123456789, x, p, device)
    expected = rk.dropout_mask(123456789, x.shape, p, device)
    assert torch.equal(fwd_mask, expected)
    assert torch.equal(bwd_mask, expected)  # backward regenerated the forward's mask
    assert 0 < expected.sum() < expected.numel()


def test_mask_shape_follows_x(device):
    m3 = rk.dropout_mask(5, (3, 4, 10), 0.3, device)
    m2 = rk.dropout_mask(5, (12, 10), 0.3, device)
    assert m3.shape == (3, 4, 10) and torch.equal(m3.reshape(12, 10), m2)


def test_same_seed_same_result_different_seed_differs(device):
    x, W, A, B = (torch.randn(*s, device=device) for s in [(40, 24), (16, 24), (4, 24), (16, 4)])
    f = lambda seed: rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.3, seed=seed, backend="triton")  # noqa: E731
    assert torch.equal(f(7), f(7))
    assert not torch.equal(f(7), f(8))


def test_seed_none_follows_torch_manual_seed(device):
    x, W, A, B = (torch.randn(*s, device=device) for s in [(40, 24), (16, 24), (4, 24), (16, 4)])
    f = lambda: rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.3, backend="triton")  # noqa: E731
    torch.manual_seed(0)
    a, b = f(), f()
    torch.manual_seed(0)
    c = f()
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_eval_mode_disables_dropout(device):
    x, W, A, B = (torch.randn(*s, device=device) for s in [(40, 24), (16, 24), (4, 24), (16, 4)])
    y_eval = rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.5, training=False, backend="triton")
    y_nodrop = rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.0, backend="triton")
    assert torch.equal(y_eval, y_nodrop)


def test_reference_backend_uses_the_same_mask(device):
    x, W, A, B = (torch.randn(*s, device=device) for s in [(40, 24), (16, 24), (4, 24), (16, 4)])
    mask = rk.dropout_mask(42, x.shape, 0.3, device)
    y64 = rk.reference.lora_linear(x.double(), W.double(), A.double(), B.double(), 1.0, None, 0.3, mask)
    y32 = rk.reference.lora_linear(x, W, A, B, 1.0, None, 0.3, mask)
    y_ref = rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.3, seed=42, backend="reference")
    y_tri = rk.lora_linear(x, W, A, B, 1.0, dropout_p=0.3, seed=42, backend="triton")
    assert torch.equal(y_ref, y32)  # the reference backend is the reference with that mask
    assert_close_to_oracle("y(triton)", y_tri, y64, y32)


# ----------------------------------------------------------------------------------------------
# Non-finite values through dropout: every backend drops by multiplying by 0, as the reference's
# x * mask / (1 - p) does, so Inf or NaN at a dropped position gives NaN (a select would give 0)
# ----------------------------------------------------------------------------------------------
NONFINITE_SEED, NONFINITE_P = 3, 0.5
# numpy (the interpreter's arithmetic) warns when Inf * 0 makes a NaN: here that is the point
_numpy_nan_warnings_expected = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _positions(M, K):
    """A dropped and a kept position of the stream's mask (seed 3, p = 0.5), in different rows."""
    mask = rk.dropout_mask(NONFINITE_SEED, (M, K), NONFINITE_P)
    dropped = tuple((~mask[1:M // 2]).nonzero()[0].tolist())
    kept = tuple(mask[M // 2:].nonzero()[3].tolist())
    return mask, {"dropped": (dropped[0] + 1, dropped[1]), "kept": (kept[0] + M // 2, kept[1])}


def _grads(fn, inputs, dy, frozen=(1,)):
    """(y, then the grads of the inputs not ``frozen``: W, the second input, is frozen as in the fast path)."""
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad for i, t in enumerate(leaves) if i not in frozen]


@pytest.fixture
def no_csrc(monkeypatch):
    """The composite backend's CPU dropout through the PyTorch fallback instead of the C++ extension."""
    monkeypatch.setattr("rslora_kernels.dropout.masking.csrc_ops", lambda: None)


@pytest.fixture
def rank_mm_plan():
    """The Triton backend's LoRA op on plan "rank_mm" (rank GEMMs by torch.mm, drop(x) by its own kernel)."""
    from rslora_kernels.ops import tuning
    with tuning.forced_plan("rank_mm"):
        yield


NONFINITE_BACKENDS = ["triton", "composite", "composite-torch-fallback"]
# the LoRA op on each plan of the Triton backend too: "rank_mm" drops x in its own kernel (_drop_by_bits_kernel)
NONFINITE_BACKENDS_AND_PLANS = ["triton", "triton-rank_mm", "composite", "composite-torch-fallback"]


def _backend(name, request):
    if name == "triton-rank_mm":
        request.getfixturevalue("rank_mm_plan")
        return "triton"
    if name == "composite-torch-fallback":
        if DEVICE_IS_CUDA:
            pytest.skip("the PyTorch fallback is the CPU path of the composite backend")
        request.getfixturevalue("no_csrc")
        return "composite"
    return name


DEVICE_IS_CUDA = torch.cuda.is_available()


@_numpy_nan_warnings_expected
@pytest.mark.parametrize("backend", NONFINITE_BACKENDS_AND_PLANS)
@pytest.mark.parametrize("r", [5, 80])  # 80: several rank tiles of F1 (the keep-bits pass draws the mask)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["x@dropped", "x@kept", "dy@dropped", "dy@kept"])
def test_nonfinite_values_propagate_like_the_reference(backend, r, value, where, device, request):
    """y, dx, dA, dB and db with an Inf or NaN in x (or in dy) at a dropped and at a kept position
    of the mask: the same NaN/Inf positions as the float64 reference, the same finite values."""
    backend = _backend(backend, request)
    M, K, N, s = 37, 45, 19, 0.75
    g = torch.Generator().manual_seed(11)
    x, W, A, B, b, dy = (torch.randn(*shape, generator=g) for shape in [(M, K), (N, K), (r, K), (N, r), (N,), (M, N)])
    mask, pos = _positions(M, K)
    tensor, at = where.split("@")
    if tensor == "x":
        x[pos[at]] = value
    else:  # dy's row of that position; the column is any output feature
        dy[pos[at][0], 7] = value
    fn = lambda x_, W_, A_, B_, b_: rk.lora_linear(  # noqa: E731
        x_, W_, A_, B_, s, bias=b_, dropout_p=NONFINITE_P, seed=NONFINITE_SEED, backend=backend)
    ref = lambda x_, W_, A_, B_, b_: rk.reference.lora_linear(  # noqa: E731
        x_, W_, A_, B_, s, b_, NONFINITE_P, mask.to(x_.device))
    inputs = [x, W, A, B, b]
    got = _grads(fn, [t.to(device) for t in inputs], dy.to(device))
    oracle = _grads(ref, [t.double() for t in inputs], dy.double())
    same = _grads(ref, inputs, dy)
    for name, gt, o, sd in zip(["y", "dx", "dA", "dB", "db"], got, oracle, same):
        assert_same_nonfinite_and_close(f"{name} ({backend}, {where}={value})", gt, o, sd)
    if tensor == "x" and at == "dropped":  # the case a select would hide: T's row and dA's column are NaN
        assert torch.isnan(got[2][:, pos[at][1]]).all() and torch.isnan(got[3]).all()


@_numpy_nan_warnings_expected
@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("where", ["x@dropped", "x@kept", "dy@dropped", "dy@kept"])
def test_nonfinite_values_propagate_like_the_reference_dora(backend, value, where, device, request):
    """DoRA (the Triton path's two-accumulator kernels, the composite path's extra GEMMs): y and
    every grad with the reference's NaN/Inf positions and finite values."""
    backend = _backend(backend, request)
    M, K, N, r, s = 37, 45, 19, 5, 0.75
    g = torch.Generator().manual_seed(12)
    x, W, A, B, b, dy = (torch.randn(*shape, generator=g) for shape in [(M, K), (N, K), (r, K), (N, r), (N,), (M, N)])
    magnitude = torch.rand(N, generator=g) + 0.5
    mask, pos = _positions(M, K)
    tensor, at = where.split("@")
    if tensor == "x":
        x[pos[at]] = value
    else:
        dy[pos[at][0], 7] = value
    fn = lambda x_, W_, A_, B_, m_, b_: rk.dora_linear(  # noqa: E731
        x_, W_, A_, B_, m_, s, bias=b_, dropout_p=NONFINITE_P, seed=NONFINITE_SEED, backend=backend)
    ref = lambda x_, W_, A_, B_, m_, b_: rk.reference.dora_linear(  # noqa: E731
        x_, W_, A_, B_, m_, s, b_, NONFINITE_P, mask.to(x_.device))
    inputs = [x, W, A, B, magnitude, b]
    got = _grads(fn, [t.to(device) for t in inputs], dy.to(device))
    oracle = _grads(ref, [t.double() for t in inputs], dy.double())
    same = _grads(ref, inputs, dy)
    for name, gt, o, sd in zip(["y", "dx", "dA", "dB", "dm", "db"], got, oracle, same):
        assert_same_nonfinite_and_close(f"{name} ({backend}, {where}={value})", gt, o, sd)


@_numpy_nan_warnings_expected
@pytest.mark.parametrize("backend", ["triton", "composite"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("where", ["x@dropped", "dy@dropped"])
def test_nonfinite_values_propagate_like_the_reference_group(backend, value, where, device):
    """The sibling-projection group op (each member its own mask; the Triton dx launch masks each
    member's rank term): the reference's NaN/Inf positions and finite values, member by member."""
    M, K, ranks, Ns, s = 37, 45, (5, 3), (19, 11), 0.75
    seeds = (NONFINITE_SEED, NONFINITE_SEED + 1)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(M, K, generator=g)
    Ws = [torch.randn(N, K, generator=g) for N in Ns]
    As = [torch.randn(r, K, generator=g) for r in ranks]
    Bs = [torch.randn(N, r, generator=g) for N, r in zip(Ns, ranks)]
    dys = [torch.randn(M, N, generator=g) for N in Ns]
    masks = [rk.dropout_mask(seed, (M, K), NONFINITE_P) for seed in seeds]
    _, pos = _positions(M, K)  # dropped in member 0's mask
    if where == "x@dropped":
        x[pos["dropped"]] = value
    else:
        dys[0][pos["dropped"][0], 7] = value

    def run(fn, dtype, dev):
        leaves = [t.detach().to(dev, dtype).clone().requires_grad_() for t in [x, *As, *Bs]]
        ys = fn(leaves[0], leaves[1:3], leaves[3:5])
        torch.autograd.backward(ys, [d.to(dev, dtype) for d in dys])
        return [*ys] + [t.grad for t in leaves]

    fused = lambda x_, As_, Bs_: rk.lora_linear_group(  # noqa: E731
        x_, [W.to(device) for W in Ws], As_, Bs_, s, dropout_ps=NONFINITE_P, seeds=seeds, backend=backend)
    ref = lambda x_, As_, Bs_: [rk.reference.lora_linear(x_, W.to(x_.dtype), A, B, s, None, NONFINITE_P, m)  # noqa: E731
                                for W, A, B, m in zip(Ws, As_, Bs_, masks)]
    got = run(fused, torch.float32, device)
    oracle = run(ref, torch.float64, "cpu")
    same = run(ref, torch.float32, "cpu")
    for name, gt, o, sd in zip(["y0", "y1", "dx", "dA0", "dA1", "dB0", "dB1"], got, oracle, same):
        assert_same_nonfinite_and_close(f"{name} ({backend}, {where}={value})", gt, o, sd)
