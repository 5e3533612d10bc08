"""The dropout stream: Philox known answers, kernel mask == rk.dropout_mask, keep rate, seeding."""
import math

import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.dropout import drop_threshold, keep_mask_torch, philox4x32_10


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors published with Random123 (Salmon et al., SC'11) for Philox4x32-10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(v) for v in philox4x32_10(counter, key)) == expected


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
    n = mask.numel()
    kept = mask.sum().item()
    q = 1 - drop_threshold(p) / 2**32
    assert abs(kept - n * q) <= 5 * math.sqrt(n * q * (1 - q)), (kept, n * q)
    # columns that share a Philox call (4g..4g+3) are not correlated
    a, b = mask[:, 0::4].float().flatten(), mask[:, 1::4].float().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(a.numel())


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
