"""Host-work plans of the composite paths (docs/kernels.md, "Host work per launch"): the LoRA
composite backend's shared never-written tensors (the zero a beta = 0 GEMM ignores, the mask
state without dropout), DoRA's composite forward with one drop(x), and the QLoRA op's parts
checked once per signature.

Results must be bit-identical whether every per-signature state was made afresh for the call or
held from calls of other signatures (shape, stride, dtype, dropout, bias, adapter dtype changes),
and a held signature must never let bad parts through.
"""
import pytest
import torch

import rslora_kernels as rk
from rslora_kernels import _launch, _runtime
from rslora_kernels.ops import composite, qlora
from rslora_kernels.quant import Weight4bit

# (op, M, K, N, r, dtype, adapter dtype, p, bias, W stored transposed, x a non-contiguous view)
CASES = [
    ("lora", 8, 40, 24, 4, torch.float32, None, 0.0, True, False, False),
    ("lora", 8, 40, 24, 4, torch.float32, None, 0.1, True, False, False),
    ("lora", 8, 40, 24, 4, torch.float32, None, 0.1, False, True, False),     # same shapes, other strides
    ("lora", 13, 40, 24, 4, torch.bfloat16, torch.float32, 0.0, True, False, True),
    ("lora", 8, 40, 24, 4, torch.float16, None, 0.0, True, False, False),    # same shapes, other dtype
    ("lora", 5, 33, 17, 3, torch.bfloat16, None, 0.25, False, True, True),
    ("dora", 8, 40, 24, 4, torch.float32, None, 0.1, True, False, False),
    ("dora", 8, 40, 24, 4, torch.bfloat16, torch.float32, 0.1, False, True, False),
    ("dora", 13, 40, 24, 4, torch.float32, None, 0.0, True, False, True),
    ("qlora", 8, 64, 24, 4, torch.float32, None, 0.1, True, False, False),
    ("qlora", 8, 64, 24, 4, torch.bfloat16, None, 0.0, False, False, True),
    ("qlora", 6, 63, 10, 2, torch.float16, torch.float32, 0.1, True, False, False),  # blocks straddle rows
]


def _weight4bit(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(-(-N * K // 64), generator=g) + 0.05
    return Weight4bit(packed, absmax, (N, K), 64, "nf4")


def _step(case):
    """y and every grad of one composite fwd+bwd."""
    op, M, K, N, r, dtype, adt, p, bias, w_t, x_view = case
    adt = adt or dtype
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (rnd(M, 2 * K)[:, ::2] if x_view else rnd(M, K)).to(dtype).requires_grad_()
    W = (rnd(K, N).t() if w_t else rnd(N, K)).mul(K ** -0.5).to(dtype)
    A = (rnd(r, K) * K ** -0.5).to(adt).requires_grad_()
    B = (rnd(N, r) * 0.3).to(adt).requires_grad_()
    b = rnd(N).to(dtype).requires_grad_() if bias else None
    dy = rnd(M, N).to(dtype)
    leaves = [x, A, B] + ([b] if bias else [])
    seed = 99 + M
    if op == "lora":
        y = rk.lora_linear(x, W, A, B, 0.7, bias=b, dropout_p=p, seed=seed, backend="composite")
    elif op == "dora":
        m = (torch.linalg.norm(W.double(), dim=1) * 1.1).to(adt).requires_grad_()
        leaves.append(m)
        y = rk.dora_linear(x, W, A, B, m, 0.7, bias=b, dropout_p=p, seed=seed, backend="composite")
    else:
        y = rk.lora_linear(x, _weight4bit(N, K, seed), A, B, 0.7, bias=b, dropout_p=p, seed=seed,
                           backend="composite")
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _fresh(case):
    _launch.clear_launch_cache()  # every plan, the QLoRA parts' included
    _runtime._SHARED.clear()  # the shared never-written tensors (zeros, mask states, zero seeds)
    return _step(case)


def test_results_bit_identical_with_and_without_held_plans():
    fresh = [_fresh(case) for case in CASES]
    _launch.clear_launch_cache()
    for order in (CASES, CASES[::-1], CASES):  # later rounds run on state held from other signatures' calls
        for case in order:
            got, want = _step(case), fresh[CASES.index(case)]
            assert len(got) == len(want)
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want)), case


def test_a_repeated_qlora_signature_checks_its_parts_once():
    _launch.clear_launch_cache()
    case = CASES[9]
    _step(case)
    held = {k for k in _launch._PLANS if k[0] is qlora._dense_weight}
    assert len(held) == 1
    _step(case)
    assert {k for k in _launch._PLANS if k[0] is qlora._dense_weight} == held


@pytest.mark.parametrize("bad", ["absmax", "packed"])
def test_bad_parts_raise_even_after_a_good_signature_was_held(bad):
    _launch.clear_launch_cache()
    w = _weight4bit(24, 64, 1)
    x = torch.randn(8, 64)
    A, B = torch.randn(4, 64), torch.randn(24, 4)
    args = (list(w.tensors()), w.meta(), "nf4", A, B, None, 0.5, 0.0, torch.zeros((), dtype=torch.int64), "composite")
    qlora.qlora_linear_fwd(x, *args)  # the good signature, now held
    parts = list(w.tensors())
    if bad == "absmax":
        parts[1] = parts[1][:-1].contiguous()  # one block scale short
    else:
        parts[0] = parts[0][:-1].contiguous()  # one byte short
    with pytest.raises(ValueError, match=bad):
        qlora.qlora_linear_fwd(x, parts, *args[1:])


def test_lora_composite_without_dropout_holds_no_seed_copy():
    """p = 0: the mask state is one shared never-written tensor per device, not a copy per call."""
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    seed = torch.zeros((), dtype=torch.int64)
    s1 = composite.composite_forward(x, W, A, B, None, 0.5, 0.0, seed)[2]
    s2 = composite.composite_forward(x, W, A, B, None, 0.5, 0.0, seed)[2]
    assert s1 is s2 and s1 is not seed and s1.shape == () and s1.dtype == torch.int64
    s3 = composite.composite_forward(x, W, A, B, None, 0.5, 0.1, torch.tensor(7))[2]
    assert s3.item() == 7  # with dropout: the seed itself (a copy), which backward regenerates the mask from


def test_a_first_call_under_inference_mode_does_not_break_training_calls():
    """The shared tensors made by a first call inside torch.inference_mode are not kept (an inference
    tensor cannot be saved for backward later)."""
    _runtime._SHARED.clear()
    case = CASES[0]
    with torch.inference_mode():
        _, M, K, N, r = case[:5]
        rk.lora_linear(torch.randn(M, K), torch.randn(N, K), torch.randn(r, K), torch.randn(N, r), 0.7,
                       backend="composite")
    got = _step(case)
    assert all(torch.equal(a, b) for a, b in zip(got, _fresh(case)))


def test_a_qlora_call_signature_that_passed_still_rejects_bad_values_on_every_call():
    _launch.clear_launch_cache()
    w = _weight4bit(24, 64, 3)
    x, A, B = torch.randn(8, 64), torch.randn(4, 64), torch.randn(24, 4)
    good = dict(scaling=0.5, dropout_p=0.1, seed=5)

    def call(**kw):
        args = {**good, **kw}
        return rk.lora_linear(x, w, A, B, args["scaling"], dropout_p=args["dropout_p"], seed=args["seed"],
                              backend="composite")

    want = call()
    assert torch.equal(call(), want)
    assert len([k for k in _launch._PLANS if k[0] is qlora.qlora_linear]) == 1  # held once, reused
    for bad, err in ((dict(scaling=float("nan")), ValueError), (dict(scaling=True), ValueError),
                     (dict(dropout_p=1.0), ValueError), (dict(dropout_p=[0.1]), (TypeError, ValueError)),
                     (dict(seed="7"), (TypeError, ValueError))):
        with pytest.raises(err):
            call(**bad)
    with pytest.raises(ValueError, match="lora_A"):
        rk.lora_linear(x, w, A[:, :63], B, 0.5, backend="composite")
    assert torch.equal(call(), want)


def test_a_dora_call_signature_that_passed_still_rejects_bad_values_on_every_call():
    _launch.clear_launch_cache()
    x, W, A, B = torch.randn(8, 64), torch.randn(24, 64) / 8, torch.randn(4, 64) / 8, torch.randn(24, 4)
    m = torch.linalg.norm(W, dim=1)

    def call(scaling=0.5, dropout_p=0.1, seed=5, magnitude=m):
        return rk.dora_linear(x, W, A, B, magnitude, scaling, dropout_p=dropout_p, seed=seed, backend="composite")

    want = call()
    assert torch.equal(call(), want)
    assert len([k for k in _launch._PLANS if k[0] is rk.ops.dora.dora_linear]) == 1  # held once, reused
    for bad, err in ((dict(scaling=float("nan")), ValueError), (dict(scaling=True), ValueError),
                     (dict(dropout_p=1.0), ValueError), (dict(dropout_p=[0.1]), (TypeError, ValueError)),
                     (dict(seed="7"), (TypeError, ValueError)), (dict(magnitude=m[:-1]), ValueError),
                     (dict(magnitude=m.half()), TypeError)):
        with pytest.raises(err):
            call(**bad)
    assert torch.equal(call(), want)
