"""torch.compile(fullgraph=True) of models holding LoRALinear layers, opcheck of the custom ops,
autocast. The fused path is what is compiled: backend="triton" (Triton interpreter inside the
custom op on CPU) and backend="auto"."""
import copy

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.ops.lora_linear import resolve_backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles new modules through the same code objects; start from an empty cache so
    the tests do not add up to dynamo's recompile limit (a hard error under fullgraph=True)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_HERE = [name for name, b in rk.registered_backends().items()  # behind the custom ops: triton, composite
              if b.backward is not None and b.runs_on(DEV)]


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_HERE)
@pytest.mark.parametrize("dtype, p, bias", [(torch.float32, 0.0, True), (torch.float32, 0.3, False),
                                            (torch.bfloat16, 0.3, True)])
def test_opcheck_fwd_bwd(backend, dtype, p, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g).to(DEV, dtype)
    W = torch.randn(10, 12, generator=g).to(DEV, dtype)
    A = torch.randn(3, 12, generator=g).to(DEV)  # fp32 adapters (also next to bf16 x)
    B = torch.randn(10, 3, generator=g).to(DEV)
    b = torch.randn(10, generator=g).to(DEV, dtype) if bias else None
    seed = torch.tensor(1234, device=DEV)
    fwd, bwd = torch.ops.rslora_kernels.lora_linear_fwd.default, torch.ops.rslora_kernels.lora_linear_bwd.default
    torch.library.opcheck(fwd, (x, W, A, B, b, 0.5, p, seed, backend))
    _, T, mask_state = fwd(x, W, A, B, b, 0.5, p, seed, backend)
    dy = torch.randn(7, 10, generator=g).to(DEV, dtype)
    for needs in ([True, True, True, bias], [False, True, False, False]):
        torch.library.opcheck(bwd, (dy, x, W, A, B, T, 0.5, p, mask_state, needs, backend))


# ----------------------------------------------------------------------------------------------
# compiled vs eager
# ----------------------------------------------------------------------------------------------
def _model(backend, p):
    torch.manual_seed(0)
    first = rk.LoRALinear(24, 20, r=3, alpha=4.0, dropout=p, backend=backend)
    second = rk.LoRALinear(20, 13, r=2, alpha=4.0, bias=False, backend=backend)
    with torch.no_grad():
        first.lora_B.weight.normal_()
        second.lora_B.weight.normal_()
    return nn.Sequential(first, nn.Tanh(), second).to(DEV)


def _run(model, x, seed):
    """Forward + backward from torch seed ``seed``; returns (y, dx, adapter grads)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], device=DEV, dtype=y.dtype)).sum().backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters() if p.requires_grad]


def _reference_twin(model, dtype):
    """``model`` with every LoRALinear on the "reference" backend, in ``dtype``: run from the same torch
    seed it draws the same dropout seeds, so it sees the same masks."""
    twin = copy.deepcopy(model).to(dtype)
    for m in twin.modules():
        if isinstance(m, rk.LoRALinear):
            m.backend = "reference"
    return twin


def _check_against_oracle(what, results, model, x, seed):
    """``results`` of ``_run`` on ``model`` (or its compiled form) against the float64 reference twin,
    with the fp32 reference twin as PyTorch's same-dtype result (tests/numerics.py)."""
    oracle = _run(_reference_twin(model, torch.float64), x.double(), seed)
    same = _run(_reference_twin(model, torch.float32), x, seed)
    flat = [(results[0], oracle[0], same[0], "y"), (results[1], oracle[1], same[1], "dx")]
    assert len(results[2]) == len(oracle[2]) == len(same[2])
    flat += [(g, o, t, f"grad {i}") for i, (g, o, t) in enumerate(zip(results[2], oracle[2], same[2]))]
    for got, o, t, name in flat:
        assert_close_to_oracle(f"{what}: {name}", got, o, t)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("op_backend", ["triton", "auto"])
# inductor draws randomness with its own generator unless told to fall back to eager's; with the
# fallback the in-graph torch.randint seed equals the eager one, so masks match. (config.patch, not
# monkeypatch: pytest 9.2 undoes a monkeypatched ConfigModule entry by deleting it.)
@inductor_config.patch(fallback_random=True)
def test_compiled_model_matches_eager(compile_backend, op_backend):
    p = 0.25
    model = _model(op_backend, p)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 5, 24, device=DEV)
    y, dx, grads = _run(compiled, x, seed=11)
    assert len(grads) == 4
    _check_against_oracle("compiled", (y, dx, grads), model, x, seed=11)
    _check_against_oracle("eager", _run(model, x, seed=11), model, x, seed=11)
    if p > 0:  # the seed is drawn inside the graph: a new draw per call, repeatable from torch's seed
        assert not torch.equal(_run(compiled, x, seed=12)[0], y)
        assert torch.equal(_run(compiled, x, seed=11)[0], y)
    # eval mode (no dropout) under bf16 autocast: x and W run in bf16, fp32 adapters stay fp32
    model.eval()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y_c, y_e = compiled(x), model(x)
    assert y_c.dtype == y_e.dtype == torch.bfloat16
    assert resolve_backend(op_backend, DEV, torch.bfloat16) in FUSED_HERE
    if compile_backend == "aot_eager":  # the custom op is opaque to the compiler: the same kernels, the same aten Tanh
        assert torch.equal(y_c, y_e)
    else:  # inductor writes its own code for the Tanh between the layers: by the rule, both against float64
        oracle = _autocast_oracle(model, x)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            same = _reference_twin(model, torch.float32).eval()(x)
        assert_close_to_oracle("compiled y (autocast)", y_c, oracle, same)
        assert_close_to_oracle("eager y (autocast)", y_e, oracle, same)


def _autocast_oracle(model, x):
    """``model`` (eval) under bf16 autocast in float64: each LoRALinear's x, W and bias rounded to bf16
    as autocast casts them, its fp32 adapters as they are, no rounding after."""
    bf16 = lambda t: None if t is None else t.to(torch.bfloat16).double()  # noqa: E731
    h = x.double()
    for m in model:
        if isinstance(m, rk.LoRALinear):
            h = rk.reference.lora_linear(bf16(h), bf16(m.base_layer.weight), m.lora_A.weight.double(),
                                         m.lora_B.weight.double(), m.scaling, bf16(m.base_layer.bias))
        else:
            h = m(h)
    return h


def test_reference_dropout_under_compile():
    model = _model("reference", 0.25)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 24, device=DEV)
    _check_against_oracle("compiled reference", _run(compiled, x, seed=3), model, x, seed=3)


def test_autocast_matches_reference():
    """Eager bf16 autocast: the error against float64 stays within twice PyTorch's own bf16 error."""
    layer = _model("triton", 0.0)[0].eval()
    x = torch.randn(4, 9, 24, device=DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = layer(x)
        y_torch = layer.base_layer(x) + layer.scaling * layer.lora_B(layer.lora_A(x))  # PyTorch's autocast path
    assert y.dtype == y_torch.dtype == torch.bfloat16
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    want = rk.reference.lora_linear(x.double(), w, layer.lora_A.weight.double(), layer.lora_B.weight.double(),
                                    layer.scaling, b)
    assert_close_to_oracle("y(autocast)", y, want, y_torch)
