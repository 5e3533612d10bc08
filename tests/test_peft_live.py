"""rslora_kernels.peft follows PEFT's live state: set_adapter / add_adapter / load_adapter /
inject_adapter_in_model / delete_adapter after patch, several active adapters, adapter_names= mixed
batches, lora_bias, set_scale; fallbacks warn once per layer and reason; report counts; enable() /
disable() for the whole process.

Layer by layer against a float64 oracle (numerics rule): PEFT's own layer in float64 where PEFT's
semantics give the same values (no dropout), else the LoRA formula with the masks of the seeds
the patched layer drew (tiny models, no downloads).
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from rslora_kernels.dropout import draw_seed

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["composite", "reference", "triton"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEV):
        yield


@pytest.fixture(autouse=True)
def _never_left_enabled():
    """enable() is process-wide: whatever a test does, PEFT's class forwards are restored after it."""
    forward = lora_layer.Linear.forward
    yield
    rk.peft.disable()
    assert lora_layer.Linear.forward is forward


@pytest.fixture
def fused_calls(monkeypatch):
    """The backend of every call the patched layers make to the ops ("group:<backend>" for the
    group op), recorded where rslora_kernels.peft calls them (the reference backend has no
    autograd Function to spy on)."""
    calls = []
    patch_mod = rk.peft  # the module (rk.peft.patch is its function)

    def spy(fn, tag=""):
        def wrapped(*args, **kwargs):
            calls.append(tag + kwargs["backend"])
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(patch_mod, "lora_linear", spy(patch_mod.lora_linear))
    monkeypatch.setattr(patch_mod, "dora_linear", spy(patch_mod.dora_linear))
    monkeypatch.setattr(patch_mod, "lora_linear_group", spy(patch_mod.lora_linear_group, "group:"))
    return calls


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 12)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _randomize(model, seed=1):
    """Non-zero B (and fresh A, lora_B biases) so every adapter matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def _mlp(targets=("up", "down"), r=4, alpha=8, dropout=0.0, **cfg):
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            lora_dropout=dropout, use_rslora=True, **cfg))


def _add(model, name, targets=("up", "down"), r=3, alpha=6, dropout=0.0, **cfg):
    model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                                       use_rslora=True, **cfg))


def _llama(n_layers=2):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=n_layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _record(model, run):
    """Run ``run(model)``; returns {layer name: {"x", "y", "dy", "dx"}} of every LoRA layer call (one call each)."""
    records, handles = {}, []
    for name, layer in _lora_layers(model).items():
        rec = records[name] = {}

        def fwd(mod, args, kwargs, out, rec=rec):
            rec["x"], rec["y"], rec["kwargs"] = args[0].detach(), out.detach(), dict(kwargs)

        def bwd(mod, grad_in, grad_out, rec=rec):
            rec["dx"], rec["dy"] = grad_in[0], grad_out[0].detach()

        handles += [layer.register_forward_hook(fwd, with_kwargs=True), layer.register_full_backward_hook(bwd)]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: r for n, r in records.items() if r}


def _check_layers_against_peft(model, ref, records, adapters):
    """Each recorded call of the patched ``model`` against the same layer of ``ref`` (unpatched PEFT,
    same weights and state, no dropout) run on the recorded x (and dy) in float64 and in fp32:
    y, dx and every listed adapter's dA and dB by the numerics rule."""
    ref_layers = _lora_layers(ref)
    for name, rec in records.items():
        layer = model.get_submodule(name)
        params = [(a, w) for a in adapters if a in layer.lora_A for w in ("lora_A", "lora_B")]
        got = [rec["y"], rec.get("dx")] + [getattr(layer, w)[a].weight.grad for a, w in params]
        runs = []
        for dtype in (torch.float64, torch.float32):
            twin = copy.deepcopy(ref_layers[name]).to(dtype)
            x = rec["x"].to(dtype).requires_grad_("dy" in rec)
            y = twin(x, **rec["kwargs"])
            if "dy" in rec:
                y.backward(rec["dy"].to(dtype))
            runs.append([y, x.grad] + [getattr(twin, w)[a].weight.grad for a, w in params])
        whats = ["y", "dx"] + [f"d{w}[{a}]" for a, w in params]
        for what, g, o, t in zip(whats, got, *runs):
            if g is not None:
                assert o is not None, f"{name} {what}: the patched layer has a grad PEFT's does not"
                assert_close_to_oracle(f"{name} {what}", g, o, t)


def _forward_backward(x):
    def run(model):
        model(x).square().sum().backward()
    return run


def _fused_report(model):
    return {n: e["fused"] for n, e in rk.peft.report(model, verbose=False).items()}


# ----------------------------------------------------------------------------------------------
# the patch reads PEFT's state at call time
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_set_adapter_after_patch_runs_fused(backend, fused_calls):
    model = _mlp()
    _add(model, "other")
    _randomize(model)
    ref = copy.deepcopy(model)
    assert rk.peft.patch(model, backend=backend) == 2
    model.set_adapter("other")
    ref.set_adapter("other")
    x = torch.randn(5, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == [backend] * 2
    _check_layers_against_peft(model, ref, records, ["other"])
    assert model.base_model.model.up.lora_A["default"].weight.grad is None  # the inactive adapter is untouched
    assert _fused_report(model) == {"base_model.model.up": {"one adapter": 1}, "base_model.model.down": {"one adapter": 1}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_adapter_after_patch_new_and_existing_layers_fused(backend, fused_calls):
    model = _mlp(targets=["up"])
    assert rk.peft.patch(model, backend=backend) == 1
    _add(model, "late", targets=["up", "down"])  # a new adapter on the patched "up" and a new LoRA layer "down"
    _randomize(model)
    down = model.base_model.model.down
    assert isinstance(down, lora_layer.Linear) and rk.peft.is_patched(down)
    ref = copy.deepcopy(model)
    rk.peft.unpatch(ref)
    model.set_adapter("late")
    ref.set_adapter("late")
    x = torch.randn(4, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == [backend] * 2
    _check_layers_against_peft(model, ref, records, ["late"])


def test_inject_adapter_in_model_and_load_adapter_after_patch(tmp_path, fused_calls):
    plain = MLP()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["up"]), plain)
    assert rk.peft.patch(plain, backend="composite") == 1
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["down"]), plain, adapter_name="b")
    assert rk.peft.is_patched(plain.down)
    # load_adapter: an adapter saved from another model, loaded into a patched one
    donor = _randomize(_mlp(targets=["up", "down"]), seed=4)
    donor.save_pretrained(tmp_path / "saved")
    model = _mlp(targets=["up"])
    rk.peft.patch(model, backend="composite")
    model.load_adapter(str(tmp_path / "saved"), adapter_name="loaded")
    assert rk.peft.is_patched(model.base_model.model.down)
    model.set_adapter("loaded")
    fused_calls.clear()
    x = torch.randn(3, 16)
    records = _record(model, lambda m: m(x))
    assert fused_calls == ["composite"] * 2
    _check_layers_against_peft(model, donor, records, [])  # the donor's active "default" holds "loaded"'s weights


def test_unpatch_stops_patching_late_layers():
    model = _mlp(targets=["up"])
    rk.peft.patch(model, backend="composite")
    rk.peft.unpatch(model)
    _add(model, "late", targets=["down"])
    assert not any(rk.peft.is_patched(m) for m in _lora_layers(model).values())


def test_delete_adapter_does_not_crash(fused_calls):
    model = _mlp()
    _add(model, "other")
    _randomize(model)
    rk.peft.patch(model, backend="composite")
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 16)
    model(x)
    model.delete_adapter("other")  # PEFT leaves "default" active
    ref = copy.deepcopy(model)
    rk.peft.unpatch(ref)
    fused_calls.clear()
    records = _record(model, _forward_backward(x))
    assert fused_calls == ["composite"] * 2
    _check_layers_against_peft(model, ref, records, ["default"])
    for layer in _lora_layers(model).values():  # no adapter left on the layers: PEFT's base-only forward
        layer.delete_adapter("default")  # (per layer: PeftModel's own forward needs an adapter config)
    assert torch.equal(model.base_model.model(x), ref.base_model.model.down.get_base_layer()(
        torch.tanh(ref.base_model.model.up.get_base_layer()(x))))
    assert rk.peft.report(model, verbose=False)["base_model.model.up"]["base"] == {"no active adapter on this layer": 1}


def test_scaling_follows_set_scale_and_scale_layer():
    model = _randomize(_mlp())
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite")
    x = torch.randn(4, 16)
    for m in (model, ref):
        m.base_model.model.up.set_scale("default", 0.25)
        m.base_model.model.down.scale_layer(3.0)
    _check_layers_against_peft(model, ref, _record(model, lambda m: m(x)), [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_bias_fused(backend, fused_calls):
    model = _randomize(_mlp(lora_bias=True))
    assert model.base_model.model.up.lora_B["default"].bias is not None
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=backend)
    x = torch.randn(4, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == [backend] * 2
    _check_layers_against_peft(model, ref, records, ["default"])
    up, up_ref = model.base_model.model.up, ref.base_model.model.up
    twin = copy.deepcopy(up_ref).double()
    twin(x.double()).square().sum().backward()  # lora_B's bias grad against PEFT's in float64 (same loss)
    ref_run = copy.deepcopy(up_ref)
    ref_run(x).square().sum().backward()
    got = copy.deepcopy(up)
    got(x).square().sum().backward()
    assert_close_to_oracle("db_B", got.lora_B["default"].bias.grad, twin.lora_B["default"].bias.grad,
                           ref_run.lora_B["default"].bias.grad)


# ----------------------------------------------------------------------------------------------
# several active adapters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_several_active_adapters_one_fused_call(backend, fused_calls):
    model = _mlp()
    _add(model, "b", r=3)
    _add(model, "c", r=5, alpha=3)
    _randomize(model)
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=backend)
    for m in (model, ref):
        m.base_model.set_adapter(["default", "b", "c"])
    x = torch.randn(6, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == [backend] * 2  # one op call per layer for the three adapters
    _check_layers_against_peft(model, ref, records, ["default", "b", "c"])
    assert _fused_report(model)["base_model.model.up"] == {"3 adapters": 1}


def _lora_formula(x, layer, adapters, masks, dtype, weight=None):
    """y of a PEFT LoRA layer with these active adapters and dropout masks (None: no dropout), in
    ``dtype``, with autograd to x and the adapters (returned as leaves {(adapter, 'A'|'B'): tensor});
    ``weight``: the base weight when it is not ``base.weight`` (a dequantized 4-bit one)."""
    base = layer.get_base_layer()
    x = x.to(dtype).requires_grad_()
    leaves = {}
    W = base.weight if weight is None else weight
    y = F.linear(x, W.to(dtype), None if base.bias is None else base.bias.to(dtype))
    for a in adapters:
        A = leaves[a, "A"] = layer.lora_A[a].weight.detach().to(dtype).requires_grad_()
        B = leaves[a, "B"] = layer.lora_B[a].weight.detach().to(dtype).requires_grad_()
        p = getattr(layer.lora_dropout[a], "p", 0.0)
        xd = x if masks[a] is None else x * masks[a].to(dtype) / (1 - p)
        y = y + F.linear(F.linear(xd, A), B) * layer.scaling[a]
    return y, x, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain_first", [True, False])
def test_several_active_adapters_with_dropout_each_its_own_mask(backend, plain_first, fused_calls):
    """Adapters with dropout in training draw one seed each (in PEFT's active order) and use the
    masks of those seeds; an adapter without dropout joins the fused call's stacked rank term."""
    model = _mlp(targets=["up"], dropout=0.0 if plain_first else 0.3)
    _add(model, "b", targets=["up"], dropout=0.25)
    _add(model, "c", targets=["up"], dropout=0.5, r=2)
    _randomize(model)
    rk.peft.patch(model, backend=backend)
    model.base_model.set_adapter(["default", "b", "c"])
    model.train()
    layer = model.base_model.model.up
    x = torch.randn(2, 7, 16)
    dy = torch.randn(2, 7, 24)
    torch.manual_seed(123)
    y = layer(x.requires_grad_())
    y.backward(dy)
    torch.manual_seed(123)  # the same draws, in the same order: one seed per adapter with dropout
    dropped = [a for a in ("default", "b", "c") if getattr(layer.lora_dropout[a], "p", 0.0) > 0]
    seeds = {a: draw_seed(DEV) for a in dropped}
    masks = {a: rk.dropout_mask(seeds[a], x.shape, layer.lora_dropout[a].p, DEV) if a in seeds else None
             for a in ("default", "b", "c")}
    assert not torch.equal(masks["b"], masks["c"])
    runs = []
    for dtype in (torch.float64, torch.float32):
        want, xr, leaves = _lora_formula(x.detach(), layer, ["default", "b", "c"], masks, dtype)
        want.backward(dy.to(dtype))
        runs.append([want, xr.grad] + [leaves[a, w].grad for a in ("default", "b", "c") for w in "AB"])
    got = [y, x.grad] + [getattr(layer, f"lora_{w}")[a].weight.grad for a in ("default", "b", "c") for w in "AB"]
    whats = ["y", "dx"] + [f"d{w}[{a}]" for a in ("default", "b", "c") for w in "AB"]
    for what, g, o, t in zip(whats, got, *runs):
        assert_close_to_oracle(what, g, o, t)
    assert fused_calls == [backend, "group:" + backend]


def test_several_active_adapters_tiny_llama_against_peft(fused_calls):
    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize(model)
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite")
    for m in (model, ref):
        m.base_model.set_adapter(["default", "b"])
    ids = torch.randint(0, 61, (2, 7))
    records = _record(model, lambda m: m(input_ids=ids, labels=ids).loss.backward())
    assert len(fused_calls) == len(LLAMA_TARGETS) * 2
    _check_layers_against_peft(model, ref, records, ["default", "b"])
    fused = _fused_report(model)
    assert fused["base_model.model.model.layers.0.self_attn.q_proj"] == {"2 adapters": 1}
    assert fused["base_model.model.model.layers.0.self_attn.k_proj"] == {"one adapter": 1}


def test_adapters_of_different_dtypes_fall_back_with_the_reason():
    model = _randomize(_mlp(targets=["up"]))
    _add(model, "b", targets=["up"])
    model.base_model.model.up.lora_A["b"].double()
    model.base_model.model.up.lora_B["b"].double()
    rk.peft.patch(model, backend="composite")
    model.base_model.set_adapter(["default", "b"])
    with pytest.warns(UserWarning, match=r"up runs PEFT's forward: active adapters of different dtypes"):
        model(torch.randn(2, 16))


# ----------------------------------------------------------------------------------------------
# adapter_names= mixed batches
# ----------------------------------------------------------------------------------------------
def test_mixed_batch_runs_peft_by_default_warned_and_counted(fused_calls):
    """adapter_names= batches run PEFT's forward unless fuse_mixed_batches=True: PEFT computes the
    base term on the whole batch, so its outputs are PEFT's bit for bit."""
    model = _mlp()
    _add(model, "b", r=3)
    _randomize(model)
    model.eval()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite")
    names = ["b", "default", "__base__", "b"]
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"runs PEFT's forward: adapter_names= mixed batch .*fuse_mixed_batches=True"):
        y = model(x, adapter_names=names)
    assert torch.equal(y, ref(x, adapter_names=names)) and fused_calls == []
    (reason, calls), = rk.peft.report(model, verbose=False)["base_model.model.up"]["peft"].items()
    assert reason.startswith("adapter_names= mixed batch") and calls == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_fused_on_request_and_matches_peft(backend, fused_calls):
    model = _mlp()
    _add(model, "b", r=3)
    _add(model, "only_up", targets=["up"], r=2)  # not on "down": PEFT gives those rows the base there
    _randomize(model)
    model.eval()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend=backend, fuse_mixed_batches=True)
    names = ["b", "default", "__base__", "b", "only_up", "default"]
    x = torch.randn(6, 5, 16)
    records = _record(model, lambda m: m(x, adapter_names=names))
    # up: three adapters' rows; down: two (only_up's rows take the base, as __base__'s)
    assert fused_calls == [backend] * 5
    _check_layers_against_peft(model, ref, records, [])
    assert _fused_report(model)["base_model.model.up"] == {"mixed batch": 1}
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check
        model(x, adapter_names=names[:2])


def test_mixed_batch_tiny_llama():
    model = get_peft_model(_llama(1), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS))
    _randomize(model)
    model.eval()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite", fuse_mixed_batches=True)
    ids = torch.randint(0, 61, (3, 6))
    names = ["other", "default", "__base__"]
    records = _record(model, lambda m: m(input_ids=ids, adapter_names=names))
    _check_layers_against_peft(model, ref, records, [])
    assert all(e["fused"] == {"mixed batch": 1} for e in rk.peft.report(model, verbose=False).values())


# ----------------------------------------------------------------------------------------------
# fallbacks, warnings, report
# ----------------------------------------------------------------------------------------------
def test_fallback_warns_once_per_layer_and_reason_and_report_counts(capsys):
    model = _randomize(_mlp())
    model.eval()
    rk.peft.patch(model, backend="composite", fuse_mixed_batches=True)
    up = model.base_model.model.up
    up.lora_dropout["default"] = nn.AlphaDropout(0.1)  # a dropout module PEFT runs and the patch does not
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning) as rec:
        model(x)
    assert [str(w.message).split(" (warned")[0] for w in rec] == [
        "rslora_kernels.peft: base_model.model.up runs PEFT's forward: dropout module AlphaDropout"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason on the same layer: no second warning
        model(x)
        with model.disable_adapter():  # PEFT's base-only path: counted, never warned
            model(x)
    with pytest.warns(UserWarning, match="up runs PEFT's forward: mixed batch: dropout module AlphaDropout"):
        model(x, adapter_names=["default"] * 3)  # another reason: warned once more
    got = rk.peft.report(model)
    assert got["base_model.model.up"] == {
        "fused": {}, "base": {"adapters disabled": 1},
        "peft": {"dropout module AlphaDropout": 2, "mixed batch: dropout module AlphaDropout": 1}}
    assert got["base_model.model.down"] == {"fused": {"one adapter": 2, "mixed batch": 1},
                                            "base": {"adapters disabled": 1}, "peft": {}}
    printed = capsys.readouterr().out
    assert "base_model.model.up:\n" in printed and "PEFT's forward (fallback): dropout module AlphaDropout: 2" in printed
    rk.peft.report(model, verbose=False, reset=True)
    assert all(v == {} for e in rk.peft.report(model, verbose=False).values() for v in e.values())


def test_merged_and_disabled_keep_peft_semantics():
    model = _randomize(_mlp())
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite")
    x = torch.randn(3, 16)
    for m in (model, ref):
        m.base_model.model.up.merge()
    assert torch.equal(model.base_model.model.up(x), ref.base_model.model.up(x))  # PEFT's merged base linear
    with model.disable_adapter(), ref.disable_adapter():  # PEFT unmerges a merged layer when disabled
        assert torch.equal(model(x), ref(x))
    assert not model.base_model.model.up.merged
    assert rk.peft.report(model, verbose=False)["base_model.model.up"]["base"] == {"merged": 1, "adapters disabled": 1}


def test_nothing_counted_while_compiling():
    model = _randomize(_mlp())
    rk.peft.patch(model, backend="composite")
    x = torch.randn(3, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        compiled(x)
    assert all(e["fused"] == {} for e in rk.peft.report(model, verbose=False).values())
    model(x)
    assert all(e["fused"] == {"one adapter": 1} for e in rk.peft.report(model, verbose=False).values())


# ----------------------------------------------------------------------------------------------
# enable() / disable(): process-wide
# ----------------------------------------------------------------------------------------------
def test_enable_disable_process_wide(fused_calls):
    peft_forward = lora_layer.Linear.forward
    try:
        from peft.tuners.lora.bnb import Linear4bit  # defined when bitsandbytes is installed
    except ImportError:
        Linear4bit = None
    forward_4bit = Linear4bit.forward if Linear4bit is not None else None
    rk.peft.enable(backend="reference")
    assert lora_layer.Linear.forward is not peft_forward
    assert Linear4bit is None or Linear4bit.forward is lora_layer.Linear.forward  # the same switch
    model = _randomize(_mlp())  # built after enable(): fused without patch
    ref = copy.deepcopy(model)
    x = torch.randn(4, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == ["reference"] * 2
    rk.peft.disable()
    assert lora_layer.Linear.forward is peft_forward
    assert Linear4bit is None or Linear4bit.forward is forward_4bit
    _check_layers_against_peft(model, ref, records, ["default"])
    fused_calls.clear()
    assert torch.equal(model(x), ref(x))  # PEFT's forward again
    assert fused_calls == []
    # a layer patched by patch() keeps its own backend under enable()
    rk.peft.patch(model, backend="composite")
    rk.peft.enable(backend="reference")
    model(x)
    other = _randomize(_mlp())
    other(x)
    assert fused_calls == ["composite"] * 2 + ["reference"] * 2
    assert rk.peft.disable() is True and rk.peft.disable() is False
    with pytest.raises(ValueError, match="backend"):
        rk.peft.enable(backend="fast")


def test_enable_leaves_unsupported_layer_types_to_peft():
    rk.peft.enable(backend="composite")
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))
    ids = torch.tensor([[1, 2, 3]])
    model(ids)  # the Embedding LoRA layer is not a lora.Linear: its own forward, untouched by enable()
    rep = rk.peft.report(model, verbose=False)
    assert rep["base_model.model.1"]["fused"] == {"one adapter": 1}
    assert rep["base_model.model.0"] == {"fused": {}, "peft": {}, "base": {}}


@pytest.mark.parametrize("mixed", [False, True])
def test_several_adapters_and_mixed_batches_compile_fullgraph(mixed, fused_calls):
    """torch.compile(fullgraph=True) through the several-adapter and mixed-batch paths (no graph break)."""
    model = _mlp(targets=["up"])
    _add(model, "b", targets=["up"], dropout=0.2)
    _randomize(model)
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite", fuse_mixed_batches=mixed)
    layer, ref_layer = model.base_model.model.up, ref.base_model.model.up
    kwargs = {}
    if mixed:
        model.eval()
        kwargs = {"adapter_names": ["b", "__base__", "default", "b"]}
    else:
        for m in (model, ref):
            m.base_model.set_adapter(["default", "b"])
        model.eval()  # no dropout: PEFT's layer is the oracle
    ref.eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16)
    got = compiled(x, **kwargs)
    assert fused_calls == ["composite"] * (2 if mixed else 1)  # traced through the fused paths (b, default)
    oracle = copy.deepcopy(ref_layer).double()(x.double(), **kwargs)
    assert_close_to_oracle("y", got, oracle, ref_layer(x, **kwargs))


# ----------------------------------------------------------------------------------------------
# other layer kinds the patch runs: GPT-2 Conv1D (fan_in_fan_out), DoRA, a bitsandbytes 4-bit base
# ----------------------------------------------------------------------------------------------
def test_fan_in_fan_out_several_adapters_and_mixed_batch(fused_calls):
    cfg = transformers.GPT2Config(vocab_size=53, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(transformers.GPT2LMHeadModel(cfg),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
        model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    _randomize(model)
    model.eval()
    ref = copy.deepcopy(model)
    rk.peft.patch(model, backend="composite", fuse_mixed_batches=True)
    ids = torch.randint(0, 53, (2, 6))
    for m in (model, ref):
        m.base_model.set_adapter(["default", "b"])
    _check_layers_against_peft(model, ref, _record(model, lambda m: m(input_ids=ids)), [])
    for m in (model, ref):
        m.base_model.set_adapter("default")
    _check_layers_against_peft(model, ref, _record(model, lambda m: m(input_ids=ids, adapter_names=["b", "default"])),
                               [])
    assert fused_calls == ["composite"] * 3


def test_dora_adapter_added_after_patch_runs_dora_linear(fused_calls):
    model = _mlp(targets=["up"])
    rk.peft.patch(model, backend="composite")
    _add(model, "dora", targets=["up"], use_dora=True)
    _randomize(model)
    # DoRA's magnitude as training keeps it, near the row norms of W + s B A (g within 30 % of 1), not
    # _randomize's N(0, 0.3): without dropout and with a bias the layer computes PEFT's bias form,
    # y + (g - 1)(y - b), whose error grows with |g - 1| (docs/dora.md, "Forward and backward")
    layer = model.base_model.model.up
    with torch.no_grad():
        W, s = layer.base_layer.weight, layer.scaling["dora"]
        norms = torch.linalg.norm(W + s * layer.lora_B["dora"].weight @ layer.lora_A["dora"].weight, dim=1)
        layer.lora_magnitude_vector["dora"].weight.copy_(norms * (1 + 0.3 * (2 * torch.rand(norms.shape) - 1)))
    ref = copy.deepcopy(model)
    rk.peft.unpatch(ref)
    for m in (model, ref):
        m.set_adapter("dora")
    x = torch.randn(4, 16)
    records = _record(model, _forward_backward(x))
    assert fused_calls == ["composite"]
    _check_layers_against_peft(model, ref, records, ["dora"])
    assert _fused_report(model)["base_model.model.up"] == {"one adapter (DoRA)": 1}
    model.base_model.set_adapter(["default", "dora"])  # DoRA among several: PEFT's forward, warned
    with pytest.warns(UserWarning, match="DoRA among several active adapters"):
        model(x)


def test_4bit_base_several_active_adapters():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes import functional as BF

    class Holder(nn.Module):
        is_loaded_in_4bit = True  # PEFT then builds lora.bnb.Linear4bit layers

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            w = torch.randn(32, 64) / 8
            self.proj = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            self.proj.to(DEV)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Holder(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    _randomize(model)
    model.train()  # (in eval mode without grad, bitsandbytes repacks CPU weights for its inference kernel)
    layer = model.base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    ref_layer = copy.deepcopy(layer)
    rk.peft.patch(model, backend="composite")
    model.base_model.set_adapter(["default", "b"])
    ref_layer.set_adapter(["default", "b"])
    x = torch.randn(5, 64, requires_grad=True)
    dy = torch.randn(5, 32)
    y = layer(x)
    y.backward(dy)
    assert rk.peft.report(model, verbose=False)["base_model.model.proj"]["fused"] == {"2 adapters": 1}
    W = BF.dequantize_4bit(layer.get_base_layer().weight, layer.get_base_layer().weight.quant_state)
    masks = {"default": None, "b": None}
    want, xr, leaves = _lora_formula(x.detach(), layer, ["default", "b"], masks, torch.float64, weight=W)
    want.backward(dy.double())
    xs = x.detach().clone().requires_grad_()
    same = ref_layer(xs)  # PEFT's own 4-bit layer in fp32
    same.backward(dy)
    assert_close_to_oracle("y", y, want, same)
    assert_close_to_oracle("dx", x.grad, xr.grad, xs.grad)
    for a in ("default", "b"):
        for w in "AB":
            assert_close_to_oracle(f"d{w}[{a}]", getattr(layer, f"lora_{w}")[a].weight.grad, leaves[a, w].grad,
                                   getattr(ref_layer, f"lora_{w}")[a].weight.grad)


def test_enable_fuse_mixed_batches_switch(fused_calls):
    model = _mlp(targets=["up"])
    _add(model, "b", targets=["up"])
    _randomize(model)
    model.eval()
    x, names = torch.randn(3, 16), ["b", "default", "b"]
    rk.peft.enable(backend="composite")
    with pytest.warns(UserWarning, match="adapter_names= mixed batch"):
        model(x, adapter_names=names)
    assert fused_calls == []
    rk.peft.enable(backend="composite", fuse_mixed_batches=True)
    model(x, adapter_names=names)
    assert fused_calls == ["composite"] * 2
    assert rk.peft.report(model, verbose=False)["base_model.model.up"]["fused"] == {"mixed batch": 1}
