"""The "composite" backend (torch GEMMs + the project's dropout stream) against the float64 reference.

Rule (tests/numerics.py): err(composite) <= 2 * err(reference run in the same dtype) + floor, errors as
max abs deviation from the float64 reference with the same dropout mask (``rk.dropout_mask``).
"""
import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels import reference
from rslora_kernels.ops import composite  # noqa: F401  (registers the backend)
from rslora_kernels.ops.lora_linear import resolve_backend

def _make(x_shape, N, r, dtype, device, adapter_dtype=None, bias=True, x_transposed=False):
    g = torch.Generator().manual_seed(hash((x_shape, N, r)) % 2**31)
    K = x_shape[-1]
    if x_transposed:  # non-contiguous: a transposed view of [K, M] (2-D) with M = x_shape[0]
        x = torch.randn(K, x_shape[0], generator=g).t()
    else:
        x = torch.randn(*x_shape, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    A = torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    dt_ad = adapter_dtype or dtype

    def leaf(t, dt):
        return None if t is None else t.to(device=device, dtype=dt).requires_grad_(True)

    return leaf(x, dtype), W.to(device=device, dtype=dtype), leaf(A, dt_ad), leaf(B, dt_ad), leaf(b, dtype)


def _run(fn, x, W, A, B, b, dy):
    y = fn(x, W, A, B, b)
    grads = torch.autograd.grad(y, [t for t in (x, A, B, b) if t is not None], dy.to(y.dtype))
    return [y, *grads]


def _check(x, W, A, B, b, s, p, seed):
    mask = rk.dropout_mask(seed, x.shape, p, x.device) if p > 0 else None

    def ref(x, W, A, B, b):
        return reference.lora_linear(x, W, A, B, s, b, p, mask)

    def comp(x, W, A, B, b):
        return rk.lora_linear(x, W, A, B, s, b, p, seed=seed, backend="composite")

    def f64(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    g = torch.Generator().manual_seed(seed % 2**31)
    dy = torch.randn(*x.shape[:-1], W.shape[0], generator=g).to(x.device)
    gold = _run(ref, f64(x), f64(W), f64(A), f64(B), f64(b), dy.double())
    same = _run(ref, x, W, A, B, b, dy)
    got = _run(comp, x, W, A, B, b, dy)
    names = ["y", "dx", "dA", "dB", "db"][: len(got)]
    for name, g, sd, gd, like in zip(names, got, same, gold, [x, x, A, B, b]):
        assert g.dtype == like.dtype, (name, g.dtype, like.dtype)
        assert_close_to_oracle(name, g, gd, sd)


CASES = [  # (x shape, N, r)
    ((97, 45), 31, 7),
    ((3, 11, 29), 23, 16),  # 3-D x
    ((1, 19), 5, 1),
    ((0, 13), 9, 3),  # M = 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x" + "x".join(map(str, c[0])))
def test_forward_and_grads_match_reference(device, dtype, p, case):
    x_shape, N, r = case
    x, W, A, B, b = _make(x_shape, N, r, dtype, device)
    _check(x, W, A, B, b, rk.rslora_scaling(16, r), p, 2**40 + 123)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_non_contiguous_x_no_bias(device, p):
    x, W, A, B, _ = _make((61, 37), 27, 5, torch.float32, device, bias=False, x_transposed=True)
    assert not x.is_contiguous()
    _check(x, W, A, B, None, 0.7, p, 12345)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_x_with_fp32_adapters(device, p):
    x, W, A, B, b = _make((2, 40, 33), 21, 8, torch.bfloat16, device, adapter_dtype=torch.float32)
    _check(x, W, A, B, b, rk.rslora_scaling(8, 8), p, 2**62 + 5)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gradcheck_float64(device, p):
    x, W, A, B, b = _make((2, 7, 9), 6, 3, torch.float64, device)
    fn = lambda x, A, B, b: rk.lora_linear(x, W, A, B, 0.8, b, p, seed=2**33 + 1, backend="composite")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B, b))


def test_same_seed_same_output_and_seed_matters(device):
    x, W, A, B, b = _make((50, 40), 30, 4, torch.float32, device)
    run = lambda seed: rk.lora_linear(x, W, A, B, 2.0, b, 0.5, seed=seed, backend="composite")  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_backward_uses_the_forward_mask(device):
    """With W = 0, dx = s/(1-p) * mask * (dy B A): exactly zero where forward dropped x, nonzero where kept."""
    x, W, A, B, b = _make((40, 36), 12, 6, torch.float64, device)
    W = torch.zeros_like(W)
    seed, p = 2**41 + 9, 0.5
    y = rk.lora_linear(x, W, A, B, 1.5, b, p, seed=seed, backend="composite")
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    keep = rk.dropout_mask(seed, x.shape, p, device)
    assert torch.equal(dx != 0, keep)


def test_saves_only_x_T_and_seed(device):
    """No dropped copy and no mask is kept for backward: the only [M, K] tensor saved is x itself."""
    M, K, N, r = 64, 48, 40, 4
    x, W, A, B, b = _make((M, K), N, r, torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rk.lora_linear(x, W, A, B, 1.0, b, 0.1, seed=3, backend="composite")
    big = [t for t in saved if t.numel() >= M * K]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert not any(t.dtype == torch.bool for t in saved)
    assert any(t.shape == (M, r) for t in saved)  # T


def test_auto_picks_composite_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "composite"


def test_fallback_without_the_extension_gives_the_same_result(monkeypatch):
    """Where csrc/ cannot be built, composite uses the PyTorch stream: the same bits, same grads."""
    x, W, A, B, b = _make((33, 26), 14, 5, torch.float32, "cpu")

    def run():
        y = rk.lora_linear(x, W, A, B, 0.9, b, 0.3, seed=2**45 + 2, backend="composite")
        return [y, *torch.autograd.grad(y, (x, A, B, b), torch.ones_like(y))]

    with_ext = run()
    from rslora_kernels.dropout import masking

    monkeypatch.setattr(masking, "csrc_ops", lambda: None)
    for a, c in zip(with_ext, run()):
        assert torch.equal(a, c)
