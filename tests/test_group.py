"""rk.lora_linear_group (sibling projections as one op): forward and every grad of every member
against the float64 oracle applied member by member (docs/design.md, Numerics rule), masks from
rk.dropout_mask, seeds drawn as the single op draws them, x saved once, validation, opcheck,
torch.compile, double backward. Composite natively; triton through the interpreter on the CPU."""
import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims of x, K, [(N_i, r_i, scaling_i, bias_i)]): ragged sizes, mixed ranks, bias on some members
CASES = {
    "qkv": ((5, 9), 45, [(23, 3, 0.7, True), (9, 16, 2.0, False), (9, 5, 1.3, True)]),
    "gate_up": ((37,), 33, [(29, 8, 1.0, False), (29, 8, 0.25, False)]),
}
SMALL = ((19,), 21, [(17, 3, 0.7, True), (6, 5, 1.5, False)])  # the interpreter is slow


def make_group(lead, K, members, dtype, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEV, dt)

    return dict(
        x=rnd(*lead, K),
        weights=[rnd(N, K, scale=K ** -0.5) for N, _, _, _ in members],
        lora_As=[rnd(r, K, scale=K ** -0.5, dt=adapter_dtype) for _, r, _, _ in members],
        lora_Bs=[rnd(N, r, scale=r ** -0.5, dt=adapter_dtype) for N, r, _, _ in members],
        biases=[rnd(N) if b else None for N, _, _, b in members],
        scalings=[s for _, _, s, _ in members],
    )


def _leaves(inputs, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    out = {"x": cast(inputs["x"]).detach().clone().requires_grad_()}
    for k in ("weights", "lora_As", "lora_Bs", "biases"):
        out[k] = [cast(t).detach().clone().requires_grad_(k != "weights") if t is not None else None
                  for t in inputs[k]]
    return out


def _grads(leaves):
    out = {"x": leaves["x"].grad}
    for k in ("lora_As", "lora_Bs", "biases"):
        for i, t in enumerate(leaves[k]):
            if t is not None:
                out[f"{k}[{i}]"] = t.grad
    return out


def run_group(inputs, ps, seeds, dys, backend):
    t = _leaves(inputs)
    ys = rk.lora_linear_group(t["x"], t["weights"], t["lora_As"], t["lora_Bs"], inputs["scalings"], t["biases"],
                              ps, seeds=seeds, backend=backend)
    torch.autograd.backward(ys, [dy.to(y.dtype) for y, dy in zip(ys, dys)])
    return ys, _grads(t)


def run_oracle(inputs, ps, seeds, dys, dtype=None):
    """The reference applied member by member, each with its mask from rk.dropout_mask."""
    t = _leaves(inputs, dtype)
    x = t["x"]
    ys = []
    for i, p in enumerate(ps):
        mask = rk.dropout_mask(seeds[i], x.shape, p, x.device) if p > 0 else None
        ys.append(rk.reference.lora_linear(x, t["weights"][i], t["lora_As"][i], t["lora_Bs"][i], inputs["scalings"][i],
                                           t["biases"][i], p, mask))
    torch.autograd.backward(ys, [dy.to(y.dtype) for y, dy in zip(ys, dys)])
    return ys, _grads(t)


def check_against_oracle(inputs, ps, backend):
    seeds = [1000 + 17 * i for i in range(len(ps))]
    g = torch.Generator().manual_seed(1)
    lead = inputs["x"].shape[:-1]
    dys = [torch.randn(*lead, W.shape[0], generator=g, dtype=torch.float64).to(DEV) for W in inputs["weights"]]
    ys, grads = run_group(inputs, ps, seeds, dys, backend)
    assert_members_match_oracle(inputs, ps, seeds, dys, ys, grads)


def assert_members_match_oracle(inputs, ps, seeds, dys, ys, grads):
    """Outputs ``ys`` and ``grads`` (from ``dys``) of a group, or of its members run one by one, by
    the numerics rule against the reference applied member by member in float64 with the masks of
    ``seeds``. Not against each other: the group and its members run different GEMM shapes, which a
    BLAS may block (and round) differently on another CPU or thread count."""
    ys64, grads64 = run_oracle(inputs, ps, seeds, dys, torch.float64)
    yst, gradst = run_oracle(inputs, ps, seeds, dys)
    for i, (y, y64, yt) in enumerate(zip(ys, ys64, yst)):
        assert y.dtype == inputs["x"].dtype
        assert_close_to_oracle(f"y[{i}]", y, y64, yt)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert_close_to_oracle(f"d{name}", grads[name], grads64[name].to(torch.float64), gradst[name])


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_composite_matches_float64_oracle(case, dtype, p):
    check_against_oracle(make_group(*CASES[case], dtype), [p] * len(CASES[case][2]), "composite")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_composite_mixed_dropout_and_fp32_adapters(dtype):
    """Members with and without dropout in one group (the stacked-rank GEMMs cover only those
    without), adapters wider than x."""
    check_against_oracle(make_group(*CASES["qkv"], dtype, adapter_dtype=torch.float32), [0.0, 0.1, 0.3], "composite")


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_float64_oracle(dtype, p):
    check_against_oracle(make_group(*SMALL, dtype), [p, 0.1 if p == 0.0 else 0.0], "triton")


# the fused Triton group kernels (rslora_kernels.ops.group_kernels): three members, ragged N_i (the first
# spans two of the interpreter's 64-wide tiles, its last one partial), ragged K across two tiles, mixed ranks
FUSED = ((3, 7), 70, [(70, 3, 0.7, True), (9, 16, 2.0, False), (13, 5, 1.3, True)])


@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.1, 0.1, 0.1), (0.0, 0.1, 0.3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_fused_matches_float64_oracle(dtype, ps):
    check_against_oracle(make_group(*FUSED, dtype), list(ps), "triton")


def test_triton_fused_rank_beyond_one_tile():
    """A member whose rank spans two of the interpreter's rank tiles: F1 per member (the one-pass
    shrink needs one rank tile a member), the dual GEMM and dx still fused."""
    lead, K, spec = FUSED
    spec = [(70, 70, 0.7, True)] + spec[1:]
    check_against_oracle(make_group(lead, K, spec, torch.float32), [0.1, 0.0, 0.1], "triton")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_triton_fused_dA_split_over_m(monkeypatch, kernel_launches, p):
    """The one-pass dA with its M reduction split (fp32 partials summed in order): a GPU's SM count
    makes the few column tiles split M."""
    from rslora_kernels.ops import group_kernels

    monkeypatch.setattr(group_kernels, "num_sms", lambda device: 132)
    check_against_oracle(make_group((200,), 40, [(21, 3, 0.7, True), (9, 16, 2.0, False), (13, 5, 1.3, True)],
                                    torch.float32), [p, 0.1, 0.0], "triton")
    names = _names(kernel_launches)
    assert names.count("_group_da_kernel") == 1 and names.count("_sum_splits_kernel") >= 1


@pytest.mark.parametrize("arch, columns", [(90, 64), (80, 32)])
def test_triton_fused_dA_column_tiles_with_dropout(monkeypatch, kernel_launches, arch, columns):
    """The one-pass dA in 16 bits with dropout: 64-wide column tiles on sm_90, 32 on sm_80 (three
    accumulators and mma.sync operands in registers: 64 spilled there, the static report); both
    meet the oracle."""
    from rslora_kernels.ops import group_kernels

    monkeypatch.setattr(group_kernels, "cuda_arch", lambda device: arch)
    lead, K, spec = FUSED
    check_against_oracle(make_group(lead, K, spec, torch.float16), [0.1, 0.0, 0.1], "triton")
    widths = {launch.kwargs["BLOCK_Q"] for launch in kernel_launches if launch.name == "_group_da_kernel"}
    assert widths == {columns}


def _names(kernel_launches):
    """Names of the kernels launched so far, in order."""
    return [launch.name for launch in kernel_launches]


@pytest.mark.parametrize("members", [2, 3, 4])
def test_triton_group_launches_one_gemm_for_all_members(kernel_launches, members):
    """Up to three members: ONE shrink launch for every member's T, ONE dual GEMM launch for every
    member's y and ONE dx launch (no per-member F1, F2 or B2); four members fall back to the single op's launchers member by member (one F2 and B2
    each); both meet the oracle."""
    lead, K, spec = FUSED
    spec = (spec * 2)[:members]
    inputs = make_group(lead, K, spec, torch.float32)
    ps = [0.1] * members
    seeds = list(range(1, members + 1))
    t = _leaves(inputs)
    ys = rk.lora_linear_group(t["x"], t["weights"], t["lora_As"], t["lora_Bs"], inputs["scalings"], t["biases"],
                              ps, seeds=seeds, backend="triton")
    forward = _names(kernel_launches)
    torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
    backward = _names(kernel_launches)[len(forward):]
    fused = members <= 3
    group_grads = _grads(t)
    assert forward.count("_group_dual_gemm_kernel") == int(fused)
    assert forward.count("_dual_gemm_kernel") == (0 if fused else members)
    assert backward.count("_group_dx_kernel") == int(fused)
    assert backward.count("_dual_gemm_kernel") == (0 if fused else members)
    assert backward.count("_group_da_kernel") == int(fused)  # one pass over x for every dA
    assert backward.count("_m_reduce_kernel") == (members if fused else 2 * members)  # dB per member
    assert forward.count("_group_shrink_kernel") == int(fused)  # one pass over x for every member's T
    assert forward.count("_shrink_kernel") == (0 if fused else members)
    assert_members_match_oracle(inputs, ps, seeds, [torch.ones_like(y) for y in ys], ys, group_grads)


@pytest.mark.parametrize("backend", ["composite", "reference"])
def test_seeds_drawn_as_the_single_op_draws_them(backend):
    """seeds=None: each member with dropout draws its seed from torch's generator in member order,
    so a group equals its members called one after the other from the same generator state: both
    meet the oracle run with those seeds' masks (a seed drawn out of order gives another mask, far
    outside the rule). "reference" runs the members through rk.lora_linear: the same ops, bit for bit."""
    inputs = make_group(*CASES["qkv"], torch.float32)
    ps = [0.1, 0.0, 0.2]
    torch.manual_seed(7)
    ys, group_grads = run_group(inputs, ps, None, _ones(inputs), backend)
    after_group = torch.get_rng_state()
    torch.manual_seed(7)
    single = _leaves(inputs)
    singles = [rk.lora_linear(single["x"], single["weights"][i], single["lora_As"][i], single["lora_Bs"][i],
                              inputs["scalings"][i], single["biases"][i], ps[i], backend=backend) for i in range(3)]
    torch.autograd.backward(singles, _ones(inputs))
    assert torch.equal(torch.get_rng_state(), after_group)  # as many draws
    torch.manual_seed(7)
    drawn = [rk.dropout.draw_seed(DEV) for p in ps if p > 0]
    assert drawn[0] != drawn[1]  # independent masks per member
    seeds = [int(drawn[0]), 0, int(drawn[1])]
    for got, grads in ((ys, group_grads), (singles, _grads(single))):
        assert_members_match_oracle(inputs, ps, seeds, _ones(inputs), got, grads)
    if backend == "reference":
        for y, s in zip(ys, singles):
            assert torch.equal(y, s)


def _ones(inputs):
    """dy = 1 for every member's output."""
    return [torch.ones(*inputs["x"].shape[:-1], W.shape[0], dtype=inputs["x"].dtype, device=DEV)
            for W in inputs["weights"]]


def test_eval_ignores_dropout():
    inputs = make_group(*CASES["gate_up"], torch.float32)
    args = (inputs["x"], inputs["weights"], inputs["lora_As"], inputs["lora_Bs"], inputs["scalings"], None)
    off = rk.lora_linear_group(*args, dropout_ps=0.0)
    ev = rk.lora_linear_group(*args, dropout_ps=0.5, training=False)
    for a, b in zip(off, ev):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["composite", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_x_once(backend, p):
    """What the group saves: x once, T of all members stacked, the mask states -- never a second
    [M, K] tensor (no dropped x)."""
    inputs = make_group(*SMALL, torch.float32)
    t = _leaves(inputs)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.lora_linear_group(t["x"], t["weights"], t["lora_As"], t["lora_Bs"], inputs["scalings"], t["biases"],
                             p, backend=backend)
    M, K = 19, 21
    mk = [s for s in saved if tuple(s.shape) == (M, K)]
    assert len(mk) == 1 and mk[0].data_ptr() == t["x"].data_ptr()
    assert sum(1 for s in saved if tuple(s.shape) == (M, 3 + 5)) == 1  # T, stacked


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_partial_grads_and_unused_outputs(p):
    """Only some leaves need grads; a member whose output is not used gets zero grads."""
    inputs = make_group(*CASES["qkv"], torch.float32)
    x = inputs["x"].clone().requires_grad_()
    A1 = inputs["lora_As"][1].clone().requires_grad_()
    As = [inputs["lora_As"][0], A1, inputs["lora_As"][2]]
    ys = rk.lora_linear_group(x, inputs["weights"], As, inputs["lora_Bs"], inputs["scalings"], inputs["biases"],
                              p, seeds=[1, 2, 3])
    (ys[0].sum() + ys[2].square().sum()).backward()
    assert torch.equal(A1.grad, torch.zeros_like(A1))

    def reference_dx(dtype):  # members 0 and 2 through the reference, each with its seed's mask
        x2 = inputs["x"].to(dtype).clone().requires_grad_()
        y0, y2 = (rk.reference.lora_linear(x2, inputs["weights"][i].to(dtype), As[i].to(dtype),
                                           inputs["lora_Bs"][i].to(dtype), inputs["scalings"][i],
                                           inputs["biases"][i].to(dtype), p,
                                           rk.dropout_mask(seed, x2.shape, p, DEV) if p > 0 else None)
                  for i, seed in ((0, 1), (2, 3)))
        (y0.sum() + y2.square().sum()).backward()
        return x2.grad

    assert_close_to_oracle("dx", x.grad, reference_dx(torch.float64), reference_dx(torch.float32))


def test_double_backward_raises():
    inputs = make_group(*CASES["gate_up"], torch.float32)
    t = _leaves(inputs)
    ys = rk.lora_linear_group(t["x"], t["weights"], t["lora_As"], t["lora_Bs"], inputs["scalings"], None, 0.0)
    (gx,) = torch.autograd.grad(ys[0].square().sum() + ys[1].sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize("mutate, err, match", [
    (lambda a: a["weights"].__setitem__(1, a["weights"][1][:, :-1]), ValueError, r"weights\[1\] must have shape"),
    (lambda a: a["lora_Bs"].__setitem__(2, a["lora_Bs"][2].half()), TypeError, r"lora_Bs\[2\] must have lora_As\[2\]'s"),
    (lambda a: a["lora_Bs"].__setitem__(0, a["lora_Bs"][0][:, :2]), ValueError, r"lora_Bs\[0\] must have shape"),
    (lambda a: a["biases"].__setitem__(1, torch.zeros(3)), ValueError, r"biases\[1\] must have shape"),
    (lambda a: a["lora_Bs"].pop(), ValueError, r"lora_Bs must have one entry per member \(3"),
    (lambda a: a.__setitem__("scalings", [1.0, float("nan"), 1.0]), ValueError, r"scalings\[1\] must be a finite"),
    (lambda a: a.__setitem__("dropout_ps", [0.0, 0.0, 1.0]), ValueError, r"dropout_ps\[2\] must be a float"),
    (lambda a: a.__setitem__("weights", a["weights"][0]), TypeError, r"weights must be a list or tuple"),
    (lambda a: a.__setitem__("weights", []), ValueError, r"weights must hold at least one member"),
    (lambda a: a.__setitem__("seeds", [1, 2]), ValueError, r"seeds must have one entry per member"),
])
def test_bad_input_names_the_argument(mutate, err, match):
    a = make_group(*CASES["qkv"], torch.float32)
    a["dropout_ps"] = 0.1
    a["seeds"] = None
    mutate(a)
    with pytest.raises(err, match=match):
        rk.lora_linear_group(a["x"], a["weights"], a["lora_As"], a["lora_Bs"], a["scalings"], a["biases"],
                             a["dropout_ps"], seeds=a["seeds"])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(p):
    a = make_group(*SMALL, torch.float32)
    x = a["x"]
    seeds = torch.tensor([11, 12], device=DEV)
    fwd = torch.ops.rslora_kernels.lora_linear_group_fwd.default
    bwd = torch.ops.rslora_kernels.lora_linear_group_bwd.default
    args = (x, a["weights"], a["lora_As"], a["lora_Bs"], a["biases"], a["scalings"], [p, 0.0], seeds, "composite")
    torch.library.opcheck(fwd, args)
    outs = fwd(*args)
    dys = [torch.randn_like(y) for y in outs[:2]]
    for needs in ([True] * 7, [False, True, False, False, True, True, False]):
        torch.library.opcheck(bwd, (dys, x, a["weights"], a["lora_As"], a["lora_Bs"], outs[2], a["scalings"],
                                    [p, 0.0], outs[3:], needs, "composite"))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a = make_group(*CASES["qkv"], torch.float32)

    def f(x, Ws, As, Bs, bs):
        q, k, v = rk.lora_linear_group(x, Ws, As, Bs, a["scalings"], bs, [0.1, 0.1, 0.0], seeds=[3, 4, 0])
        return (q.sum(-1) * k.sum(-1) + v.square().sum(-1)).sum()

    def grads(fn):
        t = _leaves(a)
        fn(t["x"], t["weights"], t["lora_As"], t["lora_Bs"], t["biases"]).backward()
        return _grads(t)

    def reference(dtype):  # f with the members through the reference, each with its seed's mask
        t = _leaves(a, dtype)
        q, k, v = (rk.reference.lora_linear(t["x"], W, A, B, s, b, p,
                                            rk.dropout_mask(seed, t["x"].shape, p, DEV) if p > 0 else None)
                   for W, A, B, s, b, p, seed in zip(t["weights"], t["lora_As"], t["lora_Bs"], a["scalings"],
                                                     t["biases"], [0.1, 0.1, 0.0], [3, 4, 0]))
        (q.sum(-1) * k.sum(-1) + v.square().sum(-1)).sum().backward()
        return _grads(t)

    # compiled and eager against the oracle: the compiled graph's own ops (the sums and products
    # around the op, their backward) may be decomposed into other arithmetic than eager's
    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    oracle, same_dtype = reference(torch.float64), reference(torch.float32)
    assert compiled.keys() == eager.keys() == oracle.keys()
    for name in eager:
        assert_close_to_oracle(f"d{name} (eager)", eager[name], oracle[name], same_dtype[name])
        assert_close_to_oracle(f"d{name} (compiled)", compiled[name], oracle[name], same_dtype[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grads_when_requested(dtype):
    """dW_i = dy_i^T x for the members whose weight requires grad (the others get none)."""
    a = make_group(*CASES["qkv"], dtype)
    g = torch.Generator().manual_seed(2)
    dys = [torch.randn(*a["x"].shape[:-1], W.shape[0], generator=g, dtype=torch.float64) for W in a["weights"]]
    runs = []
    for dt, fn in ((None, "group"), (torch.float64, "ref"), (None, "ref")):
        Ws = [(W.to(dt) if dt else W).detach().clone().requires_grad_(i != 1) for i, W in enumerate(a["weights"])]
        x = a["x"].to(dt) if dt else a["x"]
        As = [t.to(dt) if dt else t for t in a["lora_As"]]
        Bs = [t.to(dt) if dt else t for t in a["lora_Bs"]]
        bs = [(t.to(dt) if dt else t) if t is not None else None for t in a["biases"]]
        if fn == "group":
            ys = rk.lora_linear_group(x, Ws, As, Bs, a["scalings"], bs, 0.0)
        else:
            ys = [rk.reference.lora_linear(x, Ws[i], As[i], Bs[i], a["scalings"][i], bs[i]) for i in range(3)]
        pairs = [(y, dy.to(y.dtype)) for y, dy in zip(ys, dys) if y.requires_grad]  # the reference's y_1 has no graph
        torch.autograd.backward(*zip(*pairs))
        runs.append(Ws)
    got, oracle, same = runs
    assert got[1].grad is None
    for i in (0, 2):
        assert_close_to_oracle(f"dW[{i}]", got[i].grad, oracle[i].grad, same[i].grad)
