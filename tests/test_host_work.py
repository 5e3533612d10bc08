"""Host work of a step: the dropout seed never makes a host round trip, and ``benchmarks.host``
(host time per step with the interpreter's launches stubbed) runs and stubs only the launches.

On a CUDA device reading a tensor's value on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``)
waits for the GPU and cannot be captured in a CUDA graph. The seed drawn for dropout stays a device
tensor from ``draw_seed`` to the kernels: here every such read raises while a fused step runs with
its launches stubbed (so that nothing but the package's own host code runs). The GPU-only
tests/test_cuda_graphs.py checks fresh masks per CUDA-graph replay.
"""
import pytest
import torch

import rslora_kernels as rk
from benchmarks import host

from conftest import DEVICE


def _refuse(*args, **kwargs):
    raise AssertionError("a tensor's value was read on the host")


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_seed_stays_on_the_device(monkeypatch, use_dora):
    """The Triton backend runs the same host code here as on CUDA (only the kernels are
    interpreted). The composite backend's CPU path hands the seed to the C++ extension as an int
    (no GPU there to wait for); on CUDA it passes the tensor to a Triton kernel."""
    backend = "triton"
    if DEVICE.type != "cpu":
        pytest.skip("the launches are stubbed at Triton's interpreter")
    torch.manual_seed(0)
    layer = rk.LoRALinear(40, 24, r=4, alpha=8, dropout=0.1, backend=backend, use_dora=use_dora)
    x = torch.randn(6, 40, requires_grad=True)
    dy = torch.randn(6, 24)
    with host.stubbed_interpreter_launches():
        layer(x).backward(dy)  # warm: plans, lazy imports
        for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, _refuse)
        layer(x).backward(dy)
        monkeypatch.undo()
    with pytest.raises(AssertionError, match="read on the host"):  # the patch does catch a read
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", _refuse)
            torch.zeros(()).item()


def test_stub_replaces_only_the_interpreters_execution_and_is_restored():
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run
    layer = rk.LoRALinear(40, 24, r=4, alpha=8, dropout=0.0, backend="triton")
    x = torch.randn(6, 40)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        want = layer(x)
        with host.stubbed_interpreter_launches():
            assert InterpretedFunction.run is not real
            stubbed = layer(x)  # torch.empty outputs, never written
        assert InterpretedFunction.run is real
        assert torch.equal(layer(x), want)  # the same kernels again, the interpreter restored
    assert stubbed.shape == want.shape


def test_host_benchmark_prints_rows_ratios_and_profile(capsys):
    host.main(["--ranks", "3", "--ps", "0.1", "--rounds", "2", "--steps", "2", "--top", "5",
               "--rows", "triton", "composite", "floor", "eager", "dora-triton", "--device", "cpu"])
    out = capsys.readouterr().out
    assert host.STUB_NOTE in out
    for row in ("triton", "composite", "floor", "eager", "dora-triton"):
        assert f"| 3 | 0.1 | {row} |" in out
    assert "| 3 | 0.1 | eager | " in out and " 1.00 |" in out
    assert "cProfile of the triton row" in out and "ncalls" in out


def test_seed_without_dropout_is_one_shared_zero():
    from rslora_kernels.ops.lora_linear import seed_tensor

    a, b = seed_tensor(None, 0.0, DEVICE), seed_tensor(5, 0.0, DEVICE)
    assert a is b and a.dim() == 0 and a.dtype == torch.int64 and int(a) == 0
    assert seed_tensor(None, 0.1, DEVICE) is not seed_tensor(None, 0.1, DEVICE)  # drawn per call


@pytest.mark.parametrize("backend", ["composite", "triton", "reference"])
def test_a_first_call_under_inference_mode_shares_nothing(backend):
    """The shared zero seed and empty mask state made inside torch.inference_mode are not kept: a
    later training call saves its state for backward (an inference tensor cannot be saved)."""
    from rslora_kernels import _runtime

    _runtime._SHARED.clear()
    x, W, A, B = (torch.randn(*s, device=DEVICE) for s in ((3, 8), (5, 8), (2, 8), (5, 2)))
    with torch.inference_mode():
        rk.lora_linear(x, W, A, B, 0.5, backend=backend)
    A.requires_grad_()
    rk.lora_linear(x, W, A, B, 0.5, backend=backend).sum().backward()
    assert A.grad is not None and not any(t.is_inference() for t in _runtime._SHARED.values())


def test_backward_op_called_directly_leaves_unneeded_grads_none():
    """In eager the backward op runs its implementation directly and allocates nothing for a grad
    that is not needed; through the dispatcher (torch.compile, opcheck) the schema's empty tensors."""
    from rslora_kernels.ops.lora_linear import lora_linear_bwd, lora_linear_fwd, zero_seed

    x, W = torch.randn(6, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    A, B = torch.randn(4, 40, device=DEVICE), torch.randn(24, 4, device=DEVICE)
    y, T, state = lora_linear_fwd(x, W, A, B, None, 0.5, 0.0, zero_seed(DEVICE), "composite")
    dy = torch.randn_like(y)
    args = (dy, x, W, A, B, T, 0.5, 0.0, state, [True, True, True, False], "composite")
    direct = lora_linear_bwd(*args)
    dispatched = torch.ops.rslora_kernels.lora_linear_bwd(*args)
    assert direct[3] is None and dispatched[3].numel() == 0
    for got, want in zip(direct[:3], dispatched[:3]):
        assert torch.equal(got, want)


def test_floor_row_has_the_fused_steps_autograd_shape():
    """The floor row's layer: one autograd node whose backward gives x, lora_A and lora_B grads of
    their shapes and dtypes (what the fused Function returns), the base frozen."""
    base = torch.nn.Linear(12, 7).requires_grad_(False)
    layer = host.make("floor", base, 3, 0.1)
    x = torch.randn(5, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (5, 7)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape and layer.lora_A.weight.grad.shape == (3, 12)
    assert layer.lora_B.weight.grad.shape == (7, 3) and base.weight.grad is None
