"""Bad input gets a clear ValueError/TypeError naming the argument, before any kernel runs."""
import math

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels._launch import clear_launch_cache


@pytest.fixture
def no_launch():
    """Make any launch of the Triton backend fail loudly: errors must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched despite invalid input")
    triton = rk.registered_backends()["triton"]
    declared = dict(devices=triton.devices, dtypes=triton.dtypes, mask_state_like=triton.mask_state_like)
    rk.register_backend("triton", boom, boom, **declared, replace=True)
    yield
    rk.register_backend("triton", triton.forward, triton.backward, **declared, replace=True)
    assert rk.registered_backends()["triton"] == triton


def good(M=6, K=10, N=8, r=4, dtype=torch.float32):
    return dict(x=torch.randn(M, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                lora_A=torch.randn(r, K, dtype=dtype), lora_B=torch.randn(N, r, dtype=dtype),
                scaling=1.0, bias=torch.randn(N, dtype=dtype))


def call(**kw):
    args = good()
    args.update(kw)
    backend = args.pop("backend", "triton")
    return rk.lora_linear(args.pop("x"), args.pop("weight"), args.pop("lora_A"), args.pop("lora_B"),
                          args.pop("scaling"), backend=backend, **args)


CASES = [
    ("K of weight", dict(weight=torch.randn(8, 11)), ValueError, r"weight must have shape \[N, K\] with K = x.shape\[-1\] = 10"),
    ("K of lora_A", dict(lora_A=torch.randn(4, 9)), ValueError, r"lora_A must have shape \[r, K\]"),
    ("N of lora_B", dict(lora_B=torch.randn(7, 4)), ValueError, r"lora_B must have shape \[N, r\] = \[8, 4\]"),
    ("r of lora_B", dict(lora_B=torch.randn(8, 5)), ValueError, r"lora_B must have shape \[N, r\] = \[8, 4\]"),
    ("bias shape", dict(bias=torch.randn(9)), ValueError, r"bias must have shape \[N\] = \[8\]"),
    ("r = 0", dict(lora_A=torch.randn(0, 10), lora_B=torch.randn(8, 0)), ValueError, r"lora_A must have rank r >= 1"),
    ("weight 1-D", dict(weight=torch.randn(10)), ValueError, r"weight must have shape \[N, K\]"),
    ("x 0-dim", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least one dimension"),
    ("weight dtype", dict(weight=torch.randn(8, 10, dtype=torch.float16)), TypeError, r"weight must have x's dtype torch.float32"),
    ("bias dtype", dict(bias=torch.randn(8, dtype=torch.float16)), TypeError, r"bias must have x's dtype"),
    ("A/B dtypes differ", dict(lora_B=torch.randn(8, 4, dtype=torch.float64)), TypeError, r"lora_B must have lora_A's dtype"),
    ("narrow adapters", dict(lora_A=torch.randn(4, 10, dtype=torch.float16), lora_B=torch.randn(8, 4, dtype=torch.float16)),
     TypeError, r"narrower than x's dtype"),
    ("integer x", dict(x=torch.ones(6, 10, dtype=torch.int32)), TypeError, r"x must be a floating-point tensor"),
    ("not a tensor", dict(lora_A=[[1.0] * 10] * 4), TypeError, r"lora_A must be a torch.Tensor"),
    ("device", dict(lora_B=torch.randn(8, 4, device="meta")), ValueError, r"lora_B is on meta but x is on cpu"),
    ("p < 0", dict(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ("p = 1", dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ("p nan", dict(dropout_p=math.nan), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ("scaling nan", dict(scaling=math.nan), ValueError, r"scaling must be a finite float"),
    ("scaling inf", dict(scaling=math.inf), ValueError, r"scaling must be a finite float"),
    ("scaling tensor", dict(scaling="1.0"), ValueError, r"scaling must be a finite float"),
    ("backend", dict(backend="cuda"), ValueError, r"backend must be one of"),
    ("seed range", dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\^63\)"),
    ("seed type", dict(dropout_p=0.1, seed=1.5), TypeError, r"seed must be an int"),
    ("float64 on triton", {**{k: v.double() for k, v in good().items() if k != "scaling"}}, TypeError,
     r"backend='triton' needs x in float16, bfloat16, float32, got torch.float64"),
    ("float64 adapters on triton", dict(lora_A=torch.randn(4, 10, dtype=torch.float64),
                                        lora_B=torch.randn(8, 4, dtype=torch.float64)), TypeError,
     r"backend='triton' needs lora_A/lora_B in float16, bfloat16, float32, got torch.float64"),
]


@pytest.mark.parametrize("what, kwargs, exc, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_before_launch(what, kwargs, exc, message, no_launch):
    with pytest.raises(exc, match=message):
        call(**kwargs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_launch_cache()  # the environment is read once per call signature (a launch plan)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        call(backend="triton")


def test_reference_requires_mask_with_dropout():
    a = good()
    with pytest.raises(ValueError, match="dropout_mask is required"):
        rk.reference.lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], 1.0, dropout_p=0.2)
    with pytest.raises(ValueError, match="dropout_mask must have x's shape"):
        rk.reference.lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], 1.0, dropout_p=0.2,
                                 dropout_mask=torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("fn, want", [(rk.rslora_scaling, 16 / 8), (rk.lora_scaling, 16 / 64)],
                         ids=["rslora", "lora"])
def test_scaling_functions(fn, want):
    assert fn(16, 64) == want  # alpha / sqrt(r) = 16 / 8 and alpha / r = 16 / 64, both exact in binary
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        fn(16, 0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        fn(math.inf, 8)


def test_dropout_mask_arguments():
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        rk.dropout_mask(1, (4, 4), 1.5)
    with pytest.raises(ValueError, match="shape must be a non-empty sequence"):
        rk.dropout_mask(1, (), 0.1)
    with pytest.raises(ValueError, match="seed must be in"):
        rk.dropout_mask(2**63, (4, 4), 0.1)


def test_import_does_not_touch_cuda_or_triton():
    """Importing the package must not initialise CUDA or import Triton (kernels load lazily)."""
    import subprocess
    import sys
    code = ("import sys, torch, rslora_kernels; "
            "print(torch.cuda.is_initialized(), 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out
