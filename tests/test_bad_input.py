"""Bad and edge-case input across the public API (docs/design.md, Non-finite values and Double
backward): every misuse is a ValueError/TypeError naming the argument, raised before any kernel
runs and before the caller's model is touched; every edge case gives the float64 reference's
answer, NaN and Inf included; the fused backward is first-order only and says so. The fuzz over valid shapes, strides, dtypes
and p is in tests/test_fuzz.py (it needs hypothesis; these tests do not).

Argument checks of the op itself (shapes, dtypes, devices, p, scaling, backend names) are in
tests/test_validation.py; this file covers the rest of the API and the edge values."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle, assert_same_nonfinite_and_close
from rslora_kernels.ops.first_order import DOUBLE_BACKWARD_ERROR
from rslora_kernels.quant import Weight4bit

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = [n for n, b in rk.registered_backends().items() if b.backward is not None and b.runs_on(DEV)]  # triton, composite
M, K, N, R = 5, 7, 6, 3


def make(dtype=torch.float32, seed=0, bias=True, M=M, K=K, N=N, R=R):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(M, K, generator=g), weight=torch.randn(N, K, generator=g),
             lora_A=torch.randn(R, K, generator=g), lora_B=torch.randn(N, R, generator=g),
             bias=torch.randn(N, generator=g) if bias else None)
    return {k: None if v is None else v.to(DEV, dtype) for k, v in t.items()}


def run(backend, t, scaling=0.5, p=0.0, seed=3, grads=("x", "lora_A", "lora_B", "bias"), layout="contiguous", dy=None):
    """y and the grads of ``grads`` on ``backend``, the inputs cloned as leaves and then laid out
    by :func:`_layout` (the grads are the leaves'); the reference in the tensors' own dtype when
    ``backend`` is "reference" (pass float64 tensors for the oracle)."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grads) if v is not None else None) for k, v in t.items()}
    a = _layout(dict(leaves), layout)
    y = rk.lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], scaling,
                       bias=a["bias"], dropout_p=p, seed=seed, backend=backend)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: leaves[k].grad for k in grads if leaves[k] is not None}



# ----------------------------------------------------------------------------------------------
# Non-finite values: NaN/Inf in each input at kept positions (and with p = 0), every backend
# against the reference; NaN at scaling = 0 (0 * NaN = NaN, as the reference and PEFT give).
# (Non-finite x at dropped positions: tests/test_dropout.py.)
# ----------------------------------------------------------------------------------------------
def _kept(seed, p):
    """(row, col) of x kept by the dropout mask of (seed, p); (1, 2) without dropout."""
    if p == 0.0:
        return 1, 2
    kept = rk.dropout_mask(seed, (M, K), p).nonzero()
    return tuple(kept[len(kept) // 2].tolist())


NONFINITE = [("x", "nan", 0.0), ("x", "inf", 0.0), ("x", "-inf", 0.3), ("x", "nan", 0.3), ("weight", "nan", 0.3),
             ("weight", "inf", 0.0), ("bias", "nan", 0.3), ("lora_A", "nan", 0.0), ("lora_A", "inf", 0.0),
             ("lora_B", "nan", 0.0), ("lora_B", "-inf", 0.0)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scaling", [0.5, 0.0])
@pytest.mark.parametrize("where, value, p", NONFINITE, ids=[f"{w}-{v}-p{p}" for w, v, p in NONFINITE])
def test_nonfinite_propagates_as_in_reference(backend, scaling, where, value, p):
    t = make()
    pos = {"x": _kept(3, p), "weight": (4, 2), "bias": (1,), "lora_A": (1, 2), "lora_B": (3, 1)}[where]
    t[where][pos] = float(value)
    y, grads = run(backend, t, scaling, p)
    y64, grads64 = run("reference", {k: None if v is None else v.double() for k, v in t.items()}, scaling, p)
    y32, grads32 = run("reference", t, scaling, p)
    assert_same_nonfinite_and_close("y", y, y64, y32)
    for k in grads:
        assert_same_nonfinite_and_close(f"d{k}", grads[k], grads64[k], grads32[k])


def y_col_nan(y, n):
    """Column n of y is all NaN and no other entry is."""
    return bool(y[:, n].isnan().all()) and not y[:, [i for i in range(y.shape[1]) if i != n]].isnan().any()


@pytest.mark.parametrize("backend", FUSED)
def test_nan_at_alpha_zero_layer(backend):
    """A layer with alpha = 0 (scaling 0) and a NaN in lora_B: NaN in y, as in the reference."""
    layer = rk.LoRALinear(K, N, R, alpha=0.0, backend=backend).to(DEV)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_B.weight[2, 1] = math.nan
    assert y_col_nan(layer(torch.randn(M, K, device=DEV)), 2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_group_nan_at_scaling_zero(backend, p):
    """The group op at s = 0 with a NaN in one member's lora_B: that member's column is NaN, as in
    the reference run member by member."""
    t = make()
    B2 = torch.randn(N - 1, R, device=DEV)
    B2[2, 1] = math.nan
    Ws, As, Bs = [t["weight"], t["weight"][1:]], [t["lora_A"], t["lora_A"]], [t["lora_B"], B2]
    ys = rk.lora_linear_group(t["x"], Ws, As, Bs, 0.0, [t["bias"], None], p, seeds=[6, 7], backend=backend)
    for i, y in enumerate(ys):
        want, same = (rk.lora_linear(t["x"].to(dt), Ws[i].to(dt), As[i].to(dt), Bs[i].to(dt), 0.0,
                                     None if i else t["bias"].to(dt), p, seed=6 + i, backend="reference")
                      for dt in (torch.float64, torch.float32))
        assert_same_nonfinite_and_close(f"y[{i}]", y, want, same)
    assert y_col_nan(ys[1], 2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_nan_at_scaling_zero(backend, p):
    """DoRA at s = 0 with a NaN in lora_B: its row norm is NaN (0 * NaN), so is that column of y."""
    t = make()
    t["lora_B"][2, 1] = math.nan
    m = torch.rand(N, device=DEV) + 0.5
    got = rk.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], m, 0.0, bias=t["bias"], dropout_p=p, seed=6,
                         backend=backend)
    mask = rk.dropout_mask(6, (M, K), p, device=DEV) if p > 0 else None
    want, same = (rk.reference.dora_linear(*(t[k].to(dt) for k in ("x", "weight", "lora_A", "lora_B")), m.to(dt), 0.0,
                                           t["bias"].to(dt), p, mask) for dt in (torch.float64, torch.float32))
    assert y_col_nan(want, 2)
    assert_same_nonfinite_and_close("y", got, want, same)



# ----------------------------------------------------------------------------------------------
# Zero sizes, strides (non-contiguous, expanded, transposed), dropout/scaling/seed edge values:
# the reference's result.
# ----------------------------------------------------------------------------------------------
def _layout(t, what):
    """The inputs as views of ``what`` layout (contiguous: unchanged)."""
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    M, K = x.shape
    if what == "x transposed view":
        t["x"] = x.t().contiguous().t()
    elif what == "x expanded (stride 0)":
        t["x"] = x[:1].expand(M, K)
    elif what == "x sliced (stride 2)":
        t["x"] = torch.cat([x, x], 1)[:, ::2]
    elif what == "x 3-D":
        t["x"] = x.reshape(1, M, K).expand(2, M, K)
    elif what == "W, A, B transposed views":
        t["weight"], t["lora_A"], t["lora_B"] = W.t().contiguous().t(), A.t().contiguous().t(), B.t().contiguous().t()
    return t


EDGE = [("M = 0", dict(M=0), {}), ("K = 0", dict(K=0), {}), ("N = 0", dict(N=0), {}), ("K = 1", dict(K=1), {}),
        ("r = 1", dict(R=1), {}), ("N = 1", dict(N=1), {}),
        ("no bias", dict(bias=False), {}), ("scaling 0", {}, dict(scaling=0.0)),
        ("negative scaling", {}, dict(scaling=-3.0)), ("huge scaling", {}, dict(scaling=1e30)),
        ("p tiny", {}, dict(p=1e-6)), ("p near 1", {}, dict(p=0.999)), ("seed 0", {}, dict(p=0.3, seed=0)),
        ("seed 2^63-1", {}, dict(p=0.3, seed=2**63 - 1))]
LAYOUTS = ["x transposed view", "x expanded (stride 0)", "x sliced (stride 2)", "x 3-D", "W, A, B transposed views"]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("what, sizes, kw", EDGE + [(w, {}, {}) for w in LAYOUTS],
                         ids=[e[0] for e in EDGE] + LAYOUTS)
def test_edge_values_match_reference(backend, what, sizes, kw):
    t = make(**sizes)
    args = (kw.get("scaling", 0.5), kw.get("p", 0.0), kw.get("seed", 5),
            ("x", "lora_A", "lora_B") + (("bias",) if t["bias"] is not None else ()), what)
    grads = args[3]
    y, g = run(backend, t, *args)
    y64, g64 = run("reference", {k: None if v is None else v.double() for k, v in t.items()}, *args)
    y32, g32 = run("reference", t, *args)
    assert_close_to_oracle("y", y, y64, y32)
    for k in grads:
        assert_close_to_oracle(f"d{k}", g[k], g64[k], g32[k])


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("seed, exc, message", [
    ("abc", TypeError, r"seed must be an int"),
    (-1, ValueError, r"seed must be in \[0, 2\^63\)"),
    (2**63, ValueError, r"seed must be in \[0, 2\^63\)"),
    (torch.tensor(-5), ValueError, r"seed must be in \[0, 2\^63\), got tensor\(-5\)"),
    (torch.tensor(5, dtype=torch.int32), TypeError, r"seed tensor must be a one-element int64 tensor"),
    (torch.tensor([1, 2]), TypeError, r"seed tensor must be a one-element int64 tensor"),
    (True, TypeError, r"seed must be an int")], ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__)
@pytest.mark.parametrize("p, training", [(0.3, True), (0.0, True), (0.3, False)], ids=["p0.3", "p0", "eval"])
def test_seed_checked_even_without_dropout(backend, seed, exc, message, p, training):
    if isinstance(seed, torch.Tensor) and DEV.type != "cpu":
        pytest.skip("a tensor seed's value is read on the CPU only (on a GPU it would synchronize)")
    t = make()
    with pytest.raises(exc, match=message):
        rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.5, dropout_p=p, training=training,
                       seed=seed, backend=backend)
    with pytest.raises(exc, match=message):
        rk.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], torch.ones(N, device=DEV), 0.5,
                       dropout_p=p, training=training, seed=seed, backend=backend)


# ----------------------------------------------------------------------------------------------
# Autograd edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("grads", [("lora_A", "lora_B"), ("weight", "x"), ("bias",), ("weight",)],
                         ids=["x not requiring grad", "W requiring grad", "bias only", "W only"])
def test_grad_subsets_match_reference(backend, grads):
    t = make()
    y, g = run(backend, t, 0.5, 0.3, 7, grads)
    y64, g64 = run("reference", {k: v.double() for k, v in t.items()}, 0.5, 0.3, 7, grads)
    y32, g32 = run("reference", t, 0.5, 0.3, 7, grads)
    assert_close_to_oracle("y", y, y64, y32)
    assert set(g) == set(grads)
    for k in grads:
        assert_close_to_oracle(f"d{k}", g[k], g64[k], g32[k])


def _op(kind, backend, t, **kw):
    if kind == "lora":
        return rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.5, bias=t["bias"], backend=backend, **kw)
    if kind == "dora":
        return rk.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 0.5, bias=t["bias"],
                              backend=backend, **kw)
    if kind == "group":  # two members on the same x, their outputs side by side
        seed = kw.pop("seed", None)
        ys = rk.lora_linear_group(t["x"], [t["weight"], t["weight"][1:]], [t["lora_A"], t["lora_A"][1:]],
                                  [t["lora_B"], t["lora_B"][1:, 1:]], 0.5, [t["bias"], None], kw.pop("dropout_p", 0.0),
                                  seeds=None if seed is None else [seed, seed + 1], backend=backend, **kw)
        return torch.cat(ys, -1)
    BF = pytest.importorskip("bitsandbytes.functional")  # "qlora": a 4-bit base
    packed, qs = BF.quantize_4bit(t["weight"], blocksize=64, quant_type="nf4")
    return rk.lora_linear(t["x"], Weight4bit.from_bnb(packed, qs), t["lora_A"], t["lora_B"], 0.5, bias=t["bias"],
                          backend=backend, **kw)


def _leaves(kind):
    t = make()
    t["magnitude"] = torch.rand(N, device=DEV) + 0.5
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        t[k].requires_grad_()
    return t


KINDS = ["lora", "dora", "qlora", "group"]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_is_a_clear_error(backend, kind, p):
    """Second derivatives through the fused backward raise (never come back None or wrong), whether
    the incoming grad is a constant (``y.sum()``) or itself requires grad."""
    t = _leaves(kind)
    wrt = [t["x"], t["lora_A"], t["lora_B"]]
    for loss in (lambda y: y.sum(), lambda y: (y ** 2).sum()):
        y = _op(kind, backend, t, dropout_p=p, seed=4)
        g = torch.autograd.grad(loss(y), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match="first-order only"):
            torch.autograd.grad(sum((v ** 2).sum() for v in g), wrt, allow_unused=True)
        y = _op(kind, backend, t, dropout_p=p, seed=4)
        g = torch.autograd.grad(loss(y), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match="first-order only"):
            sum((v ** 2).sum() for v in g).backward()
    # without create_graph nothing changes: the grads are plain tensors
    y = _op(kind, backend, t, dropout_p=p, seed=4)
    assert not any(v.requires_grad for v in torch.autograd.grad(y.sum(), wrt))
    assert "backend='reference'" in DOUBLE_BACKWARD_ERROR


def test_reference_backend_has_second_derivatives():
    """The way out the error names: backend='reference' is plain PyTorch, so double backward is exact
    (checked with gradgradcheck in float64)."""
    t = {k: v.double() for k, v in make(M=3, K=4, N=3, R=2).items()}
    args = [t[k].requires_grad_() for k in ("x", "lora_A", "lora_B", "bias")]
    fn = lambda x, A, B, b: rk.lora_linear(x, t["weight"], A, B, 0.7, bias=b, backend="reference")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind, changed", [(k, c) for k in KINDS for c in ("x", "weight", "lora_A", "lora_B")
                                           if not (k == "qlora" and c == "weight")])  # 4-bit: a quantized copy
def test_in_place_change_after_forward_is_torchs_version_error(backend, kind, changed):
    """x (a view of it is saved), W, A or B changed in place after forward: torch's own error in backward."""
    t = _leaves(kind)
    t = {k: v.clone() if k == changed else v for k, v in t.items()}  # a non-leaf, so in place is allowed
    y = _op(kind, backend, t, dropout_p=0.3, seed=2)
    with torch.no_grad():
        t[changed].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|has been modified inplace"):
        y.sum().backward()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_twice(backend, kind):
    """Twice without retain_graph: torch's error; with it: the grads add up exactly."""
    t = _leaves(kind)
    y = _op(kind, backend, t, dropout_p=0.3, seed=2)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    once = t["lora_A"].grad.clone()
    t["lora_A"].grad = None
    y = _op(kind, backend, t, dropout_p=0.3, seed=2)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    torch.testing.assert_close(t["lora_A"].grad, 2 * once, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Misuse of the rest of the API: a named ValueError/TypeError, nothing changed
# ----------------------------------------------------------------------------------------------
def _x_W_A_B():
    t = make()
    return t["x"], t["weight"], t["lora_A"], t["lora_B"]


def _register_bad(kind):
    def fwd(x2d, W, A, B, b, s, p, seed):
        y = x2d.new_zeros(3)
        return y if kind == "autograd" else (y, x2d.new_zeros(x2d.shape[0], A.shape[0]), seed.clone())
    rk.register_backend("bad_shape", fwd, None if kind == "autograd" else (lambda *a: (None,) * 4),
                        devices=("cpu", "cuda"), dtypes=(torch.float32,))
    try:
        x, W, A, B = _x_W_A_B()
        rk.lora_linear(x, W, A, B, 1.0, backend="bad_shape")
    finally:
        rk.unregister_backend("bad_shape")


MISUSE = [
    ("x a list", lambda: rk.lora_linear(_x_W_A_B()[0].tolist(), *_x_W_A_B()[1:], 1.0), TypeError,
     r"x must be a torch.Tensor, got list"),
    ("x a numpy array", lambda: rk.lora_linear(_x_W_A_B()[0].cpu().numpy(), *_x_W_A_B()[1:], 1.0), TypeError,
     r"x must be a torch.Tensor, got ndarray"),
    ("x a list under autocast", lambda: _under_autocast(lambda: rk.lora_linear(_x_W_A_B()[0].tolist(), *_x_W_A_B()[1:], 1.0)),
     TypeError, r"x must be a torch.Tensor"),
    ("group: x a list", lambda: rk.lora_linear_group(_x_W_A_B()[0].tolist(), *([t] for t in _x_W_A_B()[1:]), 1.0),
     TypeError, r"x must be a torch.Tensor, got list"),
    ("group: lora_A a list", lambda: rk.lora_linear_group(_x_W_A_B()[0], [_x_W_A_B()[1]], [[[0.0] * K] * R],
                                                          [_x_W_A_B()[3]], 1.0), TypeError, r"lora_As\[0\] must be a torch.Tensor"),
    ("bias a list", lambda: rk.lora_linear(*_x_W_A_B(), 1.0, bias=[0.0] * N), TypeError, r"bias must be a torch.Tensor"),
    ("rslora_scaling alpha str", lambda: rk.rslora_scaling("16", 4), TypeError, r"alpha must be a real number, got str"),
    ("lora_scaling alpha None", lambda: rk.lora_scaling(None, 4), TypeError, r"alpha must be a real number, got NoneType"),
    ("rslora_scaling alpha tensor", lambda: rk.rslora_scaling(torch.tensor(16.0), 4), TypeError, r"alpha must be a real number"),
    ("rslora_scaling alpha nan", lambda: rk.rslora_scaling(math.nan, 4), ValueError, r"alpha must be finite"),
    ("rslora_scaling r float", lambda: rk.rslora_scaling(16, 4.0), ValueError, r"r must be an integer >= 1"),
    ("LoRALinear alpha str", lambda: rk.LoRALinear(8, 6, 4, "16"), TypeError, r"alpha must be a real number"),
    ("LoRALinear alpha 'abc'", lambda: rk.LoRALinear(8, 6, 4, "abc"), TypeError, r"alpha must be a real number"),
    ("LoRALinear in_features -1", lambda: rk.LoRALinear(-1, 6, 4, 8), ValueError, r"in_features must be an integer >= 0"),
    ("LoRALinear out_features 2.5", lambda: rk.LoRALinear(8, 2.5, 4, 8), ValueError, r"out_features must be an integer"),
    ("LoRALinear r 0", lambda: rk.LoRALinear(8, 6, 0, 8), ValueError, r"r must be an integer >= 1"),
    ("LoRALinear dropout 1", lambda: rk.LoRALinear(8, 6, 4, 8, dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
    ("LoRALinear backend", lambda: rk.LoRALinear(8, 6, 4, 8, backend="fast"), ValueError, r"backend must be one of"),
    ("LoRALinear device junk", lambda: rk.LoRALinear(8, 6, 4, 8, device="gpu0"), ValueError, r"device must be a torch.device"),
    ("LoRALinear base_layer sizes", lambda: rk.LoRALinear(8, 6, 4, 8, base_layer=nn.Linear(8, 5)), ValueError,
     r"base_layer is 8 -> 5 but in_features, out_features = 8, 6"),
    ("LoRALinear base_layer not linear", lambda: rk.LoRALinear(8, 6, 4, 8, base_layer=nn.Conv1d(8, 6, 1)), TypeError,
     r"base_layer must be an nn.Linear"),
    ("from_linear not linear", lambda: rk.LoRALinear.from_linear(nn.Identity(), 4, 8), TypeError,
     r"linear must be an nn.Linear, got Identity"),
    ("dropout_mask meta", lambda: rk.dropout_mask(0, (4, 8), 0.1, device="meta"), ValueError, r"device must be 'cpu'.*got 'meta'"),
    ("registered backend: y of a wrong shape", lambda: _register_bad("fused"), ValueError,
     r"backend 'bad_shape' returned y of shape \[3\]; expected \[5, 6\]"),
    ("autograd backend: y of a wrong shape", lambda: _register_bad("autograd"), ValueError,
     r"backend 'bad_shape' returned y of shape \[3\]; expected \[5, 6\]"),
]
if not torch.cuda.is_available():
    MISUSE += [
        ("dropout_mask cuda without CUDA", lambda: rk.dropout_mask(0, (4, 8), 0.1, device="cuda"), ValueError,
         r"device must be 'cpu' or an available 'cuda' device.*got 'cuda'"),
        ("LoRALinear cuda without CUDA", lambda: rk.LoRALinear(8, 6, 4, 8, device="cuda"), ValueError,
         r"device='cuda' but CUDA is not available"),
    ]


def _under_autocast(fn):
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("what, fn, exc, message", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_is_a_named_error(what, fn, exc, message):
    with pytest.raises(exc, match=message):
        fn()


def test_alpha_accepts_real_numbers():
    assert rk.rslora_scaling(np.float32(16.0), 4) == 8.0  # numpy scalars are real numbers
    assert rk.LoRALinear(8, 6, 4, 16).scaling == 8.0


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)


INJECT_MISUSE = [
    ("r 0", dict(r=0), ValueError, r"r must be an integer >= 1"),
    ("dropout 1", dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
    ("alpha str", dict(alpha="8"), TypeError, r"alpha must be a real number"),
    ("backend", dict(backend="nope"), ValueError, r"backend must be one of"),
    ("no match", dict(target_modules=["k_proj"]), ValueError, r"no module of the model matches"),
    ("not a linear", dict(target_modules=["q_proj", "norm"]), TypeError, r"target module 'norm' is a LayerNorm"),
    ("target_modules empty", dict(target_modules=[]), TypeError, r"target_modules must be a regex string"),
]


@pytest.mark.parametrize("what, kw, exc, message", INJECT_MISUSE, ids=[m[0] for m in INJECT_MISUSE])
def test_inject_misuse_leaves_the_model_untouched(what, kw, exc, message):
    model = _Model()
    before = copy.deepcopy(model)
    args = dict(target_modules=["q_proj", "v_proj"], r=2, alpha=4.0)
    args.update(kw)
    with pytest.raises(exc, match=message):
        rk.inject(model, **args)
    assert all(p.requires_grad for p in model.parameters()), f"{what}: inject froze the model before failing"
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        rk.inject(None, ["q_proj"], 2, 4.0)


def test_layer_misuse_leaves_the_base_untouched():
    base = nn.Linear(8, 6)
    for kw in (dict(alpha="x"), dict(dropout=2.0), dict(backend="nope")):
        args = dict(r=2, alpha=4.0)
        args.update(kw)
        with pytest.raises((TypeError, ValueError)):
            rk.LoRALinear.from_linear(base, **args)
        assert base.weight.requires_grad and base.bias.requires_grad


def test_peft_patch_misuse():
    pytest.importorskip("peft")
    with pytest.raises(TypeError, match=r"peft_model must be an nn.Module \(a PeftModel\), got NoneType"):
        rk.peft.patch(None)
    with pytest.raises(TypeError, match=r"peft_model must be an nn.Module"):
        rk.peft.unpatch(None)
    with pytest.warns(UserWarning, match=r"no PEFT LoRA layers found in the Linear passed as peft_model"):
        assert rk.peft.patch(nn.Linear(3, 3)) == 0
    with pytest.raises(ValueError, match=r"backend must be one of"):
        rk.peft.patch(nn.Linear(3, 3), backend="nope")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rk.peft.unpatch(nn.Linear(3, 3)) == 0  # nothing to restore is not an error
