"""rk.peft.patch(fuse_siblings=True): sibling LoRA layers (q/k/v, gate/up) found at run time and run
as one rk.lora_linear_group, on a tiny Llama and a tiny Qwen2 (no downloads): layer 0's attention
and MLP learn in every forward, the other layers run grouped from the first step; every mismatch
runs the member alone; nothing held past the parent's forward; a checkpoint resume is bit-exact;
unpatch restores PEFT bit-exactly."""
import copy
import importlib

import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.ops import group as group_mod

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

# the module (rslora_kernels.ops exports a function of the same name): where the layers draw their seeds
lora_linear_mod = importlib.import_module("rslora_kernels.ops.lora_linear")

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


def _checked_step(model, seed=None, what="model", run=None):
    """One _step of ``model`` (a patched PEFT model; ``run``, when given, is stepped instead: a
    compiled ``model``, the hooks put on before it compiles) with every LoRA layer's call recorded, then
    each checked by the numerics rule against the reference formula in float64 (oracle) and fp32
    (the same math in the dtype): its y from its recorded x (with the mask of the seed it drew: the
    layers with dropout draw one each, in call order, the group for its members in member order),
    dA and dB from its recorded dy, and the grad of each input tensor (dx, summed over the layers
    that read it). Layer by layer, not the model's logits against another run's: through the whole
    model an fp32 rounding difference grows by the model's conditioning, so two correct fp32 runs
    (the group's GEMM shapes, the members' or PEFT's) differ by more than one op's rule allows."""
    calls, dxs, seeds, handles = [], {}, [], []
    draw = lora_linear_mod.draw_seed

    def recording_draw(device):
        seeds.append(draw(device))
        return seeds[-1]

    def hook(layer, args, out):  # a forward hook leaves x as it is: the group still runs
        x = args[0]
        p = layer.lora_dropout["default"].p if layer.training and isinstance(layer.lora_dropout["default"],
                                                                             torch.nn.Dropout) else 0.0
        rec = dict(layer=layer, x=x, y=out.detach(), p=p)  # x held: its id stays its own for the step
        if out.requires_grad:  # not for a frozen base linear alone on an input without grad
            out.register_hook(lambda g: rec.__setitem__("dy", g.detach()))
        if x.requires_grad and id(x) not in dxs:
            dxs[id(x)] = None
            x.register_hook(lambda g: dxs.__setitem__(id(x), g.detach()))
        calls.append(rec)

    names = {m: n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = list(names)
    handles = [layer.register_forward_hook(hook) for layer in layers]
    lora_linear_mod.draw_seed = recording_draw
    try:
        result = _step(model if run is None else run(), seed)
    finally:
        lora_linear_mod.draw_seed = draw
        for h in handles:
            h.remove()
    dropping = [rec for rec in calls if rec["p"] > 0]
    assert len(seeds) == len(dropping), (len(seeds), len(dropping))
    for rec, drawn in zip(dropping, seeds):
        rec["seed"] = drawn
    assert {id(layer) for layer in layers} == {id(rec["layer"]) for rec in calls} and len(calls) == len(layers)
    dx_runs = {}
    for rec in calls:
        layer, x = rec["layer"], rec["x"]
        base = layer.get_base_layer()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        adapter = not (layer.disable_adapters or layer.merged)  # else PEFT's forward: the base linear alone
        runs = []
        for dtype in (torch.float64, torch.float32):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
            weight, bias = (None if t is None else t.detach().to(dtype) for t in (base.weight, base.bias))
            if adapter:
                mask = rk.dropout_mask(rec["seed"], x.shape, rec["p"], x.device) if rec["p"] > 0 else None
                y = rk.reference.lora_linear(leaves[0], weight, leaves[1], leaves[2], layer.scaling["default"], bias,
                                             rec["p"], mask)
            else:
                y = torch.nn.functional.linear(leaves[0], weight, bias)
            if "dy" not in rec:
                runs.append([y])
                continue
            y.backward(rec["dy"].to(dtype))
            runs.append([y, leaves[1].grad, leaves[2].grad])
            if id(x) in dxs:
                sums = dx_runs.setdefault(id(x), {})
                sums[dtype] = leaves[0].grad if dtype not in sums else sums[dtype] + leaves[0].grad
        name = f"{what}: {names[layer]}"
        if not adapter:
            assert A.grad is None and B.grad is None
            runs = [run[:1] for run in runs]
        for part, got, o, t in zip(["y", "dA", "dB"], [rec["y"], A.grad, B.grad], *runs):
            assert_close_to_oracle(f"{name} {part}", got, o, t)
    assert dx_runs.keys() == dxs.keys()
    for key, sums in dx_runs.items():
        assert_close_to_oracle(f"{what}: dx", dxs[key], sums[torch.float64], sums[torch.float32])
    return result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_groups_found_and_match_peft(arch, group_calls):
    """In every step layer 0's attention and MLP (the learners) run their members alone; in the other
    layers q/k/v and gate/up run as groups from the first step on (o_proj and down_proj read other
    tensors: alone). Every layer of both steps and of our unfused patch (dropout 0) meets the
    float64 oracle (_checked_step)."""
    model = _peft_model(arch)
    unfused = copy.deepcopy(model)
    assert rk.peft.patch(model, backend=BACKEND, fuse_siblings=True) == len(TARGETS) * N_LAYERS
    rk.peft.patch(unfused, backend=BACKEND)
    grouped = [2] * (N_LAYERS - 1) + [3] * (N_LAYERS - 1)
    _checked_step(model, what="first")
    assert sorted(group_calls) == grouped
    _checked_step(model, what="second")
    assert sorted(group_calls) == sorted(grouped * 2)
    _checked_step(unfused, what="unfused")
    for g in _groups(model):  # nothing held past the parent's forward
        assert g._held == {} and g._seen == []


def test_checked_step_sees_a_wrong_group_output(group_calls, monkeypatch):
    """_checked_step fails a group that hands one member another member's dropout mask: the
    seeds swapped between members (what a draw out of member order would give)."""
    model = _peft_model(dropout=0.1)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    orig = group_mod.LoRALinearGroupFunction.apply

    def swapped(x, meta, *tensors):
        return orig(x, meta, *tensors[:-1], tensors[-1].flip(0))

    monkeypatch.setattr(group_mod.LoRALinearGroupFunction, "apply", swapped)
    with pytest.raises(AssertionError, match="exceed the bound"):
        _checked_step(model)


def test_dropout_draws_the_seeds_of_the_unfused_patch(group_calls):
    """With dropout each member keeps its own mask: the group draws the members' seeds in their
    call order, so a grouped step and an unfused one from the same torch seed both meet the oracle
    run with the masks of that seed."""
    model = _peft_model(dropout=0.1)
    unfused = copy.deepcopy(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    rk.peft.patch(unfused, backend=BACKEND)
    torch.manual_seed(3)
    want = [lora_linear_mod.draw_seed(DEV) for _ in range(len(TARGETS) * N_LAYERS)]
    for what, m in [("grouped", model), ("unfused", unfused)]:
        seeds = []
        draw = lora_linear_mod.draw_seed
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lora_linear_mod, "draw_seed", lambda device: seeds.append(draw(device)) or seeds[-1])
            _checked_step(m, seed=3, what=what)  # each layer with the mask of the seed drawn in its call order
        assert [int(t) for t in seeds] == [int(t) for t in want], what  # the same draws, grouped or not
    assert len(group_calls) == 2 * (N_LAYERS - 1)
    model.eval()  # eval: p = 0 for every member, still grouped
    group_calls.clear()
    _checked_step(model, what="grouped (eval)")
    assert len(group_calls) == 2 * (N_LAYERS - 1)


def _attn(model, i=0):
    return model.base_model.model.model.layers[i].self_attn


@pytest.mark.parametrize("mismatch", ["pre_hook_new_tensor", "disabled_adapter", "merged", "train_to_eval"])
def test_mismatch_runs_the_member_alone(mismatch, group_calls):
    model = _peft_model(dropout=0.1 if mismatch == "train_to_eval" else 0.0)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    attn = _attn(model, 1)  # layer 1: grouped by what layer 0's attention learns
    k = attn.k_proj
    if mismatch == "pre_hook_new_tensor":  # k now reads a different tensor than q and v
        # (detached, so that x's grad is q's and v's alone, as _checked_step sums it)
        k.register_forward_pre_hook(lambda mod, args: (args[0].detach().clone().requires_grad_(),))
    elif mismatch == "disabled_adapter":  # v on PEFT's forward (base only): left out of the group
        attn.v_proj.enable_adapters(False)
    elif mismatch == "merged":
        attn.v_proj.merge()
    else:  # k switches to eval between q's call (which computed k's output with dropout) and its own
        attn.q_proj.register_forward_hook(lambda mod, args, out: k.eval() and None)
        seen = {}
        k.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    group_calls.clear()
    if mismatch != "train_to_eval":
        _checked_step(model, seed=4)
    else:  # k ran alone, in eval (no dropout): the reference in float64, and PEFT's own forward of k, on its x
        _step(model, seed=4)
        assert not k.training
        W, A, B = k.get_base_layer().weight, k.lora_A["default"].weight, k.lora_B["default"].weight
        with torch.no_grad():
            y64 = rk.reference.lora_linear(seen["x"].double(), W.double(), A.double(), B.double(), k.scaling["default"])
            assert_close_to_oracle("k (eval)", seen["y"], y64, type(k).forward(k, seen["x"]))
    for g in _groups(model):
        assert g._held == {} and g._seen == []
    # layer 1's attention: q/k/v (the pattern layer 0 learned; k takes no held output, the pre-hook gave
    # it another tensor, or it switched to eval), q/k (v disabled or merged: not a plain member); its MLP
    expected = {"pre_hook_new_tensor": [2, 3], "disabled_adapter": [2, 2], "merged": [2, 2], "train_to_eval": [2, 3]}
    assert sorted(group_calls) == expected[mismatch]


def test_held_outputs_die_with_the_parent_forward(group_calls):
    """A sibling that is never called (its parent returns early here: an exception) leaves nothing
    held; the parent's forward hook runs even when the forward raises."""
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    group_calls.clear()
    attn = _attn(model, 1)
    attn.k_proj.register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        _step(model)
    assert group_calls == [3]  # layer 1's q computed the group; k raised before taking its output
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


def test_patched_again_after_unpatch_groups_again(group_calls):
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    rk.peft.unpatch(model)
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    _step(model)
    assert sorted(group_calls) == [2] * (N_LAYERS - 1) + [3] * (N_LAYERS - 1)


def test_default_is_off(group_calls):
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND)
    _step(model)
    _step(model)
    assert group_calls == [] and not list(_groups(model))


def test_compiled_model_meets_the_oracle():
    """Under torch.compile every layer of a grouped model meets the float64 oracle, as the unfused
    patch does (whether the group runs inside the compiled graph or not)."""
    torch._dynamo.reset()
    model = _peft_model()
    rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
    try:
        _checked_step(model, what="compiled", run=lambda: torch.compile(model, backend="aot_eager"))
    finally:
        torch._dynamo.reset()


def _train(model, opt, steps, first_step):
    for step in range(first_step, first_step + steps):
        ids, labels = _batch(seed=100 + step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_resume_is_bit_exact(group_calls):
    """A grouped Llama trained 6 steps at dropout 0.1, and the same trained 3 steps, saved (adapter
    weights, optimizer, torch's RNG state), rebuilt, patched, restored and trained 3 more: the same
    adapter weights bit for bit. The rebuilt model's first step groups as the uninterrupted run's
    fourth does (docs/group.md, Finding siblings in a model)."""
    def build():
        model = _peft_model(dropout=0.1)
        rk.peft.patch(model, backend=BACKEND, fuse_siblings=True)
        return model, torch.optim.AdamW(list(_trainable(model).values()), lr=1e-2)

    torch.manual_seed(1234)
    straight, opt = build()
    _train(straight, opt, 6, 0)
    assert group_calls  # the run is grouped

    torch.manual_seed(1234)
    first, opt = build()
    _train(first, opt, 3, 0)
    saved = ({n: p.detach().clone() for n, p in _trainable(first).items()}, copy.deepcopy(opt.state_dict()),
             torch.get_rng_state())
    del first, opt
    resumed, opt = build()  # the build draws from the RNG too; the saved state is set after it
    with torch.no_grad():
        for n, p in _trainable(resumed).items():
            p.copy_(saved[0][n])
    opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    _train(resumed, opt, 3, 3)

    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
