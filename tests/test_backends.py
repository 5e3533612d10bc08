"""The backend registry: the one list of backends, "auto" resolved before validation, and a
backend added with ``rk.register_backend`` working end to end (op, layer, inject, gradients)."""
import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.ops.composite import composite_backward, composite_forward
from rslora_kernels.ops.lora_linear import resolve_backend

CUDA = torch.device("cuda")  # a device object only: resolving never touches the GPU
CPU = torch.device("cpu")


@pytest.fixture
def toy():
    """Registers "mine": the composite backend wrapped with call counters, fp32/fp64 on the CPU."""
    calls = {"forward": 0, "backward": 0}

    def forward(*args):
        calls["forward"] += 1
        return composite_forward(*args)

    def backward(*args):
        calls["backward"] += 1
        return composite_backward(*args)

    rk.register_backend("mine", forward, backward, devices=("cpu",), dtypes=(torch.float32, torch.float64))
    yield calls
    rk.unregister_backend("mine")


def _inputs(M=23, K=19, N=13, r=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(M * K + r)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, W, A, B, b)]


def _forward_backward(backend, x, W, A, B, b, p=0.2, seed=7):
    leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate((x, W, A, B, b))]
    x, W, A, B, b = leaves
    if backend == "oracle":  # the reference with the kernels' mask, in the inputs' dtype
        mask = rk.dropout_mask(seed, x.shape, p)
        y = rk.reference.lora_linear(x, W, A, B, 0.8, b, p, mask)
    else:
        y = rk.lora_linear(x, W, A, B, 0.8, bias=b, dropout_p=p, seed=seed, backend=backend)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    y.backward(g)
    return [y] + [t.grad for t in (x, A, B, b)]


# ----------------------------------------------------------------------------------------------
# a registered toy backend, end to end
# ----------------------------------------------------------------------------------------------
def test_toy_backend_runs_through_lora_linear(toy):
    assert "mine" in rk.registered_backends()
    inputs = _inputs()
    got = _forward_backward("mine", *inputs)
    assert toy == {"forward": 1, "backward": 1}
    oracle = _forward_backward("oracle", *(t.double() for t in inputs))
    same = _forward_backward("oracle", *inputs)
    for name, g, o, s in zip(["y", "dx", "dA", "dB", "db"], got, oracle, same):
        assert_close_to_oracle(name, g, o, s)


def test_toy_backend_in_layer_and_inject(toy):
    torch.manual_seed(0)
    layer = rk.LoRALinear(19, 13, r=3, alpha=4.0, backend="mine")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 19, requires_grad=True)
    layer(x).square().sum().backward()
    assert toy == {"forward": 1, "backward": 1}
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, layer.lora_A.weight, layer.lora_B.weight))
    model = rk.inject(torch.nn.Sequential(torch.nn.Linear(19, 7), torch.nn.Linear(7, 5)), ["0", "1"], r=2, alpha=1.0,
                      backend="mine")
    model(x).sum().backward()
    assert toy == {"forward": 3, "backward": 3}


def test_toy_backend_declared_dtypes_and_devices(toy):
    x, W, A, B, b = _inputs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"backend='mine' needs x in float32, float64, got torch.bfloat16"):
        rk.lora_linear(x, W, A, B, 1.0, backend="mine")
    x, W, A, B, b = _inputs()
    with pytest.raises(ValueError, match=r"backend='mine' cannot run on meta tensors"):
        rk.lora_linear(*(t.to("meta") for t in (x, W, A, B)), 1.0, backend="mine")
    with pytest.raises(ValueError, match=r"backend='mine' cannot run on cuda"):
        resolve_backend("mine", CUDA, torch.float32)
    assert toy == {"forward": 0, "backward": 0}


def test_autograd_backend(toy):
    """``backward=None``: forward is plain PyTorch, differentiated by autograd (as "reference")."""
    calls = []
    reference = rk.registered_backends()["reference"]
    rk.register_backend("mine_autograd", lambda *a: calls.append(1) or reference.forward(*a), None,
                        devices=("cpu",), dtypes=(torch.float32,))
    try:
        inputs = _inputs()
        got = _forward_backward("mine_autograd", *inputs)
        want = _forward_backward("reference", *inputs)
        assert calls == [1]
        for g, w in zip(got, want):
            assert torch.equal(g, w)  # the same PyTorch ops in the same order
    finally:
        rk.unregister_backend("mine_autograd")


def test_unknown_and_unregistered_names():
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'composite', 'reference', 'triton'\]"):
        rk.lora_linear(*_inputs()[:4], 1.0, backend="mine")
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.LoRALinear(4, 4, r=1, alpha=1.0, backend="mine")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.inject(model, ["0"], r=1, alpha=1.0, backend="mine")
    assert type(model[0]) is torch.nn.Linear and model[0].weight.requires_grad  # untouched
    rk.register_backend("mine", composite_forward, composite_backward, devices=("cpu",), dtypes=(torch.float32,))
    assert isinstance(rk.LoRALinear(4, 4, r=1, alpha=1.0, backend="mine"), rk.LoRALinear)
    rk.unregister_backend("mine")
    with pytest.raises(ValueError, match="got 'mine'"):
        rk.LoRALinear(4, 4, r=1, alpha=1.0, backend="mine")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(name="auto"), ValueError, "other than 'auto'"),
    (dict(name="triton"), ValueError, "already registered"),
    (dict(dtypes=(torch.int32,)), TypeError, "dtypes must be floating torch dtypes"),
    (dict(dtypes=()), TypeError, "dtypes must be floating torch dtypes"),
    (dict(devices="cpu"), TypeError, "devices must be device-type strings"),
    (dict(forward=None), TypeError, "forward must be callable"),
])
def test_register_backend_rejects_bad_declarations(kwargs, exc, match):
    args = dict(name="bad", forward=composite_forward, backward=composite_backward, devices=("cpu",),
                dtypes=(torch.float32,)) | kwargs
    with pytest.raises(exc, match=match):
        rk.register_backend(args.pop("name"), args.pop("forward"), args.pop("backward"), **args)
    assert "bad" not in rk.registered_backends()


# ----------------------------------------------------------------------------------------------
# "auto", resolved before the backend's dtypes are checked
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_auto_on_cuda_kernel_dtypes_is_composite_unless_measured(dtype):
    """Without a measurement for this GPU and shape, "auto" on CUDA runs composite; where the GPU's
    tuning table measured triton faster it runs triton (tests/test_tuning.py, with fake tables)."""
    assert resolve_backend("auto", CUDA, dtype, torch.float32) == "composite"


def test_auto_on_cuda_float64_is_composite_or_reference():
    """float64 is not a kernel dtype: "auto" must not pick triton (it used to, then fail with a KeyError)."""
    assert resolve_backend("auto", CUDA, torch.float64, torch.float64) == "composite"
    composite = rk.unregister_backend("composite")
    try:
        assert resolve_backend("auto", CUDA, torch.float64, torch.float64) == "reference"
    finally:
        rk.register_backend("composite", composite.forward, composite.backward, devices=composite.devices,
                            dtypes=composite.dtypes, mask_state_like=composite.mask_state_like)
    assert rk.registered_backends()["composite"] == composite
    with pytest.raises(TypeError, match=r"backend='triton' needs x in float16, bfloat16, float32, got torch.float64"):
        resolve_backend("triton", CUDA, torch.float64)
    # float64 adapters next to fp32 x: not the kernels' either
    assert resolve_backend("auto", CUDA, torch.float32, torch.float64) == "composite"
    with pytest.raises(TypeError, match=r"backend='triton' needs lora_A/lora_B in .*, got torch.float64"):
        resolve_backend("triton", CUDA, torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_auto_on_cpu_is_composite(dtype):
    assert resolve_backend("auto", CPU, dtype, dtype) == "composite"


def test_auto_with_float64_runs_end_to_end():
    """float64 under "auto": the resolved backend computes it (CPU here: composite); on the meta
    device, where only the reference runs, the reference."""
    inputs = _inputs(dtype=torch.float64)
    got = _forward_backward("auto", *inputs)
    want = _forward_backward("oracle", *inputs)
    for name, g, w in zip(["y", "dx", "dA", "dB", "db"], got, want):
        assert_close_to_oracle(name, g, w, w)
    x, W, A, B, b = (t.to("meta") for t in inputs)
    assert resolve_backend("auto", x.device, x.dtype, A.dtype) == "reference"
    y = rk.lora_linear(x, W, A, B, 0.5, bias=b, backend="auto")
    assert y.device.type == "meta" and y.shape == (23, 13) and y.dtype == torch.float64
