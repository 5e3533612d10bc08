"""QLoRA: the LoRA op on a bitsandbytes 4-bit frozen base (rslora_kernels.quant, ops/qlora.py).

* dequantization (Triton kernel, PyTorch path, the CPU default) bit for bit against bitsandbytes;
* forward and every grad against the float64 oracle built from bitsandbytes' dequantized weight,
  by the rule of tests/numerics.py, on a representative grid (not the full product: CI budget);
* what is saved for backward: never the dense weight;
* LoRALinear.from_linear / inject on bnb.nn.Linear4bit, rk.peft.patch on PEFT's lora.bnb.Linear4bit.

Shapes: bitsandbytes 0.50's native CPU dequantize starts a new block at every row, which is wrong
when K is even and not a multiple of the blocksize; where these tests take bitsandbytes' own
dequantized weight as the oracle, K is odd (bitsandbytes then uses its PyTorch path) or a multiple
of the blocksize. The independent decode below covers the other shapes.
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from rslora_kernels.quant import BLOCKSIZES, Weight4bit, code_table, dequantize_4bit  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (subprocesses import from it)


def quantize(N, K, quant_type, nested, blocksize, seed=0, dtype=torch.float32):
    """(packed, QuantState, Weight4bit) of a random [N, K] weight with bitsandbytes' quantizer."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(DEV)
    packed, qs = BF.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return packed, qs, Weight4bit.from_bnb(packed, qs)


def decode_from_bnb_parts(packed, qs, dtype):
    """The format restated from bitsandbytes' pieces (its code table; its 8-bit dequantize for nested
    scales), element by element over the flat weight: an oracle independent of our code paths."""
    n = qs.shape[0] * qs.shape[1]
    code = BF.get_4bit_type(qs.quant_type, device=packed.device)
    b = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    scales = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    block = torch.arange(n, device=packed.device) // qs.blocksize
    return (code[nibbles] * scales.float()[block]).to(dtype).reshape(qs.shape)


def bits(t):
    return t.float().view(torch.int32)


def test_code_tables_are_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(bits(code_table(qt, "cpu")), bits(BF.get_4bit_type(qt, device="cpu"))), qt


# every blocksize once; quant types, nesting, dtypes and shapes rotate across them
DEQUANT_CASES = [
    ("nf4", True, 32, torch.float32, (37, 53)), ("fp4", False, 64, torch.bfloat16, (64, 96)),
    ("nf4", False, 128, torch.float16, (9, 128)), ("fp4", True, 256, torch.float32, (30, 100)),
    ("nf4", True, 512, torch.bfloat16, (31, 77)), ("fp4", False, 1024, torch.float16, (5, 1024)),
    ("nf4", False, 2048, torch.float32, (3, 700)), ("fp4", True, 4096, torch.bfloat16, (300, 129)),
    ("nf4", True, 64, torch.float16, (1, 1)), ("fp4", True, 64, torch.float32, (257, 64)),
]
assert {c[2] for c in DEQUANT_CASES} == set(BLOCKSIZES)


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: f"{c[0]}-{'nested' if c[1] else 'plain'}-bs{c[2]}-"
                                                               f"{str(c[3])[6:]}-{c[4][0]}x{c[4][1]}")
def test_dequantize_bit_exact(case):
    quant_type, nested, blocksize, dtype, (N, K) = case
    packed, qs, w = quantize(N, K, quant_type, nested, blocksize, seed=N + K)
    expected = decode_from_bnb_parts(packed, qs, dtype)
    bnb_exact = DEV.type == "cuda" or K % 2 == 1 or K % blocksize == 0  # see the module docstring
    if bnb_exact:
        qs.dtype = dtype  # bitsandbytes dequantizes to the quant state's dtype
        assert torch.equal(bits(BF.dequantize_4bit(packed, qs)), bits(expected)), "test oracle disagrees with bnb"
    for impl in ("triton", "torch", "auto"):
        got = dequantize_4bit(w, dtype, impl=impl)
        assert got.dtype == dtype and got.shape == (N, K)
        assert torch.equal(bits(got), bits(expected)), f"impl={impl}: {(bits(got) != bits(expected)).sum()} mismatches"
    out = torch.full((N, K), float("nan"), dtype=dtype, device=DEV)
    assert dequantize_4bit(w, dtype, out=out, impl="triton") is out and torch.equal(bits(out), bits(expected))


def test_params4bit_is_accepted_as_is():
    lin = bnb.nn.Linear4bit(53, 29, bias=False, quant_type="nf4", compress_statistics=True).to(DEV)
    expected = BF.dequantize_4bit(lin.weight, lin.weight.quant_state)
    assert torch.equal(dequantize_4bit(lin.weight, torch.float32), expected)
    w = Weight4bit.from_bnb(lin.weight)
    assert w.packed.data_ptr() == lin.weight.data_ptr()  # a reference, not a copy
    # quant_storage other than uint8 (FSDP's choice): the same bytes, read as uint8
    lin16 = bnb.nn.Linear4bit(64, 30, quant_type="fp4", quant_storage=torch.bfloat16).to(DEV)
    assert lin16.weight.dtype == torch.bfloat16
    assert torch.equal(dequantize_4bit(lin16.weight, torch.float32), BF.dequantize_4bit(lin16.weight, lin16.weight.quant_state))


def test_bad_weights_raise_clear_errors():
    packed, qs, w = quantize(20, 33, "nf4", False, 64)
    with pytest.raises(ValueError, match="blocksize"):
        Weight4bit(w.packed, w.absmax, w.shape, 48, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        Weight4bit(w.packed, w.absmax, w.shape, 64, "int4")
    with pytest.raises(ValueError, match="packed"):
        Weight4bit(w.packed[:-1], w.absmax, w.shape, 64, "nf4")
    with pytest.raises(ValueError, match="absmax"):
        Weight4bit(w.packed, w.absmax.half(), w.shape, 64, "nf4")
    with pytest.raises(ValueError, match="quantize it first"):
        Weight4bit.from_bnb(bnb.nn.Params4bit(torch.randn(4, 8), requires_grad=False))
    x, A, B = torch.randn(3, 34, device=DEV), torch.randn(2, 34, device=DEV), torch.randn(20, 2, device=DEV)
    with pytest.raises(ValueError, match="weight must have shape"):
        rk.lora_linear(x, w, A, B, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_4bit(w, torch.float64)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        rk.lora_linear(x.double()[:, :33], w, A.double()[:, :33], B.double(), 1.0)


def test_autocast_computes_in_the_autocast_dtype():
    packed, qs, w = quantize(29, 53, "nf4", True, 64)
    W = BF.dequantize_4bit(packed, qs)
    x = torch.randn(7, 53, device=DEV, requires_grad=True)
    A = torch.randn(3, 53, device=DEV, requires_grad=True)  # fp32 adapters stay fp32
    B = torch.randn(29, 3, device=DEV, requires_grad=True)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = rk.lora_linear(x, w, A, B, 0.5, backend="composite")
    assert y.dtype == torch.bfloat16
    oracle = rk.reference.lora_linear(x.detach().double(), W.double(), A.detach().double(), B.detach().double(), 0.5)
    same = rk.reference.lora_linear(x.detach().bfloat16(), W.bfloat16(), A.detach().bfloat16(), B.detach().bfloat16(), 0.5)
    assert_close_to_oracle("y", y, oracle, same)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# The op against the float64 oracle
# ----------------------------------------------------------------------------------------------
# (quant_type, nested, blocksize, dtype, p, bias, x shape, N, r): K odd or a multiple of the blocksize
OP_CASES = [
    ("nf4", True, 64, torch.float32, 0.1, True, (37, 53), 29, 5),
    ("fp4", False, 64, torch.float32, 0.0, False, (37, 53), 29, 5),
    ("nf4", False, 128, torch.bfloat16, 0.1, False, (3, 128), 45, 16),
    ("fp4", True, 32, torch.float16, 0.1, True, (97, 33), 31, 3),
    ("nf4", True, 256, torch.float16, 0.0, True, (1, 75), 19, 1),
    ("fp4", True, 64, torch.bfloat16, 0.0, True, (2, 7, 129), 66, 8),
    ("nf4", False, 4096, torch.float32, 0.1, True, (2, 5, 45), 51, 200),
    ("nf4", True, 64, torch.float32, 0.1, False, (0, 45), 17, 3),
]


@pytest.mark.parametrize("backend", ["composite", "triton"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c[0]}-{'nested' if c[1] else 'plain'}-bs{c[2]}-"
                                                        f"{str(c[3])[6:]}-p{c[4]}-{'bias' if c[5] else 'nobias'}-"
                                                        f"{'x'.join(map(str, c[6]))}")
def test_forward_and_grads_match_float64_oracle(case, backend):
    quant_type, nested, blocksize, dtype, p, has_bias, x_shape, N, r = case
    K = x_shape[-1]
    packed, qs, w = quantize(N, K, quant_type, nested, blocksize, seed=N)
    W_bnb = BF.dequantize_4bit(packed, qs)  # fp32: the exact dequantized values
    g = torch.Generator().manual_seed(K)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEV)

    inputs = dict(x=rnd(*x_shape), lora_A=rnd(r, K, scale=K ** -0.5), lora_B=rnd(N, r, scale=r ** -0.5),
                  bias=rnd(N) if has_bias else None)
    dy = rnd(*x_shape[:-1], N)
    scaling, seed = rk.rslora_scaling(16.0, r), 1234 + r
    mask = rk.dropout_mask(seed, x_shape, p, DEV) if p > 0 else None
    names = [k for k, v in inputs.items() if v is not None]

    def run(fn, cast):
        leaves = {k: v.to(cast, copy=True).requires_grad_() for k, v in inputs.items() if v is not None}
        y = fn(leaves)
        y.backward(dy.to(y.dtype))
        return y, {k: leaves[k].grad for k in names}

    def reference(dtype_, W):
        return lambda t: rk.reference.lora_linear(t["x"], W.to(dtype_), t["lora_A"], t["lora_B"], scaling,
                                                  t.get("bias"), p, mask)

    y, grads = run(lambda t: rk.lora_linear(t["x"], w, t["lora_A"], t["lora_B"], scaling, bias=t.get("bias"),
                                            dropout_p=p, seed=seed, backend=backend), dtype)
    y64, grads64 = run(reference(torch.float64, W_bnb), torch.float64)
    yt, gradst = run(reference(dtype, W_bnb), dtype)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], N)
    assert_close_to_oracle("y", y, y64, yt)
    for name in names:
        assert grads[name].dtype == dtype
        assert_close_to_oracle(f"d{name}", grads[name], grads64[name], gradst[name])


def test_reference_backend_and_frozen_x():
    """backend="reference" (an autograd backend: plain PyTorch on the dense W) and calls where x needs
    no grad (no dx: backward does not dequantize), each against the float64 oracle."""
    packed, qs, w = quantize(29, 53, "fp4", True, 64)
    W = BF.dequantize_4bit(packed, qs)
    x = torch.randn(11, 53, device=DEV)
    A = torch.randn(4, 53, device=DEV, requires_grad=True)
    B = torch.randn(29, 4, device=DEV, requires_grad=True)
    mask = rk.dropout_mask(9, x.shape, 0.1, DEV)

    def run(fn, cast):
        a, b = A.detach().to(cast).requires_grad_(), B.detach().to(cast).requires_grad_()
        y = fn(x.to(cast), a, b)
        return (y, *torch.autograd.grad(y.square().sum(), (a, b)))

    oracle = run(lambda x_, a, b: rk.reference.lora_linear(x_, W.double(), a, b, 0.7, None, 0.1, mask), torch.float64)
    same = run(lambda x_, a, b: rk.reference.lora_linear(x_, W, a, b, 0.7, None, 0.1, mask), torch.float32)
    for backend in ("reference", "composite", "triton"):
        got = run(lambda x_, a, b: rk.lora_linear(x_, w, a, b, 0.7, dropout_p=0.1, seed=9, backend=backend),
                  torch.float32)
        for what, g, o, t in zip(("y", "dA", "dB"), got, oracle, same):
            assert_close_to_oracle(f"{backend} {what}", g, o, t)


def test_dense_weight_is_never_saved_for_backward():
    M, K, N, r = 40, 65, 48, 6
    packed, qs, w = quantize(N, K, "nf4", True, 64)
    x = torch.randn(M, K, device=DEV, requires_grad=True)
    A = torch.randn(r, K, device=DEV, requires_grad=True)
    B = torch.randn(N, r, device=DEV, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in w.tensors()}
    for backend in ("composite", "triton"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = rk.lora_linear(x, w, A, B, 0.5, dropout_p=0.1, seed=3, backend=backend)
        new = [t for t in saved if t.untyped_storage().data_ptr() not in own]
        assert not any(t.dtype == torch.bool for t in new), "a mask was saved"
        assert not any(t.is_floating_point() and t.numel() >= N * K and t.data_ptr() != x.data_ptr() for t in new), \
            [tuple(t.shape) for t in new]
        assert any(t.data_ptr() == x.data_ptr() for t in new) and any(tuple(t.shape) == (M, r) for t in new)
        y.sum().backward()


# ----------------------------------------------------------------------------------------------
# Layers: LoRALinear.from_linear and inject on bnb.nn.Linear4bit
# ----------------------------------------------------------------------------------------------
def _linear4bit(K, N, bias=True, quant_type="nf4", nested=True, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                          compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=nested)
    if bias:
        q.bias = nn.Parameter(dense.bias.data.clone())
    return q.to(DEV)


def test_lora_linear_layer_from_linear4bit():
    base = _linear4bit(45, 31, compute_dtype=torch.bfloat16)
    layer = rk.LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.1, adapter_dtype=torch.float32)
    assert layer.lora_A.weight.dtype == torch.float32 and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 45, device=DEV)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same seed draw
    seed = rk.dropout.draw_seed(DEV)
    mask = rk.dropout_mask(int(seed), x.shape, 0.1, DEV)
    W = BF.dequantize_4bit(base.weight, base.weight.quant_state)
    args = (layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling)
    xb, bb = x.bfloat16(), base.bias.bfloat16()  # what the layer computes with (Linear4bit's compute dtype)
    same = rk.reference.lora_linear(xb, W.bfloat16(), *args, bb, 0.1, mask)
    oracle = rk.reference.lora_linear(xb.double(), W.double(), *(a.double() for a in args[:2]), args[2], bb.double(),
                                      0.1, mask)
    assert y.dtype == x.dtype  # computed in the base's compute_dtype, cast back as Linear4bit does
    assert_close_to_oracle("y", y.bfloat16(), oracle, same)  # y holds bf16 values (cast back exactly)
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    with pytest.raises(TypeError, match="4-bit"):
        layer.merge()


def test_dora_on_a_4bit_base_is_refused_by_name():
    with pytest.raises(TypeError, match="DoRA on a 4-bit base"):
        rk.LoRALinear.from_linear(_linear4bit(24, 40).to(DEV), r=4, alpha=8, use_dora=True)


def test_inject_wraps_linear4bit():
    model = nn.Sequential(_linear4bit(24, 40), nn.ReLU(), _linear4bit(40, 24, bias=False), nn.ReLU(), nn.Linear(24, 3))
    model = model.to(DEV)
    rk.inject(model, ["0", "2"], r=4, alpha=8)
    assert isinstance(model[0], rk.LoRALinear) and isinstance(model[2], rk.LoRALinear)
    model(torch.randn(6, 24, device=DEV)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# PEFT: a tiny Llama with 4-bit projections (PEFT builds lora.bnb.Linear4bit layers)
# ----------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_qlora_llama(dropout, quant_type="nf4", nested=True, seed=0):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    # K = 64 and 128: multiples of the blocksize, where bitsandbytes' own CPU dequantize is right
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=nested)
                setattr(module, name, q)
    model = model.to(DEV)
    model.is_loaded_in_4bit = True  # what transformers sets for a bnb 4-bit model: PEFT then builds lora.bnb layers
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                                    use_rslora=True))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if "lora_" in name:
                prm.normal_(0, 0.3)
    pm.train()  # (in eval mode without grad, bitsandbytes repacks CPU weights for its inference kernel)
    return pm


def _loss_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach()


def _check_each_layer_against_oracle(model, ref, ids):
    """Forward + backward of the patched ``model`` recording every LoRA layer's x, y, dy, dx; then per
    layer (where the numerics rule is defined, as in test_peft_patch.py) y, dx, dA, dB against the
    float64 oracle built from bitsandbytes' dequantized weight, with the same layer of ``ref``
    (unpatched PEFT: bitsandbytes' base + fp32 adapters) run on that x and dy as the same-dtype result."""
    records, handles = {}, []
    for name, layer in model.named_modules():
        if rk.peft.is_patched(layer):
            rec = records[name] = {}
            handles.append(layer.register_forward_hook(
                lambda mod, args, out, rec=rec: rec.update(x=args[0].detach(), y=out.detach())))
            handles.append(layer.register_full_backward_hook(
                lambda mod, gin, gout, rec=rec: rec.update(dx=gin[0], dy=gout[0].detach())))
    try:
        _loss_backward(model, ids)
    finally:
        for h in handles:
            h.remove()
    ref_layers = dict(ref.named_modules())
    for name, rec in records.items():
        layer, twin = model.get_submodule(name), ref_layers[name]
        base = layer.get_base_layer()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W = BF.dequantize_4bit(base.weight, base.weight.quant_state)
        runs = []
        for fn, dtype in ((lambda x, a, b: rk.reference.lora_linear(x, W.double(), a, b, layer.scaling["default"]),
                           torch.float64), (lambda x, a, b: twin(x), torch.float32)):
            x = rec["x"].to(dtype).requires_grad_(rec["dx"] is not None)
            a, b = (twin.lora_A["default"].weight, twin.lora_B["default"].weight) if dtype == torch.float32 else \
                (A.detach().double().requires_grad_(), B.detach().double().requires_grad_())
            a.grad = b.grad = None
            y = fn(x, a, b)
            y.backward(rec["dy"].to(dtype))
            runs.append([y, x.grad, a.grad, b.grad])
        got = [rec["y"], rec["dx"], A.grad, B.grad]
        for what, g, o, t in zip(["y", "dx", "dA", "dB"], got, *runs):
            if g is not None:
                assert_close_to_oracle(f"{name} {what}", g, o, t)
    return records


@pytest.mark.parametrize("backend", ["composite", "triton"])
def test_peft_patch_fuses_all_4bit_projections_and_matches_peft(backend):
    pm = _peft_qlora_llama(dropout=0.0)
    layers = [m for m in pm.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(layers) == 14 and {type(m).__module__ for m in layers} == {"peft.tuners.lora.bnb"}
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5)).to(DEV)
    ref = copy.deepcopy(pm)
    logits_peft = _loss_backward(pm, ids)
    grads_peft = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on PEFT's forward
        assert rk.peft.patch(pm, backend=backend) == 14
    kinds = {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if rk.peft.is_patched(m)}
    assert kinds == set(TARGETS)
    records = _check_each_layer_against_oracle(pm, ref, ids)
    assert len(records) == 14
    assert sum(rec["dx"] is not None for rec in records.values()) == 14 - 3  # layer 0's q/k/v: frozen embeddings
    assert rk.peft.unpatch(pm) == 14
    assert torch.equal(_loss_backward(pm, ids), logits_peft)  # PEFT's own forward again, bit for bit
    assert all(torch.equal(p.grad, grads_peft[n]) for n, p in pm.named_parameters() if p.requires_grad)


def _saved_during_forward(model, ids, exclude):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
    del logits
    return list(seen.values())


def test_peft_patch_with_dropout_saves_less_and_no_dense_weight():
    pm = _peft_qlora_llama(dropout=0.1)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5)).to(DEV)
    # parameters and the 4-bit weights' quant state exist anyway: not counted
    exclude = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    for m in pm.modules():
        if isinstance(getattr(m, "weight", None), bnb.nn.Params4bit):
            exclude |= {t.untyped_storage().data_ptr() for t in Weight4bit.from_bnb(m.weight).tensors()}
    peft_saved = _saved_during_forward(pm, ids, exclude)
    assert rk.peft.patch(pm, backend="composite") == 14
    ours = _saved_during_forward(pm, ids, exclude)
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    assert nbytes(ours) <= nbytes(peft_saved), (nbytes(ours), nbytes(peft_saved))
    smallest_weight = 64 * 64
    assert not [tuple(t.shape) for t in ours if t.is_floating_point() and t.numel() >= smallest_weight]
    assert not any(t.dtype == torch.bool for t in ours)
    rk.peft.unpatch(pm)


_FMA_COUNT_SCRIPT = """
import sys, triton
from triton.backends.compiler import GPUTarget
from rslora_kernels.ops.dequant_kernel import LAUNCH_OPTIONS, _dequant_4bit_kernel
sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "nested_code_ptr": "*fp32",
       "nested_absmax_ptr": "*fp32", "nested_offset_ptr": "*fp32", "out_ptr": "*bf16", "n_elements": "i32"}
meta = dict(BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, BF16_RTNE_BY_HAND=False, BYTES=1024)
sig.update({k: "constexpr" for k in meta})
constexprs = {(list(sig).index(k),): v for k, v in meta.items()}
for fusion in (LAUNCH_OPTIONS["enable_fp_fusion"], True):
    src = triton.compiler.ASTSource(fn=_dequant_4bit_kernel, signature=sig, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(LAUNCH_OPTIONS, enable_fp_fusion=fusion)).asm["ptx"]
    print(ptx.count("fma.rn.f32"))
"""


def test_dequant_kernel_compiles_for_sm90_without_fma():
    """On a GPU the nested scale ``code * absmax2 + offset`` must not become one FMA (bitsandbytes rounds
    twice): compile the kernel for sm_90 with the launcher's options (in a fresh process without the
    interpreter, as benchmarks/static_report.py does) and count FMAs in the PTX. Compiled with fusion
    allowed, the same kernel does contain FMAs -- so this test can fail."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _FMA_COUNT_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours, fused = (int(v) for v in res.stdout.split())
    assert ours == 0 and fused > 0, (ours, fused)


def test_peft_patch_leaves_8bit_layers_on_peft_with_a_clear_warning():
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        is_loaded_in_8bit = True  # PEFT then builds lora.bnb.Linear8bitLt layers

        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to(DEV)

        def forward(self, x):
            return self.proj(x)

    pm = peft.get_peft_model(Holder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    assert type(pm.base_model.model.proj).__name__ == "Linear8bitLt"
    with pytest.warns(UserWarning, match=r"Linear8bitLt \(bitsandbytes 8-bit base.*not fused"):
        assert rk.peft.patch(pm) == 0
    assert not rk.peft.is_patched(pm.base_model.model.proj)


def test_torch_compile_fullgraph_on_a_4bit_base():
    packed, qs, w = quantize(40, 64, "nf4", True, 64)
    A = torch.randn(4, 64, device=DEV, requires_grad=True)
    B = torch.randn(40, 4, device=DEV, requires_grad=True)
    x = torch.randn(5, 64, device=DEV, requires_grad=True)
    fn = torch.compile(lambda x: rk.lora_linear(x, w, A, B, 0.5, backend="composite"), fullgraph=True)
    y = fn(x)
    y_eager = rk.lora_linear(x, w, A, B, 0.5, backend="composite")
    assert torch.equal(y, y_eager)
    assert torch.equal(torch.autograd.grad(y.sum(), A)[0], torch.autograd.grad(y_eager.sum(), A)[0])


def test_sweep_quant_nf4_runs_the_qlora_providers(tmp_path):
    """Plumbing of ``benchmarks.sweep --quant nf4`` (no timing asserted): the 4-bit providers give rows."""
    import json

    sweep = pytest.importorskip("benchmarks.sweep")
    pytest.importorskip("peft")
    out = tmp_path / "sweep"
    assert sweep.main(["--device", "cpu", "--shapes", "64x40", "--m", "17", "--ranks", "3", "--modes", "fwd+bwd",
                       "--dropout", "0.1", "--providers", "eager", "--quant", "nf4", "--min-time", "0.02",
                       "--rounds", "1", "--rotate", "2", "--out", str(out)]) == 0
    rows = {x["provider"]: x for x in json.loads((out / "sweep.json").read_text())["rows"]}
    for name in ("peft-qlora", "qlora-composite"):
        assert name in rows and not rows[name]["error"] and rows[name]["ms"] > 0, rows.get(name)


def test_package_import_and_dense_calls_do_not_import_bitsandbytes():
    code = ("import sys, torch, rslora_kernels as rk; x = torch.randn(3, 8); "
            "rk.lora_linear(x, torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2), 1.0, backend='composite'); "
            "print('bitsandbytes' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"
