"""DoRA (rk.dora_linear, LoRALinear(use_dora=True), rk.peft.patch of PEFT DoRA layers).

Forward and every gradient against the float64 oracle (rk.reference.dora_linear, PEFT's formula
with the [N, K] matrix built) by the rule of tests/numerics.py; the Triton backend runs in the
interpreter on the CPU (small shapes).
"""
import copy
import warnings

import pytest
import torch

import rslora_kernels as rk
from benchmarks import providers
from numerics import assert_close_to_oracle
from rslora_kernels.ops.dora import clear_norm_cache, dora_row_norms

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRADS = ("x", "lora_A", "lora_B", "magnitude", "bias")


def make_inputs(M, K, N, r, dtype, device, bias=True, adapter_dtype=None, seed=0):
    """Random inputs at realistic scales: B non-zero, magnitudes near the row norms (g near 1, not 1)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dt)

    t = dict(x=rnd(M, K), weight=rnd(N, K, scale=K ** -0.5), lora_A=rnd(r, K, scale=K ** -0.5, dt=adapter_dtype),
             lora_B=rnd(N, r, scale=r ** -0.5, dt=adapter_dtype), bias=rnd(N) if bias else None)
    norms = torch.linalg.norm(t["weight"].double(), dim=1)
    t["magnitude"] = (norms * (1 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64).to(device))).to(adapter_dtype)
    return t


def run(fn, inputs, dy, dtype=None):
    """Forward + backward of ``fn`` on leaves made from ``inputs`` (cast to ``dtype`` if given, so the
    float64 oracle's grads are float64 too); returns (y, {name: grad})."""
    leaves = {k: (v.detach().to(dtype or v.dtype, copy=True).requires_grad_(k in GRADS) if v is not None else None)
              for k, v in inputs.items()}
    y = fn(leaves)
    y.backward(dy.to(y.dtype))
    return y, {k: leaves[k].grad for k in GRADS if leaves[k] is not None}


def check_against_oracle(inputs, scaling, p, seed, backend):
    x = inputs["x"]
    mask = rk.dropout_mask(seed, x.shape, p, x.device) if p > 0 else None
    dy = torch.randn(*x.shape[:-1], inputs["weight"].shape[0], generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(x.device)

    def reference(t):
        return rk.reference.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], scaling,
                                        t["bias"], p, mask)

    def ours(t):
        return rk.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], scaling, bias=t["bias"],
                              dropout_p=p, seed=seed, backend=backend)

    y, grads = run(ours, inputs, dy)
    y64, grads64 = run(reference, inputs, dy, torch.float64)
    y_same, grads_same = run(reference, inputs, dy)
    assert y.dtype == x.dtype
    assert_close_to_oracle("y", y, y64, y_same)
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_oracle(f"d{name}", grads[name], grads64[name], grads_same[name])


# composite: every dtype, ragged shapes, M = 0; triton (interpreter): fewer, smaller cases
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M, K, N, r", [(1, 40, 23, 1), (97, 75, 83, 19), (3, 129, 66, 200), (0, 33, 17, 3)])
def test_composite_matches_oracle(M, K, N, r, p, dtype, device):
    inputs = make_inputs(M, K, N, r, dtype, device, seed=M + K)
    check_against_oracle(inputs, scaling=0.9, p=p, seed=11, backend="composite")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M, K, N, r", [(37, 45, 51, 7), (5, 70, 19, 33)])
def test_triton_matches_oracle(M, K, N, r, p, dtype, device):
    inputs = make_inputs(M, K, N, r, dtype, device, seed=M + N)
    check_against_oracle(inputs, scaling=1.3, p=p, seed=13, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, N, r", [(64, 128, 64, 70), (33, 97, 130, 16)], ids=["even_r70", "ragged"])
def test_triton_dropout_launches(M, K, N, r, dtype, monkeypatch, kernel_launches, device):
    """With dropout the Triton backend runs both base GEMMs of a direction in one launch over the
    same W tiles (forward: F1, DF2; backward: B1, DB2, B3) and forms neither drop(x) nor g * dy:
    no composite dropout pass, no torch GEMM of the base's size. Sizes that divide the
    interpreter's tiles (EVEN_* paths; r = 70 spans two of its F1 rank tiles: a keep-bits pass
    first) and ragged ones; against the oracle."""
    mms = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **k: mms.append((tuple(a.shape), tuple(b.shape))) or real_mm(a, b, **k))
    inputs = make_inputs(M, K, N, r, dtype, device, seed=M + r)
    check_against_oracle(inputs, scaling=0.7, p=0.1, seed=23, backend="triton")
    # one forward and backward of ours; the keep-bits pass (r beyond F1's rank tile) and split-M
    # sums come and go with the tiles, and are tested with the LoRA op
    expected = ["_shrink_kernel", "_dora_fwd_kernel", "_shrink_kernel", "_dora_dx_kernel",
                "_m_reduce_kernel", "_m_reduce_kernel"]
    launched = [launch.name for launch in kernel_launches]
    ours = [k for k in launched if k not in ("_keep_bits_kernel", "_sum_splits_kernel")][:len(expected)]
    assert ours == expected, launched
    assert not any(a[1] == K and b == (K, N) or b == (N, K) for a, b in mms), mms  # no x W^T nor dy W in torch


@pytest.mark.parametrize("backend", ["composite", "triton"])
def test_3d_x_fp32_adapters_no_bias(backend, device):
    """bf16 x with PEFT's fp32 adapters and magnitude, 3-D x, no bias."""
    inputs = make_inputs(12, 33, 21, 5, torch.bfloat16, device, bias=False, adapter_dtype=torch.float32, seed=3)
    inputs["x"] = inputs["x"].reshape(3, 4, 33)
    check_against_oracle(inputs, scaling=0.8, p=0.1, seed=17, backend=backend)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_composite_float64(p):
    """x, magnitude and bias (A and B also move the detached norm, which finite differences would
    see: their grads are checked against the oracle above)."""
    t = make_inputs(6, 7, 5, 3, torch.float64, torch.device("cpu"), seed=19)
    leaves = [t[k].requires_grad_() for k in ("x", "magnitude", "bias")]
    W, A, B = t["weight"], t["lora_A"], t["lora_B"]
    assert torch.autograd.gradcheck(
        lambda x, m, bias: rk.dora_linear(x, W, A, B, m, 0.7, bias, p, seed=23, backend="composite"), leaves)


def test_weight_grad_when_unfrozen(device):
    """W trainable (not the fast path): dW still matches autograd through the reference."""
    t = make_inputs(9, 10, 8, 3, torch.float64, torch.device("cpu"), seed=29)
    mask = rk.dropout_mask(31, (9, 10), 0.2)
    for p, m in ((0.0, None), (0.2, mask)):
        W1, W2 = t["weight"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
        args = (t["lora_A"], t["lora_B"], t["magnitude"], 0.6, t["bias"], p)
        rk.dora_linear(t["x"], W1, *args, seed=31, backend="composite").sum().backward()
        rk.reference.dora_linear(t["x"], W2, *args, m).sum().backward()
        torch.testing.assert_close(W1.grad, W2.grad)


# ----------------------------------------------------------------------------------------------
# Row norms without the [N, K] matrix
# ----------------------------------------------------------------------------------------------
def _norms64(W, A, B, s):
    return torch.linalg.norm(W.double() + s * (B.double() @ A.double()), dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("update", [0.01, 1.0, 30.0], ids=lambda u: f"update{u}")
def test_row_norms(dtype, update, device):
    """The numerics rule against float64, PyTorch's same-dtype result being PEFT's norm
    (``linalg.norm(W + s B A)`` in the adapters' dtype, here W's): ||W_n|| is taken as PEFT takes it."""
    t = make_inputs(1, 300, 77, 9, dtype, device, seed=37)
    W, A, B = t["weight"], t["lora_A"], t["lora_B"] * update
    got = dora_row_norms(W, A, B, 1.7)
    assert got.dtype == torch.float32
    peft = torch.linalg.norm(W + 1.7 * (B.to(dtype) @ A.to(dtype)), dim=1)
    assert_close_to_oracle("w", got, _norms64(W, A, B, 1.7), peft)


def test_row_norms_update_dominates(device):
    """s B A 1000x larger than W: the s^2 term dominates, nothing cancels, fp32 accuracy holds."""
    t = make_inputs(1, 200, 64, 8, torch.float32, device, seed=41)
    W, A, B = t["weight"], t["lora_A"], t["lora_B"] * 1000
    got = dora_row_norms(W, A, B, 2.0)
    assert_close_to_oracle("w", got, _norms64(W, A, B, 2.0), torch.linalg.norm(W + 2.0 * (B @ A), dim=1))


def test_row_norms_cancellation_bound(device):
    """W = -s B A + E with tiny E: w is small against its parts and the relative error grows as
    documented, eps * (||W_n|| + ||s B_n A||)^2 / w_n^2, but never beyond it (and never NaN)."""
    t = make_inputs(1, 200, 64, 8, torch.float32, device, seed=43)
    A, B, s = t["lora_A"], t["lora_B"], 1.5
    W = (-s * (B.double() @ A.double()) + 1e-3 * t["weight"].double()).float()
    got, want = dora_row_norms(W, A, B, s).double(), _norms64(W, A, B, s)
    parts = torch.linalg.norm(W.double(), dim=1) + torch.linalg.norm(s * (B.double() @ A.double()), dim=1)
    bound = 16 * torch.finfo(torch.float32).eps * parts ** 2 / want ** 2
    rel = (got - want).abs() / want
    assert torch.isfinite(got).all()
    assert (rel <= bound).all(), (rel / bound).max()
    assert rel.max() > 1e-6  # the cancellation is real here (fp32 would otherwise be ~1e-7)


def test_weight_norm_cache_follows_in_place_updates(device):
    t = make_inputs(1, 50, 30, 4, torch.float32, device, seed=47)
    W = torch.nn.Parameter(t["weight"].clone(), requires_grad=False)
    A, B = t["lora_A"], t["lora_B"]
    first = dora_row_norms(W, A, B, 1.0)
    assert torch.equal(dora_row_norms(W.t().t(), A, B, 1.0), first)  # views hit the same entry
    with torch.no_grad():
        W.mul_(2.0)  # bumps the version counter
    assert_close_to_oracle("w", dora_row_norms(W, A, B, 1.0), _norms64(W, A, B, 1.0), torch.linalg.norm(W + B @ A, dim=1))
    clear_norm_cache()


# ----------------------------------------------------------------------------------------------
# What is saved for backward; bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["composite", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_for_backward(backend, p, device):
    """x (a view, not a copy), T [M, r], z [M, N], the norms [N], the seed and the LoRA op's mask
    state (integer, at most a bit per element of x in 32-bit words); no [N, K] tensor other than W itself, no
    dropped copy of x, no float or byte mask."""
    M, K, N, r = 40, 30, 20, 6
    t = make_inputs(M, K, N, r, torch.float32, device, seed=53)
    x = t["x"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        rk.dora_linear(x, t["weight"], t["lora_A"].requires_grad_(), t["lora_B"], t["magnitude"].requires_grad_(),
                       1.0, t["bias"], p, seed=1, backend=backend)
    params = {id(v) for v in t.values() if v is not None}
    ours = [s for s in saved if id(s) not in params]
    floats = [s for s in ours if s.is_floating_point()]
    assert sorted(tuple(s.shape) for s in floats) == sorted([(N,), (M, K), (M, N), (M, r)])
    bits = M * -(-K // 32) * 4  # one bit per element of x, rows padded to 32-bit words
    assert all(s.element_size() * s.numel() <= max(8, bits) for s in ours if not s.is_floating_point())
    assert next(s for s in ours if s.shape == (M, K)).data_ptr() == x.data_ptr()
    assert not any(s.shape == (N, K) for s in ours)


@pytest.mark.parametrize("magnitude, err, match", [
    (torch.ones(5), ValueError, "magnitude must have shape"),
    (torch.ones(7, 1), ValueError, "magnitude must have shape"),
    (torch.ones(7, dtype=torch.float16), TypeError, "magnitude dtype"),
    (torch.ones(7, dtype=torch.int64), TypeError, "magnitude must be a floating"),
    ("m", TypeError, "magnitude must be a torch.Tensor"),
])
def test_bad_magnitude(magnitude, err, match):
    x, W, A, B = torch.randn(3, 4), torch.randn(7, 4), torch.randn(2, 4), torch.randn(7, 2)
    with pytest.raises(err, match=match):
        rk.dora_linear(x, W, A, B, magnitude, 1.0, backend="composite")
    with pytest.raises(err, match=match):
        rk.reference.dora_linear(x, W, A, B, magnitude, 1.0)


# ----------------------------------------------------------------------------------------------
# LoRALinear(use_dora=True)
# ----------------------------------------------------------------------------------------------
def test_layer_init_forward_merge(device):
    torch.manual_seed(59)
    layer = rk.LoRALinear(45, 23, r=5, alpha=8, use_dora=True, backend="composite", device=device)
    W = layer.base_layer.weight
    m = layer.lora_magnitude_vector.weight
    assert m.requires_grad and not W.requires_grad
    assert_close_to_oracle("m", m, torch.linalg.norm(W.double(), dim=1), torch.linalg.norm(W, dim=1))  # PEFT's init
    assert "lora_magnitude_vector.weight" in layer.state_dict()
    x = torch.randn(6, 45, device=device)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0 and m = ||W||: the base layer
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        m.mul_(1 + 0.2 * torch.rand_like(m))
    layer.eval()
    y = layer(x)
    W0 = W.detach().clone()
    A, B, s, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scaling, layer.base_layer.bias.detach()

    def reference(weight, dtype):  # the layer's math (eval: no dropout) on ``weight``, in ``dtype``
        return rk.reference.dora_linear(*(t.to(dtype) for t in (x, weight, A, B, m.detach())), s, b.to(dtype))

    # PyTorch's merge and unmerge in fp32 (PEFT's formulas), the same-dtype results of the rule
    delta = s * (B @ A)
    factor = (m.detach() / torch.linalg.norm(W0 + delta, dim=1))[:, None]
    merged = factor * (W0 + delta)
    oracle = reference(W0, torch.float64)
    assert_close_to_oracle("y", y, oracle, reference(W0, torch.float32))
    layer.merge()
    assert layer.merged and not torch.equal(W, W0)
    assert_close_to_oracle("y(merged)", layer(x), oracle, torch.nn.functional.linear(x, merged, b))
    layer.unmerge()
    unmerged = merged / factor - delta
    assert_close_to_oracle("W(unmerged)", W, W0.double(), unmerged)
    assert_close_to_oracle("y(unmerged)", layer(x), oracle, reference(unmerged, torch.float32))


# ----------------------------------------------------------------------------------------------
# PEFT: a tiny Llama with use_dora=True, patched
# ----------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_dora_llama(use_rslora, dropout, dtype=torch.float32, seed=0, n_layers=2, hidden=32, inter=44, r=4):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                                      use_rslora=use_rslora, use_dora=True))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B; magnitudes moved off their init so g != 1
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                prm.mul_(1 + 0.2 * torch.rand_like(prm))
    return model


def _layers_against_peft(model, ref, step):
    """Run ``step(model)`` (a forward and backward) with each PEFT LoRA layer's x, y and dy recorded;
    then each layer's y from its x, its adapter grads from its dy, and the grad of each input tensor
    (dx, summed over the layers that read it) by the numerics rule against ``ref``'s layer of that
    name (PEFT's own, unpatched) in float64 (the oracle) and fp32. Layer by
    layer, not the logits: through a whole model an fp32 rounding difference grows with the model's
    conditioning, past what one op's rule allows two correct fp32 runs. Returns the names checked."""
    peft = pytest.importorskip("peft")
    records, handles, dxs = {}, [], {}
    for name, layer in model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            rec = records[name] = {}

            def hook(mod, args, out, rec=rec):
                x = rec["x"] = args[0]  # held: its id stays its own for the step
                rec["y"] = out.detach()
                out.register_hook(lambda g: rec.__setitem__("dy", g.detach()))
                if x.requires_grad and id(x) not in dxs:  # the layers' inputs read by nothing else
                    dxs[id(x)] = None
                    x.register_hook(lambda g: dxs.__setitem__(id(x), g.detach()))

            handles.append(layer.register_forward_hook(hook))
    try:
        step(model)
    finally:
        for h in handles:
            h.remove()
    parts = ("lora_A", "lora_B", "lora_magnitude_vector")
    dx_sums = {}
    for name, rec in records.items():
        layer, runs = model.get_submodule(name), []
        for dtype in (torch.float64, torch.float32):
            twin = copy.deepcopy(ref.get_submodule(name)).to(dtype)
            x = rec["x"].detach().to(dtype).requires_grad_()
            y = twin(x)
            y.backward(rec["dy"].to(dtype))
            runs.append([y] + [getattr(twin, k)["default"].weight.grad for k in parts])
            if id(rec["x"]) in dxs:
                sums = dx_sums.setdefault(id(rec["x"]), {})
                sums[dtype] = x.grad if dtype not in sums else sums[dtype] + x.grad
        got = [rec["y"]] + [getattr(layer, k)["default"].weight.grad for k in parts]
        for what, g, o, t in zip(("y",) + parts, got, *runs):
            assert_close_to_oracle(f"{name} {what}", g, o, t)
    assert dx_sums.keys() == dxs.keys()
    for key, sums in dx_sums.items():
        assert_close_to_oracle("dx", dxs[key], sums[torch.float64], sums[torch.float32])
    return list(records)


def _ids(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (2, 7), generator=g)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_peft_dora_patch_matches_peft(use_rslora, monkeypatch):
    """All 14 DoRA layers (7 projection types x 2 layers) fused; each layer's y and adapter grads
    (A, B, magnitude) match PEFT's own layer in float64 (the oracle) by the numerics rule, with PEFT
    in fp32 as the same-dtype yardstick (_layers_against_peft); unpatch restores PEFT bit for bit."""
    model = _peft_dora_llama(use_rslora, 0.0)
    model.train()
    peft32 = copy.deepcopy(model)
    calls = []
    orig = rk.DoRALinearFunction.apply
    monkeypatch.setattr(rk.DoRALinearFunction, "apply", lambda *a: calls.append(a[-1]) or orig(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer left on PEFT's forward
        assert rk.peft.patch(model, backend="composite") == len(TARGETS) * 2
    ids = _ids()

    def fwd_bwd(m):
        logits = m(input_ids=ids).logits
        (logits.double() * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()

    assert len(_layers_against_peft(model, peft32, fwd_bwd)) == len(TARGETS) * 2
    assert len(calls) == len(TARGETS) * 2

    rk.peft.unpatch(model)
    model.zero_grad()
    peft32.zero_grad()
    assert torch.equal(model(input_ids=ids).logits, peft32(input_ids=ids).logits)


def _saved_bytes(model, ids):
    """(bytes of the distinct storages autograd still holds for backward after the forward, not
    counting parameters; their descriptions)."""
    return providers.saved_for_backward(lambda: model(input_ids=ids).logits, model.parameters(), held_only=True)


@pytest.mark.parametrize("backend", ["composite"])
def test_peft_dora_dropout_saved_bytes(backend):
    """Dropout 0.1, training: the patched model saves at most 0.8x the bytes PEFT's DoRA saves
    and no [out, in] tensor of its own (W is a parameter, not counted); its loss still trains."""
    model = _peft_dora_llama(True, 0.1, hidden=64, inter=96, r=8)
    model.train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(7))  # 33 tokens: no activation is [out, in]-shaped
    peft_bytes, _ = _saved_bytes(ref, ids)
    assert rk.peft.patch(model, backend=backend) == len(TARGETS) * 2
    ours_bytes, ours_saved = _saved_bytes(model, ids)
    weight_shapes = {f"{list(m.get_base_layer().weight.shape)} " for m in model.modules() if hasattr(m, "lora_A")}
    assert not any(w.startswith(s) for w in ours_saved for s in weight_shapes), ours_saved
    assert ours_bytes <= 0.8 * peft_bytes, (ours_bytes, peft_bytes, ours_bytes / peft_bytes)
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if "lora_magnitude_vector" in n)


@pytest.mark.parametrize("dtype, p", [(torch.float32, 0.0), (torch.bfloat16, 0.3)])
def test_opcheck(dtype, p, device):
    """The custom ops and their fake kernels agree (what torch.compile traces through)."""
    t = make_inputs(7, 12, 10, 3, dtype, device, adapter_dtype=torch.float32, seed=61)
    seed = torch.tensor(1234, device=device)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], t["bias"], 0.5, p, seed, "composite")
    torch.library.opcheck(torch.ops.rslora_kernels.dora_linear_fwd.default, args)
    y, z, T, w, state = torch.ops.rslora_kernels.dora_linear_fwd(*args)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.rslora_kernels.dora_linear_bwd.default,
                          (dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], T, z, w, t["magnitude"], 0.5, p, seed,
                           state, [True, True, True, True, True], "composite"))


def test_peft_dora_fan_in_fan_out_gpt2():
    """GPT-2's Conv1D keeps W as [in, out]: the patch passes W.t() (a view) to dora_linear."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=53, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True))
    model.eval()  # GPT-2's own dropouts off
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                prm.mul_(1 + 0.2 * torch.rand_like(prm))
    ref = copy.deepcopy(model)
    assert rk.peft.patch(model, backend="composite") == 2
    ids = torch.randint(0, 53, (2, 6))
    assert len(_layers_against_peft(model, ref, lambda m: m(input_ids=ids).logits.sum().backward())) == 2


class _FixedMaskDropout(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout: drops with the kernels' own mask, so PEFT's dropout branch
    of DoRA can be compared with ours element for element."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


def test_dropout_branch_matches_peft_layer():
    """PEFT's DoRA layer in training with dropout (its `x W^T + b + (g-1) xd W^T + g s lora(xd)`
    branch, fed our mask) against rk.dora_linear with the seed of that mask: forward and grads."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    K, N, M, p, seed = 37, 29, 23, 0.1, 77

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N).double()

    model = peft.get_peft_model(Holder(), peft.LoraConfig(r=5, lora_alpha=8, target_modules=["proj"], lora_dropout=p,
                                                          use_rslora=True, use_dora=True))
    layer = model.base_model.model.proj
    model.train()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    mask = rk.dropout_mask(seed, (M, K), p)
    layer.lora_dropout["default"] = _FixedMaskDropout(mask, p)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    y_peft = layer(x)
    prm = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight)
    grads_peft = torch.autograd.grad(y_peft.sum(), (x, *prm))
    base = layer.get_base_layer()
    y = rk.dora_linear(x, base.weight, *prm, layer.scaling["default"], bias=base.bias, dropout_p=p, seed=seed,
                       backend="composite")
    grads = torch.autograd.grad(y.sum(), (x, *prm))
    torch.testing.assert_close(y, y_peft)
    for g, g_peft in zip(grads, grads_peft):
        torch.testing.assert_close(g, g_peft)


def test_reference_backend_uses_the_kernels_mask():
    """backend="reference" draws the same mask as the fused backends for a seed."""
    t = make_inputs(13, 21, 17, 4, torch.float64, torch.device("cpu"), seed=67)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 0.9, t["bias"], 0.3)
    y = rk.dora_linear(*args, seed=71, backend="reference")
    torch.testing.assert_close(y, rk.reference.dora_linear(*args, rk.dropout_mask(71, (13, 21), 0.3)))
    torch.testing.assert_close(y, rk.dora_linear(*args, seed=71, backend="composite"))


def test_inject_use_dora():
    model = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5))
    rk.inject(model, ["0", "2"], r=2, alpha=4, use_dora=True, backend="composite")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{i}.{k}.weight" for i in (0, 2) for k in ("lora_A", "lora_B", "lora_magnitude_vector")]
    x = torch.randn(4, 9)
    torch.testing.assert_close(model(x), model[2].base_layer(model[1](model[0].base_layer(x))))  # fresh: the base
