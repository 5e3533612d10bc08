"""LoRALinear (init, forward, dropout, merge/unmerge, state_dict) and inject()."""
import copy
import math

import pytest
import torch
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.dropout import draw_seed
from rslora_kernels.ops import merge as merge_mod
from rslora_kernels.ops.merge import merge_lora_

# fused backends to exercise: "triton" (interpreter on CPU) and "auto"
FUSED = ["triton", "auto"]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_test_device():
    """Modules and tensors of these tests are created on the test device (cuda when present)."""
    with torch.device(DEV):
        yield


def _layer(K=37, N=29, r=5, alpha=8.0, dropout=0.0, bias=True, dtype=torch.float32, backend="triton", device=None):
    layer = rk.LoRALinear(K, N, r, alpha, dropout=dropout, bias=bias, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():  # a non-zero B, so the adapter matters
        layer.lora_B.weight.normal_(0, 0.2)
    return layer


def _ref(layer, x, mask=None, dtype=torch.float64):
    """The reference of what ``layer`` computes (adapter unmerged), everything cast to ``dtype``:
    float64 for the oracle, the layer's dtype for PyTorch's same-dtype result."""
    b = layer.base_layer.bias
    return rk.reference.lora_linear(
        x.to(dtype), layer.base_layer.weight.to(dtype), layer.lora_A.weight.to(dtype), layer.lora_B.weight.to(dtype),
        layer.scaling, None if b is None else b.to(dtype), layer.dropout if mask is not None else 0.0, mask)


def _ulp(t):
    """Spacing of t's dtype at |t| (distance to the next representable value above), as float64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


# ----------------------------------------------------------------------------------------------
# construction, init, names
# ----------------------------------------------------------------------------------------------
def test_init_names_and_scaling():
    layer = rk.LoRALinear(37, 29, r=4, alpha=8.0)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 37) and layer.lora_B.weight.shape == (29, 4)
    assert layer.scaling == 8.0 / 2.0  # alpha / sqrt(r), exact for r = 4
    assert rk.LoRALinear(37, 29, r=4, alpha=8.0, rank_stabilized=False).scaling == 2.0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    # kaiming-uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(37)
    text = repr(layer)
    assert "r=4" in text and "alpha=8.0" in text and "alpha/sqrt(r)" in text and "scaling=4" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must"), (dict(backend="cuda"), "backend"), (dict(r=2.0), "r must"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_bad_constructor_args(kwargs, match):
    args = dict(in_features=8, out_features=8, r=2, alpha=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        rk.LoRALinear(**args)


def test_from_linear_shares_and_freezes_weights():
    lin = nn.Linear(19, 23, bias=False, dtype=torch.float64)
    layer = rk.LoRALinear.from_linear(lin, r=3, alpha=2.0, adapter_dtype=torch.float32)
    assert layer.base_layer is lin and not lin.weight.requires_grad
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        rk.LoRALinear.from_linear(nn.Conv1d(3, 3, 1), r=2, alpha=1.0)


@pytest.mark.parametrize("backend", FUSED)
def test_fresh_layer_equals_base(backend):
    lin = nn.Linear(37, 29)
    layer = rk.LoRALinear.from_linear(lin, r=4, alpha=16.0, backend=backend)
    x = torch.randn(3, 5, 37)
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_close_to_oracle("y", layer(x), want, lin(x))


# ----------------------------------------------------------------------------------------------
# forward / backward against the float64 reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_reference(backend, bias):
    torch.manual_seed(0)
    layer = _layer(bias=bias, backend=backend)
    x = torch.randn(2, 7, 37, requires_grad=True)
    dy = torch.randn(2, 7, 29)
    y = layer(x)
    y.backward(dy)

    def reference(dtype):  # y, dx, dA, dB of the reference with everything in dtype
        x_, A, B = (t.detach().to(dtype).requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight))
        b = layer.base_layer.bias
        y_ = rk.reference.lora_linear(x_, layer.base_layer.weight.to(dtype), A, B, layer.scaling,
                                      None if b is None else b.to(dtype))
        y_.backward(dy.to(dtype))
        return y_, x_.grad, A.grad, B.grad

    got = (y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for name, g, o, t in zip(["y", "dx", "dA", "dB"], got, reference(torch.float64), reference(torch.float32)):
        assert_close_to_oracle(name, g, o, t)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_uses_the_project_mask(backend):
    """Train mode: the mask is rk.dropout_mask of the seed drawn from torch's generator; eval: no dropout."""
    layer = _layer(dropout=0.3, backend=backend)
    x = torch.randn(4, 6, 37)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    seed = draw_seed(DEV)  # the draw lora_linear makes for seed=None
    mask = rk.dropout_mask(seed, x.shape, 0.3, DEV)
    assert 0 < mask.float().mean() < 1
    assert_close_to_oracle("y(train)", y, _ref(layer, x, mask), _ref(layer, x, mask, torch.float32))
    torch.manual_seed(124)
    assert not torch.equal(layer(x), y)  # another seed, another mask
    layer.eval()
    assert_close_to_oracle("y(eval)", layer(x), _ref(layer, x), _ref(layer, x, dtype=torch.float32))


@pytest.mark.parametrize("backend", FUSED)
def test_bf16_base_with_fp32_adapters(backend):
    """PEFT's layout: bf16 base, fp32 adapters. Error against float64 <= 2x PyTorch's bf16 path + floor."""
    torch.manual_seed(5)
    lin = nn.Linear(45, 38, dtype=torch.bfloat16)
    layer = rk.LoRALinear.from_linear(lin, r=6, alpha=12.0, adapter_dtype=torch.float32, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(3, 9, 45, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y_torch = lin(x) + layer.scaling * layer.lora_B(layer.lora_A(x.float())).to(torch.bfloat16)
    assert_close_to_oracle("y", y, _ref(layer, x), y_torch)


# ----------------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------------
def _merge_paths(monkeypatch, path):
    if path == "torch":  # as on a CPU without the Triton interpreter
        monkeypatch.setattr(merge_mod, "triton_available_for", lambda device: False)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K, r, transposed", [(70, 45, 3, False), (33, 130, 40, True)])
def test_merge_one_rounding_and_unmerge_round_trip(monkeypatch, path, dtype, N, K, r, transposed):
    _merge_paths(monkeypatch, path)
    torch.manual_seed(1)
    W0 = torch.randn(K, N).t() if transposed else torch.randn(N, K)  # transposed: a fan_in_fan_out view
    W0 = W0.to(dtype)
    A = torch.randn(r, K) / math.sqrt(K)
    B = torch.randn(N, r)  # fp32 adapters next to a low-precision W, as PEFT keeps them
    s = 0.7
    W = W0.clone() if not transposed else W0.t().clone().t()
    ptr, version = W.data_ptr(), W._version
    merge_lora_(W, A, B, s)
    assert W.data_ptr() == ptr and W.stride() == W0.stride() and W._version > version  # in place
    exact = W0.double() + s * (B.double() @ A.double())
    # fp32 arithmetic error bound, then one rounding to W's dtype (half an ulp)
    arith = 4 * torch.finfo(torch.float32).eps * (W0.double().abs() + s * (B.double().abs() @ A.double().abs()))
    err = (W.double() - exact).abs()
    bound = 0.5 * _ulp(W) + arith
    assert torch.isfinite(W).all() and (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    W1 = W.clone()
    merge_lora_(W, A, B, s, sign=-1.0)
    # unmerge: back to W0 within one rounding step per element
    back = (W.double() - W0.double()).abs()
    step = _ulp(torch.maximum(W0.abs(), W1.abs())) + 2 * arith
    assert (back <= step).all(), f"max excess {(back - step).max().item()}"


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_forward_equals_unmerged(monkeypatch, path, dtype):
    _merge_paths(monkeypatch, path)
    torch.manual_seed(2)
    layer = _layer(K=45, N=38, r=6, dtype=dtype, dropout=0.2).eval()
    x = torch.randn(3, 11, 45, dtype=dtype)
    y_unmerged = layer(x)
    W0 = layer.base_layer.weight.clone()
    oracle = _ref(layer, x)
    assert_close_to_oracle("y(unmerged)", y_unmerged, oracle, _ref(layer, x, dtype=dtype))
    delta = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)  # PyTorch's merge, in dtype
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    y_merged = layer(x)
    assert torch.equal(y_merged, torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias))
    y_torch = torch.nn.functional.linear(x, W0 + delta, layer.base_layer.bias)
    assert_close_to_oracle("y(merged)", y_merged, oracle, y_torch)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close_to_oracle("W(unmerged)", layer.base_layer.weight, W0.double(), (W0 + delta) - delta)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_float64_and_bad_args():
    W = torch.randn(9, 7, dtype=torch.float64)
    A, B = torch.randn(2, 7, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    want = W + 0.5 * B @ A  # float64 is the oracle's dtype: PyTorch's result is the oracle itself
    assert_close_to_oracle("W", merge_lora_(W, A, B, 0.5), want, want)
    with pytest.raises(ValueError, match="lora_A"):
        merge_lora_(W, torch.randn(2, 6, dtype=torch.float64), B, 0.5)


# ----------------------------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    a, b = _layer(), rk.LoRALinear(37, 29, r=5, alpha=8.0, backend="triton")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 37)
    assert torch.equal(b(x), a(x))  # the same weights through the same kernels


# ----------------------------------------------------------------------------------------------
# inject
# ----------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.out(self.q_proj(self.norm(x)) * torch.sigmoid(self.v_proj(x)))


def _model():
    torch.manual_seed(3)
    return nn.Sequential(_Block(), _Block(), nn.Linear(16, 5))


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], {"0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"}),
    (["1.out", "2"], {"1.out", "2"}),                # suffix after a dot, or the whole name
    (r"\d\.(q|v)_proj", {"0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"}),  # regex: fullmatch
    (r"1\..*", {"1.q_proj", "1.v_proj", "1.out"}),  # regex matches the LayerNorm too -> TypeError below
])
def test_inject_matching(targets, expected):
    model = _model()
    if targets == r"1\..*":
        with pytest.raises(TypeError, match="1.norm"):
            rk.inject(model, targets, r=2, alpha=4.0)
        return
    x = torch.randn(3, 16)
    y0 = model(x)
    y64 = copy.deepcopy(model).double()(x.double())
    out = rk.inject(model, targets, r=2, alpha=4.0, dropout=0.1, backend="triton")
    assert out is model
    got = {n for n, m in model.named_modules() if isinstance(m, rk.LoRALinear)}
    assert got == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in expected for ab in "AB"}
    assert_close_to_oracle("y", model.eval()(x), y64, y0)  # B = 0 at init: the base model's output


def test_inject_suffix_is_not_substring_and_errors():
    model = _model()
    with pytest.raises(ValueError, match="no module"):
        rk.inject(model, ["proj"], r=2, alpha=4.0)  # "q_proj" ends with "proj" but not ".proj"
    with pytest.raises(ValueError, match="no module"):
        rk.inject(model, r"q_proj", r=2, alpha=4.0)  # a regex must match the whole name
    rk.inject(model, ["q_proj"], r=2, alpha=4.0)
    with pytest.raises(ValueError, match="already"):
        rk.inject(model, ["q_proj"], r=2, alpha=4.0)
    with pytest.raises(ValueError, match="no module"):  # an adapter's own linears are not targets
        rk.inject(model, ["lora_A", "base_layer"], r=2, alpha=4.0)


def test_injected_model_trains():
    torch.manual_seed(4)
    model = rk.inject(_model(), ["q_proj", "v_proj", "out"], r=4, alpha=8.0, backend="triton")
    x, target = torch.randn(32, 16), torch.randn(32, 5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
