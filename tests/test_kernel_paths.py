"""The Triton backend's specialized code paths: the keep-bits mask state, the sizes that divide the
tiles (EVEN_* loads without masks), and the 64-bit in-tile offsets kept for tensors of 2^31 elements
or more. Each against the float64 reference (or bit-equal to the path it replaces)."""
import pytest
import torch

import rslora_kernels as rk
from numerics import assert_close_to_oracle
from test_lora_linear import check_against_oracle, make_inputs


def test_keep_bits_are_the_stream_packed_32_columns_a_word(device):
    from rslora_kernels.dropout.kernels import keep_bits_triton
    M, K, p, seed = 37, 100, 0.3, 2**33 + 5
    bits = keep_bits_triton(torch.tensor(seed, device=device), M, K, p).cpu()
    assert bits.dtype == torch.int32 and bits.shape == (M, 4)  # ceil(100 / 32) words a row
    cols = torch.arange(4 * 32)
    unpacked = ((bits[:, cols // 32] >> (cols % 32)) & 1) != 0
    assert torch.equal(unpacked[:, :K], rk.dropout_mask(seed, (M, K), p))
    assert not unpacked[:, K:].any()  # columns past K read as dropped


@pytest.mark.parametrize("r, draw_bits, passes_expected", [(6, True, 0), (6, False, 1), (100, True, 1)],
                         ids=["one_rank_tile", "one_rank_tile_draw_off", "two_rank_tiles"])
def test_forward_keep_bits_are_the_streams_whoever_draws_them(r, draw_bits, passes_expected, monkeypatch, device):
    """With one rank tile covering r, F1 draws the mask itself (no keep-bits pass) unless its config
    says DRAW_BITS=False; with more rank tiles it reads bits drawn by the pass first. Either way the
    forward's mask state is bit-equal to the keep-bits pass's, ragged rows and columns included
    (the interpreter's rank tile is 64)."""
    import dataclasses

    from rslora_kernels.dropout.kernels import keep_bits_triton
    from rslora_kernels.ops import configs, tuning
    from rslora_kernels.ops import triton_kernels as tk
    inputs = make_inputs(37, 100, 23, r, torch.float32, device, seed=17)
    seed, p = torch.tensor(2**40 + 3, device=device), 0.3
    passes = []
    monkeypatch.setattr(tk, "keep_bits_triton", lambda *a: passes.append(a) or keep_bits_triton(*a))

    def choose(req):
        if req.family != "shrink_masked":
            return None
        with tuning.rules_only():
            rule = configs.shrink_masked_config(req.M, req.K, req.r, torch.float32, req.arch)
        return dataclasses.asdict(dataclasses.replace(rule, DRAW_BITS=draw_bits))

    with tuning.forced_configs(choose):
        y, T, bits = tk.lora_forward(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"],
                                     inputs["bias"], 0.8, p, seed)
    assert len(passes) == passes_expected
    assert torch.equal(bits, keep_bits_triton(seed, 37, 100, p))
    mask = rk.dropout_mask(int(seed), (37, 100), p).to(device)
    T64, T32 = ((inputs["x"].to(dt) * mask / (1 - p)) @ inputs["lora_A"].to(dt).t() for dt in (torch.float64, torch.float32))
    assert_close_to_oracle("T", T, T64, T32)


def test_triton_saves_keep_bits_not_the_seed(device):
    """The forward's mask state is the packed mask (M*K/8 bytes), and backward reads it."""
    inputs = make_inputs(40, 70, 20, 6, torch.float32, device, seed=5)
    x = inputs["x"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rk.lora_linear(x, inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0, dropout_p=0.2, seed=3,
                           backend="triton")
    states = [t for t in saved if t.dtype == torch.int32]
    assert len(states) == 1 and states[0].shape == (40, 3)
    assert not any(t.dtype == torch.int64 for t in saved)  # no seed: backward never regenerates the mask
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sizes_that_divide_the_tiles(dtype, device):
    """M, K, N, r multiples of every interpreter tile: the EVEN_* paths (no load masks)."""
    inputs = make_inputs(128, 128, 64, 64, dtype, device, seed=9)
    check_against_oracle(inputs, scaling=0.7, p=0.1, seed=11)


def test_offset_dtype_follows_the_largest_tensor():
    import triton.language as tl
    from rslora_kernels.ops.triton_kernels import _offset_dtype
    small = torch.empty(2**15, 2**15, device="meta")
    huge = torch.empty(2**16, 2**15, device="meta")  # 2^31 elements
    wide_view = torch.empty(2, 2**31, device="meta")[:, :4]  # 8 elements spanning > 2^31
    assert _offset_dtype(small, None) == tl.int32
    assert _offset_dtype(small, huge) == tl.int64
    assert _offset_dtype(wide_view) == tl.int64


def test_64_bit_offsets_give_the_same_bits(monkeypatch, kernel_launches, device):
    """The 64-bit offset path (taken for tensors of 2^31 elements or more, too large for this test)
    computes exactly what the 32-bit path does."""
    import triton.language as tl
    from rslora_kernels.ops import triton_kernels as tk
    inputs = make_inputs(97, 75, 83, 19, torch.float32, device, seed=13)

    def run():
        t = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = rk.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], 0.9, bias=t["bias"],
                           dropout_p=0.1, seed=3, backend="triton")
        y.backward(torch.ones_like(y))
        return [y] + [t[k].grad for k in ("x", "lora_A", "lora_B", "bias")]

    from rslora_kernels import _launch
    narrow = run()
    offsets = [launch.kwargs["OFFSET_DTYPE"] for launch in kernel_launches if "OFFSET_DTYPE" in launch.kwargs]
    assert offsets and set(offsets) == {tl.int32}
    monkeypatch.setattr(tk, "_layouts_offset_dtype", lambda *layouts: tl.int64)
    _launch.clear_launch_cache()  # the plans cached by the first run hold 32-bit offsets
    del kernel_launches[:]
    wide = run()
    offsets = [launch.kwargs["OFFSET_DTYPE"] for launch in kernel_launches if "OFFSET_DTYPE" in launch.kwargs]
    assert len(offsets) >= 5 and set(offsets) == {tl.int64}
    _launch.clear_launch_cache()  # no 64-bit plan outlives the patch
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)
    check_against_oracle(inputs, scaling=0.9, p=0.1, seed=3)  # and the 64-bit path is right


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_strided_bias(dora, device):
    """A bias that is a strided view (every other element of a buffer) is read as such."""
    inputs = make_inputs(9, 20, 12, 4, torch.float32, device, seed=83)
    buffer = torch.randn(24, generator=torch.Generator().manual_seed(84)).to(device)
    bias = buffer[::2]
    x, W, A, B = inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    m = torch.linalg.norm(W, dim=1) * 1.1

    def run(b, backend, dtype=torch.float32):  # the reference backend draws the same mask from the seed
        t = [v.to(dtype) for v in (x, W, A, B)]
        if dora:
            return rk.dora_linear(*t, m.to(dtype), 0.5, bias=b.to(dtype), dropout_p=0.1, seed=3, backend=backend)
        return rk.lora_linear(*t, 0.5, bias=b.to(dtype), dropout_p=0.1, seed=3, backend=backend)

    assert_close_to_oracle("y", run(bias, "triton"), run(bias.contiguous(), "reference", torch.float64),
                           run(bias.contiguous(), "reference"))


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("N, K, rows_expected", [(70, 64, 64), (64, 96, 128)])
def test_b3_takes_128_rows_only_where_the_row_strides_divide_by_16(N, K, rows_expected, p, kernel_launches, device):
    """A tuned B3 tile of 128 rows a step runs only where N and K (dy's and x's row strides) are
    multiples of 16; elsewhere Triton 3.6's ptxas spills it (the static report), so B3 takes 64 rows.
    dA with dropout always takes 64 (the mask's select on top spilled under Triton 3.9). Either way
    dA and dB meet the oracle."""
    import dataclasses

    from rslora_kernels.ops import configs, tuning
    def choose(req):
        if req.family != "grads":
            return None
        with tuning.rules_only():
            rule = configs.grads_config(req.M, req.N, req.K, req.r, torch.float32, req.arch)
        return dataclasses.asdict(dataclasses.replace(rule, BLOCK_M=128))

    with tuning.forced_configs(choose):
        check_against_oracle(make_inputs(150, K, N, 6, torch.float32, device, seed=23), scaling=0.7, p=p, seed=5)
    rows = {(launch.kwargs["HAS_DROPOUT"], launch.kwargs["BLOCK_M"]) for launch in kernel_launches
            if launch.name == "_m_reduce_kernel"}
    expected = {(False, rows_expected), (True, 64)} if p else {(False, rows_expected)}
    assert rows == expected
