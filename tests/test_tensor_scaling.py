"""scaling as a 0-d tensor in every entry point (rk.lora_linear, the 4-bit path, rk.dora_linear,
rk.lora_linear_group, rk.LoRALinear, rk.peft.patch): folded into B at the entry point
(rslora_kernels.scaling.fold_scaling), so the kernels keep a float scale.

Results and every gradient (scaling's too, when it requires grad) against the float64 oracle by the
numerics rule, the same-dtype PyTorch result being the reference op with the tensor scaling; a new
value in the tensor changes a compiled model's result without a recompile; PEFT's compiled hotswap
flow (prepare_model_for_compiled_hotswap + hotswap_adapter) on a patched model.
"""
import pytest
import torch
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.scaling import fold_scaling

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
S = 0.7  # the scaling's value; the tensor holds it in fp32


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(M, K, N, r, dtype, adapter_dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=DEV, dtype=dt)

    return dict(x=rnd(M, K), weight=rnd(N, K, scale=K ** -0.5), lora_A=rnd(r, K, scale=K ** -0.5, dt=adapter_dtype),
                lora_B=rnd(N, r, scale=r ** -0.5, dt=adapter_dtype), bias=rnd(N) if bias else None)


def _run(fn, t, grads, scaling, dtype=None, dy_seed=5):
    """Forward + backward of ``fn(leaves, scaling)`` with leaves cast to ``dtype`` (if given);
    returns (y, {name: grad}) with scaling's grad as "scaling"."""
    leaves = {k: (v.detach().to(dtype or v.dtype, copy=True).requires_grad_(k in grads) if v is not None else None)
              for k, v in t.items()}
    s = scaling.detach().to(dtype or scaling.dtype, copy=True).requires_grad_() if isinstance(scaling, torch.Tensor) \
        else scaling
    y = fn(leaves, s)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=torch.float64).to(DEV)
    y.backward(dy.to(y.dtype))
    out = {k: leaves[k].grad for k in grads if leaves[k] is not None}
    if isinstance(s, torch.Tensor):
        out["scaling"] = s.grad
    return y, out


DRAWS = 6  # dy draws for the scaling's gradient: one scalar is a sum over M x N products, and the
# same-dtype error of a single such sum is as much luck as rounding; the rule is applied to the six


def _check(what, ours, reference, t, grads):
    """ours(leaves, s) with s a 0-d fp32 tensor against reference(leaves, s) in float64 (oracle) and
    in the inputs' own dtypes (PyTorch's same-dtype result); also against ours with the float."""
    s32 = torch.tensor(S, device=DEV)
    y, g = _run(ours, t, grads, s32)
    y64, g64 = _run(reference, t, grads, s32, torch.float64)
    y_same, g_same = _run(reference, t, grads, s32)
    assert y.dtype == t["x"].dtype
    assert_close_to_oracle(f"{what}: y", y, y64, y_same)
    assert set(g) == set(g64) == set(grads) | {"scaling"}
    for name in grads:
        assert g[name].dtype == t[name].dtype, name
        assert_close_to_oracle(f"{what}: d{name}", g[name], g64[name], g_same[name])
    assert g["scaling"].dtype == s32.dtype and g["scaling"].shape == ()
    ds = [[run(f, t, grads, s32, dt, dy_seed=k)[1]["scaling"] for k in range(DRAWS)]
          for run, f, dt in ((_run, ours, None), (_run, reference, torch.float64), (_run, reference, None))]
    assert_close_to_oracle(f"{what}: dscaling ({DRAWS} draws)", *(torch.stack(d) for d in ds))
    y_float, _ = _run(ours, t, grads, S)  # the float path, same value
    assert_close_to_oracle(f"{what}: y (float scaling)", y_float, y64, y_same)


LORA_GRADS = ("x", "lora_A", "lora_B", "bias")
BACKENDS = ["composite", "reference", "triton"]
CASES = [(torch.float32, torch.float32, 0.0), (torch.bfloat16, torch.float32, 0.2), (torch.float16, torch.float16, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, adapter_dtype, p", CASES, ids=str)
def test_lora_linear(backend, dtype, adapter_dtype, p):
    t = _inputs(67, 48, 40, 5, dtype, adapter_dtype, seed=1)
    mask = rk.dropout_mask(7, (67, 48), p, DEV) if p > 0 else None

    def ours(v, s):
        return rk.lora_linear(v["x"], v["weight"], v["lora_A"], v["lora_B"], s, bias=v["bias"], dropout_p=p, seed=7,
                              backend=backend)

    def reference(v, s):
        return rk.reference.lora_linear(v["x"], v["weight"], v["lora_A"], v["lora_B"], s, v["bias"], p, mask)

    _check(f"lora_linear {backend}", ours, reference, t, LORA_GRADS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, adapter_dtype, p", CASES, ids=str)
def test_dora_linear(backend, dtype, adapter_dtype, p):
    t = _inputs(67, 48, 40, 5, dtype, adapter_dtype, seed=2)
    t["magnitude"] = (torch.linalg.norm(t["weight"].double(), dim=1) * 1.2).to(adapter_dtype)
    mask = rk.dropout_mask(7, (67, 48), p, DEV) if p > 0 else None

    def ours(v, s):
        return rk.dora_linear(v["x"], v["weight"], v["lora_A"], v["lora_B"], v["magnitude"], s, bias=v["bias"],
                              dropout_p=p, seed=7, backend=backend)

    def reference(v, s):
        return rk.reference.dora_linear(v["x"], v["weight"], v["lora_A"], v["lora_B"], v["magnitude"], s, v["bias"],
                                        p, mask)

    _check(f"dora_linear {backend}", ours, reference, t, LORA_GRADS + ("magnitude",))


def test_qlora():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from rslora_kernels.quant import Weight4bit, dequantize_4bit

    t = _inputs(13, 65, 20, 4, torch.float32, torch.float32, seed=3)  # K odd: bitsandbytes' exact CPU path
    packed, qs = bnb_functional.quantize_4bit(t["weight"], blocksize=64, quant_type="nf4")
    w4 = Weight4bit.from_bnb(packed, qs)
    t["weight"] = dequantize_4bit(w4, torch.float32)  # the oracle's W: exactly what the op dequantizes

    def ours(v, s):
        return rk.lora_linear(v["x"], w4, v["lora_A"], v["lora_B"], s, bias=v["bias"], backend="composite")

    def reference(v, s):
        return rk.reference.lora_linear(v["x"], v["weight"], v["lora_A"], v["lora_B"], s, v["bias"])

    _check("qlora", ours, reference, t, LORA_GRADS)


@pytest.mark.parametrize("backend", ["composite", "triton", "reference"])
def test_group_per_member_scalings(backend):
    """Member 0 a tensor, member 1 a float, member 2 another tensor (its own value)."""
    t = _inputs(11, 16, 12, 3, torch.float32, torch.float32, seed=4)
    extra = [_inputs(11, 16, n, r, torch.float32, torch.float32, seed=10 + n) for n, r in ((8, 2), (5, 4))]
    for i, e in enumerate(extra):
        t.update({f"weight{i}": e["weight"], f"lora_A{i}": e["lora_A"], f"lora_B{i}": e["lora_B"]})
    s2 = torch.tensor(1.3, device=DEV)

    def members(v):
        return ([v["weight"], v["weight0"], v["weight1"]], [v["lora_A"], v["lora_A0"], v["lora_A1"]],
                [v["lora_B"], v["lora_B0"], v["lora_B1"]])

    def ours(v, s):
        W, A, B = members(v)
        ys = rk.lora_linear_group(v["x"], W, A, B, [s, 0.4, s2], biases=[v["bias"], None, None], backend=backend)
        return torch.cat(ys, -1)

    def reference(v, s):
        W, A, B = members(v)
        return torch.cat([rk.reference.lora_linear(v["x"], W[i], A[i], B[i], si, b)
                          for i, (si, b) in enumerate(((s, v["bias"]), (0.4, None), (s2.to(v["x"].dtype), None)))], -1)

    grads = ("x", "lora_A", "lora_B", "lora_A0", "lora_B0", "lora_A1", "lora_B1", "bias")
    _check(f"group {backend}", ours, reference, t, grads)


def test_group_one_tensor_for_all():
    t = _inputs(6, 8, 5, 2, torch.float32, torch.float32, seed=6)
    s = torch.tensor(S, device=DEV)
    ys = rk.lora_linear_group(t["x"], [t["weight"]] * 2, [t["lora_A"]] * 2, [t["lora_B"]] * 2, s, backend="composite")
    want = rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], S, backend="composite")
    for y in ys:
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_linear_layer(use_dora):
    """LoRALinear with ``layer.scaling`` replaced by a 0-d tensor: the same as the float; merge reads it."""
    torch.manual_seed(0)
    layer = rk.LoRALinear(12, 10, 4, 8.0, backend="composite", use_dora=use_dora).to(DEV)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 12, device=DEV)
    y_float = layer(x)
    layer.scaling = torch.tensor(layer.scaling, device=DEV)
    y_tensor = layer(x)
    torch.testing.assert_close(y_tensor, y_float)
    with torch.no_grad():
        layer.scaling.mul_(2.0)
    y_doubled = layer(x)
    assert not torch.allclose(y_doubled, y_float)
    layer.merge()  # reads the tensor's (new) value
    torch.testing.assert_close(layer(x), y_doubled)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y_doubled)
    assert "scaling=" in repr(layer)


# ----------------------------------------------------------------------------------------------
# Checks, non-finite values, the float path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling, err, match", [
    (torch.ones(1), ValueError, r"scaling must be a float or a 0-d tensor, got a tensor of shape \[1\]"),
    (torch.ones(2, 2), ValueError, r"scaling must be a float or a 0-d tensor"),
    (torch.tensor(2), TypeError, r"scaling tensor must be floating-point, got torch.int64"),
    (torch.tensor(1.0, device="meta"), ValueError, r"scaling is on meta but x is on"),
])
def test_bad_tensor_scaling(scaling, err, match):
    t = _inputs(3, 4, 5, 2, torch.float32, torch.float32, seed=8)
    m = torch.ones(5, device=DEV)
    with pytest.raises(err, match=match):
        rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling, backend="composite")
    with pytest.raises(err, match=match):
        rk.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], m, scaling, backend="composite")
    with pytest.raises(err, match=match):
        rk.reference.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling)
    with pytest.raises(err, match=match.replace("scaling", r"scalings\[1\]", 1)):
        rk.lora_linear_group(t["x"], [t["weight"]] * 2, [t["lora_A"]] * 2, [t["lora_B"]] * 2, [1.0, scaling],
                             backend="composite")


def test_mismatched_adapters_are_named_not_folded():
    t = _inputs(3, 4, 5, 2, torch.float32, torch.float32, seed=8)
    with pytest.raises(TypeError, match="lora_B must have lora_A's dtype"):
        rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"].double(), torch.tensor(1.0), backend="composite")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("op", ["lora", "dora"])
def test_non_finite_scaling_propagates(op, value):
    """A tensor's value is never read, so NaN/Inf are not rejected: they reach the result as in the
    reference (NaN where it is NaN; non-finite where it is non-finite)."""
    t = _inputs(6, 8, 5, 2, torch.float32, torch.float32, seed=9)
    s = torch.tensor(value, device=DEV)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"])
    m = torch.linalg.norm(t["weight"], dim=1)
    for backend in BACKENDS:
        if op == "lora":
            got = rk.lora_linear(*args, s, bias=t["bias"], backend=backend)
            want = rk.reference.lora_linear(*args, s, t["bias"])
        else:
            got = rk.dora_linear(*args, m, s, bias=t["bias"], backend=backend)
            want = rk.reference.dora_linear(*args, m, s, t["bias"])
        assert not torch.isfinite(want).all()  # the case is real
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), backend
        if value != value:  # NaN: NaN exactly where the reference's is
            assert torch.equal(torch.isnan(got), torch.isnan(want)), backend


def test_fold():
    """A float is returned untouched (no op); a tensor is folded into B in at least fp32, A cast with it."""
    A, B = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(3, 2, dtype=torch.bfloat16)
    x = torch.randn(1, 4, dtype=torch.bfloat16)
    assert fold_scaling(0.5, x, A, B) == (A, B, 0.5) and fold_scaling(0.5, x, A, B)[1] is B
    A2, B2, s = fold_scaling(torch.tensor(0.3), x, A, B)
    assert s == 1.0 and A2.dtype == B2.dtype == torch.float32
    assert torch.equal(A2, A.float()) and torch.equal(B2, B.float() * torch.tensor(0.3))


# ----------------------------------------------------------------------------------------------
# torch.compile: a new value, no recompile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op", ["lora", "dora", "group"])
def test_compiled_value_change_does_not_recompile(compile_backend, op):
    t = _inputs(5, 8, 6, 2, torch.float32, torch.float32, seed=12)
    m = torch.linalg.norm(t["weight"], dim=1) * 1.1
    s = torch.tensor(0.5, device=DEV)

    def f(x, s):
        if op == "lora":
            return rk.lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], s, bias=t["bias"], backend="composite")
        if op == "dora":
            return rk.dora_linear(x, t["weight"], t["lora_A"], t["lora_B"], m, s, bias=t["bias"], backend="composite")
        return torch.cat(rk.lora_linear_group(x, [t["weight"]] * 2, [t["lora_A"]] * 2, [t["lora_B"]] * 2, [s, 0.3],
                                              backend="composite"), -1)

    y0 = f(t["x"], s)  # eager first: the package's per-device shared tensors exist before tracing
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    y1 = compiled(t["x"], s)
    torch.testing.assert_close(y1, y0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        s.fill_(2.0)
        y2 = compiled(t["x"], s)
        y3 = compiled(t["x"], torch.tensor(-1.0, device=DEV))  # another tensor of the same kind
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, f(t["x"], s))
    torch.testing.assert_close(y3, f(t["x"], torch.tensor(-1.0, device=DEV)))


def test_compiled_layer_scaling_tensor():
    """rk.LoRALinear with a tensor scaling, compiled: a value written into it changes the result
    without a recompile."""
    torch.manual_seed(0)
    layer = rk.LoRALinear(12, 10, 4, 8.0, backend="composite").to(DEV)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.scaling = torch.tensor(layer.scaling, device=DEV)
    x = torch.randn(3, 12, device=DEV)
    y1 = layer(x)  # eager first: the package's per-device shared tensors exist before tracing
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        layer.scaling.fill_(-3.0)  # the scaling tensor does not require grad
        y2 = compiled(x)
    torch.testing.assert_close(y2, layer(x))
    assert not torch.allclose(y1, y2)


# ----------------------------------------------------------------------------------------------
# PEFT's compiled hotswap flow on a patched model
# ----------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 16), nn.Linear(16, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _adapter(tmp_path, name, seed, r, alpha, use_dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Tiny()
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"],
                                                      init_lora_weights=False, use_dora=use_dora))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _load(peft, path, x):
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(_Tiny(), path).eval()
    model(x)  # eager first: the package's per-device shared tensors exist before tracing
    return model


@pytest.mark.parametrize("when, compile_backend", [("before", "aot_eager"), ("after", "aot_eager"),
                                                   ("after", "inductor")])
def test_peft_compiled_hotswap(tmp_path, when, compile_backend):
    """Adapter 0 loaded, rk.peft.patch before or after prepare_model_for_compiled_hotswap (which turns
    every layer's scaling into a 0-d tensor), compiled; hotswap_adapter to adapter 1 (another alpha,
    so a new scaling value) changes the result to adapter 1's, without a recompile; PEFT's unpatched
    models give the same results."""
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    path0 = _adapter(tmp_path, "a0", 1, 4, 8, False)
    path1 = _adapter(tmp_path, "a1", 2, 4, 3, False)
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = [_load(peft, path0, x)(x), _load(peft, path1, x)(x)]  # PEFT's own, unpatched
        model = _load(peft, path0, x)
        if when == "before":
            assert rk.peft.patch(model) == 2
        prepare_model_for_compiled_hotswap(model, target_rank=4)
        if when == "after":
            assert rk.peft.patch(model) == 2
        layer = model.base_model.model.lin0
        assert isinstance(layer.scaling["default"], torch.Tensor)
        compiled = torch.compile(model, backend=compile_backend)
        torch.testing.assert_close(compiled(x), expected[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter(model, path1, adapter_name="default")
            assert layer.scaling["default"].item() == pytest.approx(3 / 4)  # alpha / r
            torch.testing.assert_close(compiled(x), expected[1])
            hotswap_adapter(model, path0, adapter_name="default")
            torch.testing.assert_close(compiled(x), expected[0])
    assert rk.peft.is_patched(layer)


def test_peft_compiled_dora_scaling_tensor(tmp_path):
    """DoRA layers after prepare_model_for_compiled_hotswap (PEFT's hotswap itself does not swap DoRA
    adapters): a value written into the scaling tensors, as hotswap writes it, changes the compiled
    patched model's result to PEFT's for that value, without a recompile."""
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    path = _adapter(tmp_path, "d0", 1, 4, 8, True)
    x = torch.randn(3, 10)
    with torch.no_grad():
        ours, theirs = _load(peft, path, x), _load(peft, path, x)
        for m in (ours, theirs):
            prepare_model_for_compiled_hotswap(m, target_rank=4)
        assert rk.peft.patch(ours) == 2
        compiled = torch.compile(ours, backend="aot_eager")
        torch.testing.assert_close(compiled(x), theirs(x))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for m in (ours, theirs):
                for layer in (m.base_model.model.lin0, m.base_model.model.lin1):
                    layer.scaling["default"].fill_(0.25)
            y = compiled(x)
        torch.testing.assert_close(y, theirs(x))
        assert not torch.allclose(y, _load(peft, path, x)(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host synchronization exists only with a GPU")
@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_no_host_sync_on_cuda(where):
    """A tensor scaling on x's GPU or on the CPU: forward and backward issue no synchronizing call
    (torch's sync debug mode raises on one), and the result is the float's."""
    t = _inputs(33, 40, 24, 4, torch.float32, torch.float32, seed=13)
    s = torch.tensor(S, device=where)
    want = rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], S, bias=t["bias"])
    A = t["lora_A"].clone().requires_grad_()
    rk.lora_linear(t["x"], t["weight"], A, t["lora_B"], s, bias=t["bias"]).sum().backward()  # plans made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = rk.lora_linear(t["x"], t["weight"], A, t["lora_B"], s, bias=t["bias"])
        y.sum().backward()
        m = torch.linalg.norm(t["weight"], dim=1)
        rk.dora_linear(t["x"], t["weight"], A, t["lora_B"], m, s, bias=t["bias"]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y, want)
