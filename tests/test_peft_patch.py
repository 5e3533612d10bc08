"""rslora_kernels.peft: patch/unpatch of Hugging Face PEFT LoRA models, state_dict key maps.

A tiny Llama from a LlamaConfig (no downloads) with LoRA on q, k, v, o, gate, up, down.
"""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.dropout import draw_seed

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2
BACKEND = "triton"  # the fused kernels (Triton interpreter on CPU)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_test_device():
    """Models and tensors of these tests are created on the test device (cuda when present)."""
    with torch.device(DEV):
        yield


def _llama(seed=0, dtype=torch.float32, n_layers=N_LAYERS):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _peft_llama(use_rslora=True, dropout=0.0, seed=0, **cfg):
    model = get_peft_model(_llama(seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                                     use_rslora=use_rslora, **cfg))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B (and fresh A) so the adapters matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def _batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 7), generator=g, device="cpu").to(DEV)
    return ids, ids.roll(-1, dims=1)


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _logits_and_grads(model, ids, labels, seed=None):
    """Logits and the grads of the trainable parameters after ``loss.backward()``; the forward runs
    from torch seed ``seed`` when given (dropout seeds are drawn from torch's generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.logits, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_each_layer_against_peft(model, ref, run):
    """Run ``run(model)`` (forward + backward) on the patched ``model`` while recording every LoRA
    layer's input x, output y, dy and dx; then run the same layer of ``ref`` (unpatched PEFT) on that
    x and dy in float64 (the oracle) and in fp32 (the same-dtype PyTorch result) and compare y, dx,
    dA and dB by the numerics rule.

    Per layer, because that is where the rule is defined: a whole model amplifies the rounding of
    two equally accurate implementations differently (on the 2-layer Llama the max-abs error ratio
    of logits reached 3 for a layer-wise-accurate kernel), so a model-level ratio tests noise."""
    records, handles = {}, []
    for name, layer in model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            rec = records[name] = {}

            def forward_hook(mod, args, out, rec=rec):
                rec["x"], rec["y"] = args[0].detach(), out.detach()

            def backward_hook(mod, grad_in, grad_out, rec=rec):
                rec["dx"], rec["dy"] = grad_in[0], grad_out[0].detach()

            handles += [layer.register_forward_hook(forward_hook), layer.register_full_backward_hook(backward_hook)]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    ref_layers = dict(ref.named_modules())
    for name, rec in records.items():
        layer = model.get_submodule(name)
        got = [rec["y"], rec["dx"], layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        runs = []
        for dtype in (torch.float64, torch.float32):
            twin = copy.deepcopy(ref_layers[name]).to(dtype)
            x = rec["x"].to(dtype).requires_grad_(rec["dx"] is not None)
            y = twin(x)
            y.backward(rec["dy"].to(dtype))
            runs.append([y, x.grad, twin.lora_A["default"].weight.grad, twin.lora_B["default"].weight.grad])
        for what, g, o, t in zip(["y", "dx", "dA", "dB"], got, *runs):
            if g is not None:
                assert_close_to_oracle(f"{name} {what}", g, o, t)
    return records


def _check_against_oracle(got, oracle, same):
    """(logits, grads) of the model under test against a float64 oracle run, with ``same`` the run of
    PyTorch (PEFT or our reference backend) doing the same math in the same dtype."""
    assert got[1].keys() == oracle[1].keys() == same[1].keys()
    assert_close_to_oracle("logits", got[0], oracle[0], same[0])
    for name in got[1]:
        assert_close_to_oracle(name, got[1][name], oracle[1][name], same[1][name])


@pytest.fixture
def count_fused_calls(monkeypatch):
    """Counts calls of the fused autograd Function (proves the patched forward runs our op)."""
    calls = []
    orig = rk.LoRALinearFunction.apply

    def spy(*args):
        calls.append(args[-1])
        return orig(*args)

    monkeypatch.setattr(rk.LoRALinearFunction, "apply", spy)
    return calls


@pytest.mark.parametrize("use_rslora", [True, False])
def test_patched_logits_and_grads_match_peft(use_rslora, count_fused_calls):
    model = _peft_llama(use_rslora)
    ref = copy.deepcopy(model)  # PEFT's own layers: in float64 the oracle, in fp32 the same-dtype result
    n_lora = len(TARGETS) * N_LAYERS
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == (8 / 2 if use_rslora else 8 / 4)  # PEFT's own scaling (exact: sqrt(4) = 2)
    assert rk.peft.patch(model, backend=BACKEND) == n_lora
    assert all(rk.peft.is_patched(m) for m in _lora_layers(model))
    ids, labels = _batch()
    records = _check_each_layer_against_peft(model, ref, lambda m: _logits_and_grads(m, ids, labels))
    assert len(records) == n_lora and len(count_fused_calls) == n_lora and set(count_fused_calls) == {"triton"}
    # dx is checked wherever it flows: everywhere but layer 0's q/k/v (their input comes from frozen embeddings)
    assert sum(rec["dx"] is not None for rec in records.values()) == n_lora - 3


def test_unpatch_restores_peft_exactly(count_fused_calls):
    model = _peft_llama()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND)
    assert rk.peft.patch(model, backend=BACKEND) == 0  # already patched: nothing new
    with pytest.raises(ValueError, match="backend"):
        rk.peft.patch(model, backend="fast")
    clone = pickle.loads(pickle.dumps(model))  # torch.save of a whole patched model works
    assert all(rk.peft.is_patched(m) for m in _lora_layers(clone))
    assert torch.equal(clone(input_ids=_batch()[0]).logits, model(input_ids=_batch()[0]).logits)  # same kernels
    assert rk.peft.unpatch(model) == len(TARGETS) * N_LAYERS
    assert not any("forward" in vars(m) or rk.peft.is_patched(m) for m in _lora_layers(model))
    ids, _ = _batch()
    count_fused_calls.clear()
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert count_fused_calls == []


def test_patched_dropout_uses_the_project_mask():
    model = _peft_llama(dropout=0.25)
    rk.peft.patch(model, backend=BACKEND)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 5, 32)
    model.train()
    torch.manual_seed(77)
    y = layer(x)
    torch.manual_seed(77)
    mask = rk.dropout_mask(draw_seed(DEV), x.shape, 0.25, DEV)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.get_base_layer()
    def reference(dtype, mask=None):
        return rk.reference.lora_linear(x.to(dtype), base.weight.to(dtype), A.to(dtype), B.to(dtype),
                                        layer.scaling["default"], None, 0.25 if mask is not None else 0.0, mask)

    assert_close_to_oracle("y(train)", y, reference(torch.float64, mask), reference(torch.float32, mask))
    model.eval()  # no dropout in eval: same as PEFT
    ref = copy.deepcopy(layer)
    rk.peft.unpatch(ref)
    assert_close_to_oracle("y(eval)", layer(x), reference(torch.float64), ref(x))


def test_patched_model_trains():
    model = get_peft_model(_llama(n_layers=1), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1))
    assert rk.peft.patch(model, backend=BACKEND) == len(TARGETS)
    ids = torch.arange(1, 9).repeat(2, 2)  # a periodic sequence: the next token is learnable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    torch.manual_seed(0)
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15, losses


def test_disabled_and_mixed_batches_use_peft_semantics():
    model = _peft_llama()
    base = _llama()  # the same base weights without adapters
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND)
    ids, _ = _batch()
    with model.disable_adapter():  # PEFT's forward: the base linears alone, the same ops as the base model
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    # merged after patching: PEFT's forward (the merged base linear) runs, as unpatched PEFT would
    q, q_ref = model.base_model.model.model.layers[0].self_attn.q_proj, ref.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    q.merge()
    q_ref.merge()
    assert torch.equal(q(x), q_ref(x))
    q.unmerge()
    q_ref.unmerge()
    names = ["default", "other"]  # PEFT allows mixed batches in eval mode only
    model.eval()
    ref.eval()
    with pytest.warns(UserWarning, match="adapter_names= mixed batch"):  # PEFT's forward unless opted in
        assert torch.equal(model(input_ids=ids, adapter_names=names).logits,
                           ref(input_ids=ids, adapter_names=names).logits)
    # fused on request (fuse_mixed_batches=True): tests/test_peft_live.py


@pytest.mark.parametrize("case", ["lora_bias", "two_active", "merged"])  # DoRA layers are fused: tests/test_dora.py
def test_adapter_states_are_decided_per_call_not_at_patch(case):
    """patch switches every lora.Linear whatever its adapters' state (read per call: tests/test_peft_live.py);
    only layer types it can never run are left out, with a warning."""
    model = _peft_llama(lora_bias=case == "lora_bias")
    if case == "two_active":
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "other"])
    if case == "merged":
        model.base_model.model.model.layers[0].self_attn.q_proj.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rk.peft.patch(model, backend=BACKEND) == len(TARGETS) * N_LAYERS


def test_fan_in_fan_out_conv1d_gpt2():
    """GPT-2's Conv1D stores W as [in, out]; the patch passes W.t() (a view) to the op."""
    cfg = transformers.GPT2Config(vocab_size=53, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(transformers.GPT2LMHeadModel(cfg),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    model.eval()  # GPT-2's own dropouts off, so the two copies see the same activations
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ref = copy.deepcopy(model)
    assert rk.peft.patch(model, backend=BACKEND) == 2
    ids = torch.randint(0, 53, (2, 6))
    assert len(_check_each_layer_against_peft(model, ref, lambda m: _logits_and_grads(m, ids, ids))) == 2


def test_bf16_base_fp32_adapters():
    """PEFT keeps adapters in fp32 next to a bf16 base; the op reads them natively. The patched
    layer's error against float64 is at most twice PEFT's own (plus a small floor)."""
    model = get_peft_model(_llama(dtype=torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(3, 5, 44, dtype=torch.bfloat16)
    y_peft = layer(x)
    rk.peft.patch(model, backend=BACKEND)
    y = layer(x)
    assert y.dtype == y_peft.dtype == torch.bfloat16
    W, A, B = layer.get_base_layer().weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = rk.reference.lora_linear(x.double(), W.double(), A.double(), B.double(), layer.scaling["default"])
    assert_close_to_oracle("y", y, want, y_peft)


# ----------------------------------------------------------------------------------------------
# state_dict keys between LoRALinear models and PEFT models
# ----------------------------------------------------------------------------------------------
def _compare_models(ours, theirs):
    """Logits of ``ours`` (LoRALinear layers) and of PEFT's ``theirs`` patched to the same backend:
    the same weights through the same kernels give the same bits exactly when the keys mapped right."""
    ids, _ = _batch()
    theirs = copy.deepcopy(theirs)
    rk.peft.patch(theirs, backend=BACKEND)
    assert torch.equal(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)


def test_state_dict_loads_into_peft_and_back():
    ours = rk.inject(_llama(), TARGETS, r=4, alpha=8.0, backend=BACKEND)
    theirs = _peft_llama(use_rslora=True, seed=0)  # same base weights (seed 0), other adapters
    torch.manual_seed(9)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, rk.LoRALinear):
                m.lora_B.weight.normal_(0, 0.3)
    # ours -> PEFT, strict
    theirs.load_state_dict(rk.peft.to_peft_state_dict(ours.state_dict()), strict=True)
    _compare_models(ours, theirs)
    # PEFT -> ours, strict (after changing PEFT's adapters)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    ours.load_state_dict(rk.peft.from_peft_state_dict(theirs.state_dict()), strict=True)
    _compare_models(ours, theirs)
    # PEFT's saved-adapter format (get_peft_model_state_dict) has our keys already, modulo the prefix
    saved = get_peft_model_state_dict(theirs)
    mapped = rk.peft.from_peft_state_dict(saved)
    ours_keys = {k for k in ours.state_dict() if ".lora_" in k}
    assert set(mapped) == ours_keys
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(".lora_" not in k for k in missing)


def test_state_dict_key_maps_other_adapters_dropped():
    sd = {"base_model.model.a.lora_A.default.weight": 1, "base_model.model.a.lora_A.other.weight": 2,
          "base_model.model.a.base_layer.weight": 3, "base_model.model.lm_head.weight": 4}
    assert rk.peft.from_peft_state_dict(sd) == {"a.lora_A.weight": 1, "a.base_layer.weight": 3, "lm_head.weight": 4}
    assert rk.peft.to_peft_state_dict({"a.lora_A.weight": 1, "lm_head.weight": 4}, adapter_name="x") == {
        "base_model.model.a.lora_A.x.weight": 1, "base_model.model.lm_head.weight": 4}


def test_package_import_does_not_import_peft():
    import subprocess
    import sys
    code = "import sys, rslora_kernels as rk; assert 'peft' not in sys.modules; rk.peft; assert 'peft' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_patched_peft_llama_compiles_fullgraph():
    """torch.compile(fullgraph=True) through PEFT + Llama + our custom op, dropout seeds drawn in graph."""
    model = _peft_llama(dropout=0.1)
    oracle = copy.deepcopy(model).double()
    rk.peft.patch(oracle, backend="reference")  # the same dropout seeds from torch's seed, so the same masks
    rk.peft.patch(model, backend=BACKEND)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, labels = _batch()
    # compiling may add at most the rule's error to the eager run of the same model (same dtype, same kernels)
    _check_against_oracle(*(_logits_and_grads(m, ids, labels, seed=3) for m in (compiled, oracle, twin)))
