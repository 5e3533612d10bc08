"""Forward and backward of the fused layers captured in a CUDA graph (GPU only; skipped elsewhere).

Captured replays must compute what eager calls compute (without dropout: bit for bit for the
Triton kernels), and with dropout each replay must draw a fresh mask (the seed comes
from torch's CUDA generator, which graph replays advance). benchmarks/gpu_run.sh runs these in its
CUDA numerics step; docs/integrations.md#cuda-graphs is the recipe they back.
"""
import pytest
import torch

import rslora_kernels as rk
from benchmarks.timing import capture_graph
from numerics import assert_close_to_oracle


def _captured_step(layer, x, dy):
    """(graph, y) of one captured fwd+bwd (benchmarks/timing.py: the capture every GPU-time figure used)."""
    def step():
        y = layer(x)
        y.backward(dy)
        return y
    return capture_graph(step, [x, *layer.parameters()])


def _grads(layer, x):
    return [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]


def _reference_step(layer, x, dy, dtype):
    """[y, dx, dA, dB] of the reference formula on the layer's tensors cast to ``dtype`` (no dropout)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    base = layer.base_layer
    y = rk.reference.lora_linear(leaves[0], base.weight.to(dtype), leaves[1], leaves[2], layer.scaling,
                                 None if base.bias is None else base.bias.to(dtype))
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "composite"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bfloat16"])
def test_replay_equals_eager_and_redraws_dropout(device, backend, dtype):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    layer = rk.LoRALinear(72, 40, r=12, alpha=16, dropout=0.0, backend=backend).to(device, dtype)
    for prm in layer.base_layer.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
    x = torch.randn(37, 72, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(37, 40, device=device, dtype=dtype)

    # without dropout: a replay is the eager step (bit for bit with our kernels; cuBLAS may pick
    # another algorithm while capturing, so the composite backend's replay meets the float64 oracle)
    y_eager = layer(x)
    y_eager.backward(dy)
    eager = [y_eager.detach().clone(), *_grads(layer, x)]
    graph, y = _captured_step(layer, x, dy)
    graph.replay()
    torch.cuda.synchronize()
    oracle, same = (_reference_step(layer, x, dy, dt) for dt in (torch.float64, dtype))
    for name, got, want, o, sd in zip(["y", "dx", "dA", "dB"], [y.detach(), *_grads(layer, x)], eager, oracle, same):
        if backend == "triton":
            assert torch.equal(got, want), name
        else:
            assert_close_to_oracle(f"{name} (replay)", got, o, sd)

    # with dropout: every replay a new mask, so outputs differ between replays
    layer.dropout = 0.1
    graph, y = _captured_step(layer, x, dy)
    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(y.detach().clone())
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
