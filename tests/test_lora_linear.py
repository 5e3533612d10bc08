"""Forward and every gradient of the Triton backend against the float64 reference
(docs/design.md, Numerics rule; tests/numerics.py).

On a machine without CUDA these run in Triton's interpreter (see conftest.py); on a GPU unchanged.
"""
import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N, r): M in {0, 1, 3, 97, 300}; K, N not multiples of 16; r in {1, 3, 16, 200, >= 1024}
SHAPES = [(0, 33, 17, 3), (1, 40, 23, 1), (3, 17, 29, 16), (97, 75, 83, 19), (300, 129, 66, 200), (37, 45, 51, 1100)]


def make_inputs(M, K, N, r, dtype, device, bias=True, adapter_dtype=None, seed=0):
    """Random inputs with realistic scales (never all zeros; lora_B non-zero so dA is exercised)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    return dict(
        x=rnd(M, K),
        weight=rnd(N, K, scale=max(K, 1) ** -0.5),
        lora_A=rnd(r, K, scale=max(K, 1) ** -0.5, dt=adapter_dtype),
        lora_B=rnd(N, r, scale=r ** -0.5, dt=adapter_dtype),
        bias=rnd(N) if bias else None,
    )


def run(fn, inputs, grad_out, scaling, p, mask, grad_names=("x", "lora_A", "lora_B", "bias")):
    """Forward + backward of ``fn``; returns (y, {name: grad})."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if v is not None else None)
              for k, v in inputs.items()}
    y = fn(leaves, scaling, p, mask)
    y.backward(grad_out.to(y.dtype))
    return y, {k: leaves[k].grad for k in grad_names if leaves[k] is not None}


def kernel_fn(seed, backend="triton"):
    def fn(t, scaling, p, mask):
        return rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling, bias=t["bias"],
                              dropout_p=p, seed=seed, backend=backend)
    return fn


def reference_fn():
    def fn(t, scaling, p, mask):
        return rk.reference.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling, t["bias"], p, mask)
    return fn


def check_against_oracle(inputs, scaling, p, seed, backend="triton", grad_names=("x", "lora_A", "lora_B", "bias")):
    x = inputs["x"]
    grad_names = tuple(n for n in grad_names if inputs.get(n) is not None)
    mask = rk.dropout_mask(seed, x.shape, p, x.device) if p > 0 else None
    g = torch.Generator().manual_seed(1)
    N = inputs["weight"].shape[0]
    grad_out = torch.randn(*x.shape[:-1], N, generator=g, dtype=torch.float64).to(x.device)

    y, grads = run(kernel_fn(seed, backend), inputs, grad_out, scaling, p, mask, grad_names)
    inputs64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}  # float64 leaves: float64 grads
    y64, grads64 = run(reference_fn(), inputs64, grad_out, scaling, p, mask, grad_names)
    yt, gradst = run(reference_fn(), inputs, grad_out, scaling, p, mask, grad_names)

    assert y.dtype == x.dtype
    assert_close_to_oracle("y", y, y64, yt)
    for name in grad_names:
        assert grads[name].dtype == inputs[name].dtype, f"grad of {name} has dtype {grads[name].dtype}"
        assert_close_to_oracle(f"d{name}", grads[name], grads64[name], gradst[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_matches_float64_reference(shape, dtype, p, device):
    M, K, N, r = shape
    bias = (M + r) % 2 == 0 or p == 0.1  # bias on and off across the grid
    inputs = make_inputs(M, K, N, r, dtype, device, bias=bias, seed=M * 1000 + r)
    check_against_oracle(inputs, scaling=rk.rslora_scaling(16, r), p=p, seed=1234 + M)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_4096_and_beyond(dtype, device):
    inputs = make_inputs(19, 21, 18, 4100, dtype, device, seed=7)
    check_against_oracle(inputs, scaling=rk.rslora_scaling(8, 4100), p=0.1, seed=99)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_input(dtype, device):
    inputs = make_inputs(4 * 13, 38, 27, 24, dtype, device, seed=3)
    inputs["x"] = inputs["x"].reshape(4, 13, 38)
    check_against_oracle(inputs, scaling=0.9, p=0.1, seed=5)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted_3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_x(layout, dtype, device):
    M, K, N, r = 45, 34, 29, 12
    inputs = make_inputs(M, K, N, r, dtype, device, seed=11)
    x = inputs["x"]
    if layout == "transposed":        # [M, K] view of a [K, M] buffer: stride(-1) != 1
        x = x.t().contiguous().t()
    elif layout == "sliced":          # every other column of a wider buffer
        wide = torch.zeros(M, 2 * K, dtype=dtype, device=device)
        wide[:, ::2] = x
        x = wide[:, ::2]
    else:                             # leading dims that cannot be flattened by strides
        x = x.reshape(5, 9, K).transpose(0, 1)
    assert not x.is_contiguous()
    inputs["x"] = x
    check_against_oracle(inputs, scaling=1.3, p=0.1, seed=17)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_given_transposed(dtype, device):
    """PEFT's fan_in_fan_out stores W^T; passing ``W_t.t()`` must work without a copy."""
    inputs = make_inputs(50, 37, 41, 9, dtype, device, seed=21)
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    assert inputs["weight"].stride(0) == 1
    check_against_oracle(inputs, scaling=0.7, p=0.1, seed=23)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grad_when_requested(dtype, device):
    inputs = make_inputs(33, 26, 19, 5, dtype, device, seed=31)
    check_against_oracle(inputs, scaling=0.5, p=0.1, seed=37,
                         grad_names=("x", "weight", "lora_A", "lora_B", "bias"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_dtypes_fp32_adapters(dtype, device):
    """PEFT's default: 16-bit base, fp32 adapters. Grads arrive in each parameter's own dtype."""
    inputs = make_inputs(64, 40, 36, 10, dtype, device, adapter_dtype=torch.float32, seed=41)
    check_against_oracle(inputs, scaling=2.0, p=0.1, seed=43)


def test_partial_grads(device):
    """Frozen adapters / inputs: only the requested grads are computed, and they are right."""
    inputs = make_inputs(40, 30, 20, 6, torch.float32, device, seed=47)
    for names in [("x",), ("lora_A",), ("lora_B",), ("bias",), ("lora_A", "lora_B")]:
        check_against_oracle(inputs, scaling=0.8, p=0.1, seed=53, grad_names=names)


def test_split_m_reduction_matches_single_pass(device):
    """B3's deterministic split-M path gives the same dA/dB (to rounding) as one pass over M."""
    from rslora_kernels.ops.triton_kernels import _lora_grads
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 200, 36, 28, 7
    U, x, dy, T = (torch.randn(*s, generator=g).to(device) for s in [(M, r), (M, K), (M, N), (M, r)])
    one = _lora_grads(U, x, dy, T, 0.6, 0.2, torch.tensor(9, device=device), torch.float32, True, True, num_splits=1)
    three = _lora_grads(U, x, dy, T, 0.6, 0.2, torch.tensor(9, device=device), torch.float32, True, True, num_splits=3)
    mask = rk.dropout_mask(9, (M, K), 0.2, device)

    def grads(dtype):  # dA, dB in PyTorch, everything in dtype
        U_, x_, dy_, T_ = (t.to(dtype) for t in (U, x, dy, T))
        return 0.6 / 0.8 * U_.t() @ (x_ * mask.to(dtype)), 0.6 * dy_.t() @ T_

    oracle, same = grads(torch.float64), grads(torch.float32)
    for splits, got in (("1 split", one), ("3 splits", three)):
        for name, g, o, t in zip(["dA", "dB"], got, oracle, same):
            assert_close_to_oracle(f"{name} ({splits})", g, o, t)


def _split_shrinks(request):
    """Shrink configs (F1 with and without dropout, B1) that split the reduction: 32-wide steps
    (whole keep-bits words), every split at least 4 steps, as many splits as that allows."""
    from dataclasses import asdict
    from rslora_kernels.ops.configs import TileConfig
    if request.family not in ("shrink", "shrink_masked"):
        return None
    return asdict(TileConfig(32, 0, 32, 32, num_warps=4, num_stages=2, SPLIT_PER_SM=1024))


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_k_shrinks_match_the_oracle(dtype, p, device, kernel_launches):
    """F1 and B1 with the reduction split (fp32 partials summed in order by _sum_splits): K = 420
    is 14 steps of 32 (3 splits, the last one ending in a partial step), N = 300 is 10 (2 splits)."""
    from rslora_kernels.ops import tuning
    inputs = make_inputs(45, 420, 300, 20, dtype, device, seed=61)
    with tuning.forced_configs(_split_shrinks):
        check_against_oracle(inputs, scaling=0.9, p=p, seed=67)
    sums = [launch.args[2] for launch in kernel_launches if launch.name == "_sum_splits_kernel"]  # (part, out, S, ...)
    assert sums[:2] == [3, 2], sums  # F1 over K, then B1 over N


def test_split_k_draws_the_same_keep_bits(device):
    """F1 drawing the mask while split over K visits every element once: the same keep-bits as
    one pass, and T by the numerics rule either way."""
    from rslora_kernels.ops.triton_kernels import _shrink
    g = torch.Generator().manual_seed(3)
    x, A = torch.randn(70, 420, generator=g).to(device), torch.randn(9, 420, generator=g).to(device)
    seed = torch.tensor(71, device=device)
    one, bits1 = _shrink(x, (A.stride(1), A.stride(0)), A, 9, x.dtype, seed=seed, p=0.3, num_splits=1)
    three, bits3 = _shrink(x, (A.stride(1), A.stride(0)), A, 9, x.dtype, seed=seed, p=0.3, num_splits=3)
    assert bits1 is not None and torch.equal(bits1, bits3)
    mask = rk.dropout_mask(71, x.shape, 0.3, device)
    T64, T32 = ((x.to(dt) * mask / 0.7) @ A.to(dt).t() for dt in (torch.float64, torch.float32))
    for name, T in (("T (one pass)", one), ("T (3 splits)", three)):  # split sums round differently: each by the rule
        assert_close_to_oracle(name, T, T64, T32)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(97, 75, 83, 19), (1, 40, 23, 1), (37, 45, 51, 300)], ids=lambda s: "M{}K{}N{}r{}".format(*s))
def test_rank_mm_plan_matches_the_oracle(shape, dtype, p, device, kernel_launches):
    """Plan "rank_mm": T, U, dA, dB by torch.mm (drop(x) formed from the keep-bits in x's dtype),
    the dual GEMMs fused; no shrink or B3 launch runs."""
    from rslora_kernels.ops import tuning
    M, K, N, r = shape
    inputs = make_inputs(M, K, N, r, dtype, device, seed=M + r)
    with tuning.forced_plan("rank_mm"):
        check_against_oracle(inputs, scaling=rk.rslora_scaling(16, r), p=p, seed=73)
    names = {launch.name for launch in kernel_launches}
    assert "_dual_gemm_kernel" in names and not names & {"_shrink_kernel", "_m_reduce_kernel"}, names


def test_rank_mm_plan_with_fp32_adapters(device):
    """Adapters in fp32 under a 16-bit x: T and U by torch.mm, dA and dB by B3 (written in fp32)."""
    from rslora_kernels.ops import tuning
    inputs = make_inputs(64, 40, 36, 10, torch.bfloat16, device, adapter_dtype=torch.float32, seed=79)
    with tuning.forced_plan("rank_mm"):
        check_against_oracle(inputs, scaling=2.0, p=0.1, seed=83)


def test_autocast(device):
    """Under torch.autocast, x/W/bias are cast to the autocast dtype; fp32 adapters stay fp32."""
    dt = torch.bfloat16
    inputs = make_inputs(48, 30, 22, 8, torch.float32, device, seed=59)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast(device.type, dtype=dt):
        y = rk.lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], 1.1,
                           bias=leaves["bias"], backend="triton")
    assert y.dtype == dt
    y.float().sum().backward()
    assert leaves["lora_A"].grad.dtype == torch.float32 and leaves["x"].grad.dtype == torch.float32
    cast = {k: (v.to(dt) if k in ("x", "weight", "bias") else v) for k, v in inputs.items()}
    y_ref = rk.reference.lora_linear(cast["x"].double(), cast["weight"].double(), cast["lora_A"].to(dt).double(),
                                     cast["lora_B"].to(dt).double(), 1.1, cast["bias"].double())
    y_torch = rk.reference.lora_linear(cast["x"], cast["weight"], cast["lora_A"], cast["lora_B"], 1.1, cast["bias"])
    assert_close_to_oracle("y(autocast)", y, y_ref, y_torch)


def test_backward_is_deterministic(device):
    inputs = make_inputs(150, 70, 65, 20, torch.float32, device, seed=61)

    def grads():
        t = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.9, bias=t["bias"],
                           dropout_p=0.1, seed=3, backend="triton")
        y.backward(torch.ones_like(y))
        return [t[k].grad for k in ("x", "lora_A", "lora_B", "bias")]

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_reference_gradcheck_float64():
    inputs = make_inputs(7, 6, 5, 3, torch.float64, torch.device("cpu"), seed=67)
    mask = rk.dropout_mask(5, (7, 6), 0.3)
    leaves = [inputs[k].requires_grad_() for k in ("x", "weight", "lora_A", "lora_B", "bias")]
    assert torch.autograd.gradcheck(
        lambda x, w, a, b, bias: rk.reference.lora_linear(x, w, a, b, 0.7, bias, 0.3, mask), leaves)


def test_saved_tensors_are_x_T_and_keep_bits(device):
    """Backward state: x (a view, no copy), T [M, r] and the keep-bits (too small to count here) -- no
    dropped copy of x, no x-sized mask."""
    inputs = make_inputs(40, 30, 20, 6, torch.float32, device, seed=71)
    x = inputs["x"].requires_grad_()
    A = inputs["lora_A"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rk.lora_linear(x, inputs["weight"], A, inputs["lora_B"], 1.0, dropout_p=0.1, seed=1, backend="triton")
    big = [t for t in saved if t.numel() >= 40 * 6]
    shapes = sorted(tuple(t.shape) for t in big if t.shape not in (inputs["weight"].shape, A.shape, inputs["lora_B"].shape))
    assert shapes == [(40, 6), (40, 30)], shapes
    x_saved = next(t for t in big if t.shape == (40, 30))
    assert x_saved.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("backend", ["triton", "composite", "reference"])
@pytest.mark.parametrize("K, N", [(0, 13), (11, 0)], ids=["K0", "N0"])
def test_empty_feature_dims(backend, K, N, device):
    """K = 0 or N = 0 is a valid (if degenerate) layer: y = b, and every grad has its empty or zero shape."""
    inputs = make_inputs(9, K, N, 3, torch.float32, device, seed=73)
    inputs["x"] = inputs["x"].reshape(3, 3, K)
    check_against_oracle(inputs, scaling=0.6, p=0.1, seed=79, backend=backend)
