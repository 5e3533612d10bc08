"""rk.peft.patch(fuse_siblings=True): sibling LoRA layers (q/k/v, gate/up) found at run time and run
as one rk.lora_linear_group, on a tiny Llama and a tiny Qwen2 (no downloads); every mismatch runs
the member alone; nothing held past the parent's forward; unpatch restores PEFT bit-exactly."""
import copy

import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.ops import group as group_mod

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2
BACKEND = "composite"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _base(arch, seed=0):
    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=N_LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(DEV)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).to(DEV)  # q/k/v carry biases


def _peft_model(arch="llama", dropout=0.0, seed=0):
    model = get_peft_model(_base(arch, seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         lora_dropout=dropout, use_rslora=True))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so the adapters matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def _batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2, 7), generator=g).to(DEV)
    return ids, ids.roll(-1, dims=1)


def _step(model, seed=None):
    """(logits, grads of the trainable parameters) of one forward + backward; grads zeroed first."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _groups(model):
    return {id(g): g for m in model.modules() if (g := vars(m).get("_rslora_kernels_siblings")) is not None}.values()


@pytest.fixture
def group_calls(monkeypatch):
    """The member counts of every lora_linear_group call made by the sibling groups."""
    calls = []
    orig = group_mod.LoRALinearGroupFunction.apply

    def spy(x, meta, *tensors):
        calls.append(len(meta[0]))
        return orig(x, meta, *tensors)

    monkeypatch.setattr(group_mod.LoRALinearGroupFunction, "apply", spy)
    return calls


def _assert_close_models(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    assert got[1].keys() == want[1].keys()
    for name in got[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_groups_found_and_match_peft(arch, group_calls):
    """The first step learns (every member alone); from the second, q/k/v and gate/up run as groups
    (o_proj and down_proj read other tensors: alone). Logits and grads match PEFT's own layers and
    our unfused patch (dropout 0)."""
    model = _peft_model(arch)
    ref = copy.deepcopy(model)
    unfused = copy.deepcopy(model)
    assert rk.peft.patch(model, backend=BACKEND, fuse_siblings=True) == len(TARGETS) * N_LAYERS
    rk.peft.patch(unfused, backend=BACKEND)
    first = _step(model)
    assert group_calls == []
    second = _step(model)
    assert sorted(group_calls) == [2] * N_LAYERS + [3] * N_LAYERS
    peft_run, ours = _step(ref), _step(unfused)
    for got in (first, second):
        _assert_close_models(got, ours)
        _assert_close_models(got, peft_run, rtol=1e-4, atol=1e-5)
    for g in _groups(model):  # nothing held past the parent's forward
        assert g._held == {} and g._seen == []


def test_each_member_against_the_float64_oracle(group_calls):
    """Every LoRA layer of the grouped Llama, by the numerics rule: its y from its recorded x, and
    dA, dB from its recorded dy, against the same PEFT layer in float64 (oracle) and fp32."""
    model = _peft_model()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)  # learn
    records, handles = {}, []
    for name, layer in model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            rec = records[name] = {}

            def hook(mod, args, out, rec=rec):  # a forward hook leaves x as it is: the group still runs
                rec["x"] = args[0].detach()
                rec["y"] = out.detach()
                out.register_hook(lambda g: rec.__setitem__("dy", g.detach()))

            handles.append(layer.register_forward_hook(hook))
    _step(model)
    for h in handles:
        h.remove()
    assert sorted(group_calls) == [2] * N_LAYERS + [3] * N_LAYERS
    ref_layers = dict(ref.named_modules())
    for name, rec in records.items():
        layer = model.get_submodule(name)
        got = [rec["y"], layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        runs = []
        for dtype in (torch.float64, torch.float32):
            twin = copy.deepcopy(ref_layers[name]).to(dtype)
            y = twin(rec["x"].to(dtype))
            y.backward(rec["dy"].to(dtype))
            runs.append([y, twin.lora_A["default"].weight.grad, twin.lora_B["default"].weight.grad])
        for what, g, o, t in zip(["y", "dA", "dB"], got, *runs):
            assert_close_to_oracle(f"{name} {what}", g, o, t)


def test_dropout_draws_the_seeds_of_the_unfused_patch(group_calls):
    """With dropout each member keeps its own mask: the group draws the members' seeds in their
    call order, so a grouped step equals an unfused one from the same torch seed."""
    model = _peft_model(dropout=0.1)
    unfused = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    rk.peft.patch(unfused, backend=BACKEND)
    _step(model)
    got = _step(model, seed=3)
    assert len(group_calls) == 2 * N_LAYERS
    _assert_close_models(got, _step(unfused, seed=3))
    model.eval()  # eval: p = 0 for every member, still grouped
    unfused.eval()
    group_calls.clear()
    _assert_close_models(_step(model), _step(unfused))
    assert len(group_calls) == 2 * N_LAYERS


def _attn(model, i=0):
    return model.base_model.model.model.layers[i].self_attn


@pytest.mark.parametrize("mismatch", ["pre_hook_new_tensor", "disabled_adapter", "merged", "train_to_eval"])
def test_mismatch_runs_the_member_alone(mismatch, group_calls):
    model = _peft_model(dropout=0.1 if mismatch == "train_to_eval" else 0.0)
    unfused = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    rk.peft.patch(unfused, backend=BACKEND)
    _step(model)
    attn, attn_u = _attn(model), _attn(unfused)
    k = attn.k_proj
    if mismatch == "pre_hook_new_tensor":  # k now reads a different tensor than q and v
        k.register_forward_pre_hook(lambda mod, args: (args[0].clone(),))
        attn_u.k_proj.register_forward_pre_hook(lambda mod, args: (args[0].clone(),))
    elif mismatch == "disabled_adapter":  # v on PEFT's forward (base only): left out of the group
        attn.v_proj.enable_adapters(False)
        attn_u.v_proj.enable_adapters(False)
    elif mismatch == "merged":
        attn.v_proj.merge()
        attn_u.v_proj.merge()
    else:  # k switches to eval between q's call (which computed k's output with dropout) and its own
        attn.q_proj.register_forward_hook(lambda mod, args, out: k.eval() and None)
        seen = {}
        k.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    group_calls.clear()
    got = _step(model, seed=4)
    if mismatch != "train_to_eval":
        _assert_close_models(got, _step(unfused, seed=4))
    else:  # k ran alone, in eval (no dropout): PEFT's own forward of k on the same x
        assert not k.training
        with torch.no_grad():
            torch.testing.assert_close(seen["y"], type(k).forward(k, seen["x"]), rtol=1e-5, atol=1e-6)
    for g in _groups(model):
        assert g._held == {} and g._seen == []
    # layer 0's attention: q/v (pre-hook on k), q/k (v disabled or merged) or q/k/v; the rest unchanged
    expected_first = {"pre_hook_new_tensor": 2, "disabled_adapter": 2, "merged": 2, "train_to_eval": 3}[mismatch]
    assert expected_first in group_calls and len(group_calls) == 2 * N_LAYERS


def test_held_outputs_die_with_the_parent_forward(group_calls):
    """A sibling that is never called (its parent returns early here: an exception) leaves nothing
    held; the parent's forward hook runs even when the forward raises."""
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    attn = _attn(model)
    attn.k_proj.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        _step(model)
    assert group_calls == [3]  # q computed the group; k raised before taking its output
    for g in _groups(model):
        assert g._held == {} and g._seen == []


def test_unpatch_restores_peft_exactly():
    model = _peft_model("qwen2")
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    _step(model)
    assert rk.peft.unpatch(model) == len(TARGETS) * N_LAYERS
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("_rslora_kernels_siblings" in vars(m) for m in model.modules())
    got, want = _step(model), _step(ref)
    assert torch.equal(got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


def test_default_is_off(group_calls):
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND)
    _step(model)
    _step(model)
    assert group_calls == [] and not list(_groups(model))


def test_compiled_model_gives_the_unfused_result():
    """Under torch.compile a grouped model computes what the unfused patch computes (whether the
    group runs inside the compiled graph or not)."""
    torch._dynamo.reset()
    model = _peft_model()
    unfused = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    rk.peft.patch(unfused, backend=BACKEND)
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for _ in range(2):
            got = _step(compiled)
    finally:
        torch._dynamo.reset()
    got = (got[0], {n.removeprefix("_orig_mod."): g for n, g in got[1].items()})
    _assert_close_models(got, _step(unfused))
