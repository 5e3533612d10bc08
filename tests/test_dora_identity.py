"""A fresh DoRA adapter (B = 0, magnitude = PEFT's initial row norms) is the identity bit for bit,
as PEFT's is: the row norm at B = 0 equals the magnitude exactly (g = 1), on every backend, and the
output is the base layer's (``torch.equal``). PEFT's own test_lora_use_dora_linear needs this."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rslora_kernels as rk
from rslora_kernels.ops.dora import clear_norm_cache, dora_row_norms

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fresh(M, K, N, r, dtype, adapter_dtype, seed, bias=True):
    """x, W, b in ``dtype``; adapters with B = 0 (PEFT's init) and PEFT's initial magnitude: the
    norms of ``W + s B A`` in the adapters' dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    W = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    A = (torch.randn(r, K, generator=g) * K ** -0.5).to(DEV, adapter_dtype)
    B = torch.zeros(N, r, device=DEV, dtype=adapter_dtype)
    m = torch.linalg.norm(W.to(adapter_dtype) + 0.5 * (B @ A), dim=1)
    return x, W, b, A, B, m


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_norm_at_b0_is_peft_norm(dtype):
    clear_norm_cache()
    W = torch.randn(37, 53, dtype=dtype, device=DEV)
    A = torch.randn(5, 53, dtype=torch.promote_types(dtype, torch.float32), device=DEV)
    B = torch.zeros(37, 5, dtype=A.dtype, device=DEV)
    for adapters in (A, B), (A.to(dtype), B.to(dtype)):  # fp32 adapters (PEFT's default) and W's dtype
        got = dora_row_norms(W, *adapters, 1.3)
        assert torch.equal(got, torch.linalg.norm(W.to(adapters[0].dtype), dim=1).to(got.dtype))


@pytest.mark.parametrize("backend", ["composite", "reference", "triton"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fresh_dora_is_the_base_layer(backend, dtype, adapter_dtype, p, bias):
    x, W, b, A, B, m = _fresh(23, 40, 18, 4, dtype, adapter_dtype, seed=3, bias=bias)
    y = rk.dora_linear(x, W, A, B, m, 0.5, bias=b, dropout_p=p, seed=9, backend=backend)
    # the backend's own LoRA op at B = 0: its base GEMM with the bias (for composite and reference torch's)
    y_lora = rk.lora_linear(x, W, A, B, 0.5, bias=b, dropout_p=p, seed=9, backend=backend)
    if backend == "triton" and p > 0 and DEV.type == "cuda":
        # DoRA's dropout launch has its own tiles on a GPU (its own summation order): g = 1 is what
        # makes it the identity, checked through the norm above; here within fp32 accumulation
        torch.testing.assert_close(y, y_lora)
    else:
        assert torch.equal(y, y_lora)
    if backend != "triton":
        assert torch.equal(y, F.linear(x, W, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fresh_layer_is_the_base_layer(dtype):
    torch.manual_seed(0)
    layer = rk.LoRALinear(24, 16, 4, 8.0, use_dora=True, backend="composite", dtype=dtype, adapter_dtype=torch.float32)
    x = torch.randn(5, 24, dtype=dtype)
    assert torch.equal(layer(x), layer.base_layer(x))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


# PEFT's DoRA is the identity at init where the magnitude's norm and the forward's norm are taken in
# one dtype: an fp32 model, or adapters kept in the model's dtype (autocast_adapter_dtype=False). A
# bf16 model with fp32 adapters is not (its magnitude is the bf16 norm, its forward's the fp32 one)
@pytest.mark.parametrize("dtype, autocast_adapter_dtype", [(torch.float32, True), (torch.bfloat16, False)], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_peft_dora_at_init_is_the_base_model(dtype, autocast_adapter_dtype, dropout):
    """PEFT's test_lora_use_dora_linear, exactly: the patched DoRA model at init gives the base
    model's output, as PEFT's unpatched model does (checked first)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _MLP().to(dtype)
    x = torch.randn(6, 10, dtype=dtype)
    with torch.no_grad():
        y_base = base(x)
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["lin0", "lin1"], use_dora=True,
                                                          lora_dropout=dropout),
                                    autocast_adapter_dtype=autocast_adapter_dtype)
        model.eval()
        assert torch.equal(model(x), y_base)  # PEFT's own identity (the premise)
        assert rk.peft.patch(model) == 2
        assert torch.equal(model(x), y_base)
