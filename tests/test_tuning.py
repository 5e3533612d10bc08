"""Measured configs and backend="auto" from per-GPU tables (rslora_kernels.ops.tuning), and the tuner.

A small fake table for a fake GPU is written in each test; the CUDA device name is faked by
patching rslora_kernels._runtime.gpu_name, so everything runs on the CPU.
"""
import dataclasses
import importlib
import inspect
import json
import math
from dataclasses import asdict

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels import _runtime
from rslora_kernels.ops import configs, tuning
from rslora_kernels.ops.configs import TileConfig, dual_gemm_config, grads_config, shrink_config, shrink_masked_config
from rslora_kernels.ops.lora_linear import resolve_backend

lora_linear_mod = importlib.import_module("rslora_kernels.ops.lora_linear")  # the package exports a function of that name
FAKE_GPU = "Fake GPU 9000 (tests)"
CUDA = torch.device("cuda")  # constructing a device needs no CUDA
BF16, FP16 = torch.bfloat16, torch.float16

# distinct configs, none of which the rules return for any of the sizes below
C1 = TileConfig(32, 32, 32, 16, GROUP_M=2, num_warps=2, num_stages=2)
C2 = TileConfig(32, 32, 32, 128, GROUP_M=2, num_warps=2, num_stages=2)
C3 = TileConfig(16, 64, 32, 16, GROUP_M=4, num_warps=2, num_stages=2)
C4 = TileConfig(16, 16, 16, 16, GROUP_M=1, num_warps=1, num_stages=1)
C5 = TileConfig(16, 0, 32, 16, GROUP_M=1, num_warps=1, num_stages=1)


def cfg_entry(family, dtype, M, N, K, r, cfg, kernels=None):
    return {"family": family, "dtype": dtype, "M": M, "N": N, "K": K, "r": r, "config": asdict(cfg),
            "kernels": kernels or tuning.kernel_hash()}


def backend_entry(dtype, M, N, K, r, backend, kernels=None):
    ms = {"triton": 1.0, "composite": 2.0} if backend == "triton" else {"triton": 2.0, "composite": 1.0}
    return {"dtype": dtype, "M": M, "N": N, "K": K, "r": r, "backend": backend, "ms": ms,
            "kernels": kernels or tuning.kernel_hash()}


def plan_entry(dtype, M, N, K, r, plan, kernels=None):
    ms = {"fused": 1.0, "rank_mm": 2.0} if plan == "fused" else {"fused": 2.0, "rank_mm": 1.0}
    return {"dtype": dtype, "M": M, "N": N, "K": K, "r": r, "plan": plan, "ms": ms,
            "kernels": kernels or tuning.kernel_hash()}


STALE = "0123456789abcdef"  # a kernel-source hash that is not the running one


def fake_table(**overrides):
    table = {
        "format": tuning.FORMAT_VERSION, "dry_run": False, "gpu": FAKE_GPU, "arch": 90,
        "configs": [
            cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 16, C1),
            cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 256, C2),
            cfg_entry("dual_gemm", "bfloat16", 1024, 4096, 11008, 16, C3),
            cfg_entry("dual_gemm", "float16", 8192, 4096, 4096, 16, C4),
            cfg_entry("shrink", "bfloat16", 8192, 0, 4096, 16, C5),
        ],
        "plans": [
            plan_entry("bfloat16", 8192, 4096, 4096, 16, "fused"),
            plan_entry("bfloat16", 8192, 4096, 4096, 2048, "rank_mm"),
        ],
        "backends": [
            backend_entry("bfloat16", 8192, 4096, 4096, 16, "triton"),
            backend_entry("bfloat16", 8192, 4096, 4096, 256, "composite"),
            backend_entry("bfloat16", 8192, 4096, 4096, 2048, "triton"),
        ],
    }
    table.update(overrides)
    return table


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device named FAKE_GPU whose tables live in tmp_path; returns write(table)."""
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: FAKE_GPU if device is None or device.type == "cuda" else None)
    tuning.reload_tables()

    def write(table, name=FAKE_GPU):
        (tmp_path / f"{tuning.normalized_gpu_name(name)}.json").write_text(json.dumps(table))
        tuning.reload_tables()
    yield write
    tuning.reload_tables()


def rules(fn, *args):
    """What the rules in configs.py give (the table switched off)."""
    with tuning.rules_only():
        return fn(*args)


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------
def test_keys():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 16, 17, 8000, 8192, 8193)] == [1, 1, 2, 4, 16, 32, 8192, 8192, 16384]
    assert tuning.normalized_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.normalized_gpu_name("  NVIDIA H200 ") == "nvidia-h200"
    assert tuning.dtype_name(torch.bfloat16) == "bfloat16"


# ----------------------------------------------------------------------------------------------
# Config lookup
# ----------------------------------------------------------------------------------------------
def test_exact_and_bucketed_entries(fake_gpu):
    fake_gpu(fake_table())
    assert dual_gemm_config(8192, 4096, 4096, 16, BF16, 90) == C1
    assert dual_gemm_config(8000, 4096, 4096, 13, BF16, 90) == C1  # M bucket 8192, rank bucket 16
    assert dual_gemm_config(8192, 4096, 4096, 256, BF16, 90) == C2
    assert dual_gemm_config(1000, 4096, 11008, 9, BF16, 90) == C3
    assert dual_gemm_config(8192, 4096, 4096, 16, FP16, 90) == C4
    assert shrink_config(8192, 4096, 16, BF16, 90) == C5


@pytest.mark.parametrize("M, N, K, r, expected", [
    (8192, 4096, 4096, 200, C2),    # rank bucket 256
    (8192, 4096, 4096, 32, C1),     # 16 is one bucket away, 256 three
    (8192, 4096, 4096, 64, C2),     # 16 and 256 both two away: the tie goes to the larger rank
    (8192, 4096, 4096, 4096, C2),   # beyond the largest measured rank
    (4096, 4096, 4096, 16, C1),     # M bucket 4096: one away from 8192
    (2048, 4096, 11008, 16, C3),    # K exact, M one bucket away
    (8192, 4096, 9000, 16, C1),     # K nearer 11008, but M and K together favour C1
    (8192, 5000, 4096, 300, C2),    # N not exact
    (1, 4096, 4096, 1, C3),         # far from everything, nearest still: M 1024 beats 8192 despite K
])
def test_nearest_entry(fake_gpu, M, N, K, r, expected):
    fake_gpu(fake_table())
    assert dual_gemm_config(M, N, K, r, BF16, 90) == expected


def test_nearest_entry_distance_rule():
    """The rule itself, on entries built here: sum of |log2| gaps; ties: at-or-above, then table order."""
    e = lambda M, N, K, r: {"M": M, "N": N, "K": K, "r": r}  # noqa: E731
    entries = [e(8192, 4096, 4096, 16), e(8192, 4096, 4096, 64), e(8192, 8192, 4096, 16), e(8192, 4096, 8192, 16)]
    assert tuning.nearest_entries(entries, 8192, 4096, 4096, 32) == [entries[1]]  # above wins the tie with r=16
    assert tuning.nearest_entries(entries[1:], 8192, 4096, 4096, 16) == [entries[2], entries[3]]  # a real tie: both
    assert tuning.nearest_entries(entries, 8192, 4096, 4096, 1024, within=1.0) == []
    assert tuning.nearest_entries([], 1, 1, 1, 1) == []


def test_falls_back_to_rules_where_the_table_has_no_entry(fake_gpu):
    fake_gpu(fake_table())
    table_configs = {C1, C2, C3, C4, C5}
    cases = [
        (grads_config, (8192, 4096, 4096, 16, BF16, 90)),              # no grads entries
        (dual_gemm_config, (8192, 4096, 4096, 16, torch.float32, 90)),  # no fp32 entries
        (dual_gemm_config, (8192, 4096, 4096, 16, BF16, 80)),          # the table is for sm_90
        (dual_gemm_config, (8192, 4096, 4096, 16, BF16, 0)),           # CPU / interpreter
    ]
    for fn, args in cases:
        got = fn(*args)
        assert got == rules(fn, *args), (fn.__name__, args)
        assert got not in table_configs, (fn.__name__, args)


def test_no_table_means_rules(fake_gpu, monkeypatch):
    fake_gpu(fake_table(), name="Another GPU")  # a table, but for another GPU
    args = (8192, 4096, 4096, 16, BF16, 90)
    assert dual_gemm_config(*args) == rules(dual_gemm_config, *args) != C1
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: None)  # no CUDA at all
    tuning.reload_tables()
    assert dual_gemm_config(*args) == rules(dual_gemm_config, *args)


def test_dry_run_tables_are_ignored(fake_gpu):
    fake_gpu(fake_table(dry_run=True))
    args = (8192, 4096, 4096, 16, BF16, 90)
    assert dual_gemm_config(*args) == rules(dual_gemm_config, *args) != C1
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"


def test_broken_table_is_an_error_not_a_fallback(fake_gpu, tmp_path):
    fake_gpu(fake_table(format=999))
    with pytest.raises(ValueError, match="format 999"):
        dual_gemm_config(8192, 4096, 4096, 16, BF16, 90)
    (tmp_path / f"{tuning.normalized_gpu_name(FAKE_GPU)}.json").write_text("{not json")
    tuning.reload_tables()
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16)


def test_table_from_environment_variable(fake_gpu, monkeypatch, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(fake_table(configs=[cfg_entry("grads", "bfloat16", 8192, 4096, 4096, 16, C4)])))
    fake_gpu(fake_table())
    monkeypatch.setenv(tuning.TABLE_ENV, str(mine))
    tuning.reload_tables()
    assert grads_config(8192, 4096, 4096, 16, BF16, 90) == C4
    other = tmp_path / "other.json"
    other.write_text(json.dumps(fake_table(gpu="Some Other GPU")))
    monkeypatch.setenv(tuning.TABLE_ENV, str(other))
    tuning.reload_tables()
    with pytest.warns(UserWarning, match="not a table measured on this GPU"):
        assert dual_gemm_config(8192, 4096, 4096, 16, BF16, 90) == C1  # the committed one


def test_lookup_returns_a_copy(fake_gpu):
    fake_gpu(fake_table())
    got = tuning.tuned_config("dual_gemm", 8192, 4096, 4096, 16, BF16, 90)
    got["BLOCK_M"] = 1
    assert dual_gemm_config(8192, 4096, 4096, 16, BF16, 90) == C1


# ----------------------------------------------------------------------------------------------
# The kernel-source hash: entries measured on other kernels are never used
# ----------------------------------------------------------------------------------------------
def test_kernel_hash_covers_the_kernel_sources(monkeypatch, tmp_path):
    """16 hex digits, stable, and changed by an edit of any of KERNEL_SOURCES (a copy of the
    package with one byte appended to each file in turn)."""
    import shutil
    h = tuning.kernel_hash()
    assert len(h) == 16 and int(h, 16) >= 0 and tuning.kernel_hash() == h
    pkg = tmp_path / "rslora_kernels"
    root = tuning.TUNED_DIR.resolve().parent.parent
    for rel in tuning.KERNEL_SOURCES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, pkg / rel)
    monkeypatch.setattr(tuning, "__file__", str(pkg / "ops" / "tuning.py"))
    seen = set()
    try:
        tuning.kernel_hash.cache_clear()
        assert tuning.kernel_hash() == h  # the same bytes, the same hash
        for rel in tuning.KERNEL_SOURCES:
            with open(pkg / rel, "ab") as f:
                f.write(b"\n# edited\n")
            tuning.kernel_hash.cache_clear()
            seen.add(tuning.kernel_hash())
    finally:
        tuning.kernel_hash.cache_clear()
    assert len(seen) == len(tuning.KERNEL_SOURCES) and h not in seen


def test_entries_of_other_kernel_sources_are_ignored(fake_gpu):
    """A table whose entries were measured on other kernels answers nothing: configs follow the
    rules, auto runs composite, the plan is fused; the same table with the running hash answers."""
    args = (8192, 4096, 4096, 16, BF16, 90)
    stale = fake_table(configs=[cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 16, C1, kernels=STALE)],
                       plans=[plan_entry("bfloat16", 8192, 4096, 4096, 16, "rank_mm", kernels=STALE)],
                       backends=[backend_entry("bfloat16", 8192, 4096, 4096, 16, "triton", kernels=STALE)])
    fake_gpu(stale)
    assert dual_gemm_config(*args) == rules(dual_gemm_config, *args) != C1
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"
    assert tuning.tuned_plan(CUDA, BF16, 8192, 4096, 4096, 16) == "fused"
    for entries in stale["configs"], stale["plans"], stale["backends"]:
        entries[0]["kernels"] = tuning.kernel_hash()
    fake_gpu(stale)
    assert dual_gemm_config(*args) == C1
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "triton"
    assert tuning.tuned_plan(CUDA, BF16, 8192, 4096, 4096, 16) == "rank_mm"
    # an entry without a hash (measured before entries recorded one) is stale too
    for entries in stale["configs"], stale["plans"], stale["backends"]:
        del entries[0]["kernels"]
    fake_gpu(stale)
    assert dual_gemm_config(*args) == rules(dual_gemm_config, *args)
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"


def test_a_stale_entry_does_not_outvote_a_current_one(fake_gpu):
    """Nearness is decided among the current entries only: a stale entry nearer the call neither
    wins nor blocks the current one."""
    fake_gpu(fake_table(configs=[cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 16, C1, kernels=STALE),
                                 cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 64, C2)],
                        backends=[backend_entry("bfloat16", 8192, 4096, 4096, 16, "composite", kernels=STALE),
                                  backend_entry("bfloat16", 8192, 4096, 4096, 32, "triton")]))
    assert dual_gemm_config(8192, 4096, 4096, 16, BF16, 90) == C2
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "triton"


# ----------------------------------------------------------------------------------------------
# The plan: where the Triton backend runs its rank GEMMs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, M, N, K, r, expected", [
    (BF16, 8192, 4096, 4096, 16, "fused"),
    (BF16, 8192, 4096, 4096, 2048, "rank_mm"),
    (BF16, 8192, 4096, 4096, 1024, "rank_mm"),   # one rank bucket from 2048, six from 16
    (BF16, 8192, 4096, 4096, 256, "fused"),      # three buckets from either: no entry near, the rule
    (BF16, 1024, 4096, 4096, 2048, "fused"),     # M three buckets away
    (FP16, 8192, 4096, 4096, 2048, "fused"),     # no fp16 entries
])
def test_plan_follows_the_table(fake_gpu, dtype, M, N, K, r, expected):
    fake_gpu(fake_table())
    assert tuning.tuned_plan(CUDA, dtype, M, N, K, r) == expected


def test_plan_without_a_table_or_on_the_cpu_is_fused(fake_gpu):
    assert tuning.tuned_plan(CUDA, BF16, 8192, 4096, 4096, 2048) == "fused"  # no table
    fake_gpu(fake_table())
    assert tuning.tuned_plan(torch.device("cpu"), BF16, 8192, 4096, 4096, 2048) == "fused"
    fake_gpu(fake_table(plans=[plan_entry("bfloat16", 8192, 8192, 4096, 2048, "rank_mm"),
                               plan_entry("bfloat16", 8192, 4096, 8192, 2048, "fused")]))
    assert tuning.tuned_plan(CUDA, BF16, 8192, 4096, 4096, 2048) == "fused"  # a tie that disagrees
    old = fake_table()
    del old["plans"]  # tables made before plans were measured
    fake_gpu(old)
    assert tuning.tuned_plan(CUDA, BF16, 8192, 4096, 4096, 2048) == "fused"


def test_forced_plan():
    with tuning.forced_plan("rank_mm"):
        assert tuning.tuned_plan(torch.device("cpu"), BF16, 5, 6, 7, 8) == "rank_mm"
    assert tuning.tuned_plan(torch.device("cpu"), BF16, 5, 6, 7, 8) == "fused"
    with pytest.raises(ValueError, match="plan must be one of"):
        with tuning.forced_plan("cublas"):
            pass


# ----------------------------------------------------------------------------------------------
# The hooks: every config function asks tuning with its own sizes
# ----------------------------------------------------------------------------------------------
def test_forced_configs_reach_every_config_function():
    seen = []

    def choose(request):
        seen.append(request)
        return asdict(C4)

    with tuning.forced_configs(choose):
        assert dual_gemm_config(97, 30, 50, 7, BF16, 90) == C4
        assert shrink_config(97, 50, 7, FP16, 80) == C4
        assert shrink_masked_config(97, 51, 7, FP16, 80) == C4
        assert grads_config(97, 30, 50, 7, torch.float32, 0) == C4
    assert seen == [tuning.ConfigRequest("dual_gemm", "bfloat16", 97, 30, 50, 7, 90),
                    tuning.ConfigRequest("shrink", "float16", 97, 0, 50, 7, 80),
                    tuning.ConfigRequest("shrink_masked", "float16", 97, 0, 51, 7, 80),
                    tuning.ConfigRequest("grads", "float32", 97, 30, 50, 7, 0)]
    assert dual_gemm_config(97, 30, 50, 7, BF16, 90) != C4  # the override ends with the block


# ----------------------------------------------------------------------------------------------
# backend="auto" on CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, M, N, K, r, expected", [
    (BF16, 8192, 4096, 4096, 16, "triton"),
    (BF16, 8192, 4096, 4096, 256, "composite"),
    (BF16, 8192, 4096, 4096, 2048, "triton"),
    (BF16, 6000, 4096, 4096, 12, "triton"),        # same buckets as the r=16 entry
    (BF16, 8192, 4096, 4096, 1024, "triton"),      # one rank bucket from 2048, two from 256
    (BF16, 8192, 4096, 4096, 512, "composite"),    # one from 256
    (BF16, 8192, 4096, 4096, 32, "triton"),        # one from 16
    (BF16, 8192, 4096, 4096, 4, "composite"),      # two rank buckets from anything measured
    (BF16, 64, 4096, 4096, 16, "composite"),       # M far from anything measured
    (BF16, 8192, 4096, 14336, 16, "composite"),    # K 3.5x anything measured
    (FP16, 8192, 4096, 4096, 16, "composite"),     # no fp16 entries
])
def test_auto_backend_follows_the_table(fake_gpu, dtype, M, N, K, r, expected):
    fake_gpu(fake_table())
    assert tuning.auto_backend(CUDA, dtype, M, N, K, r) == expected
    assert resolve_backend("auto", CUDA, dtype, problem=(M, N, K, r)) == expected


def test_auto_backend_needs_agreement_on_ties(fake_gpu):
    triton_both = [backend_entry("bfloat16", 8192, 8192, 4096, 16, "triton"),
                   backend_entry("bfloat16", 8192, 4096, 8192, 16, "triton")]
    fake_gpu(fake_table(backends=triton_both))
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "triton"
    fake_gpu(fake_table(backends=[triton_both[0], backend_entry("bfloat16", 8192, 4096, 8192, 16, "composite")]))
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"


def test_auto_backend_without_a_table_is_composite(fake_gpu):
    assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"
    assert resolve_backend("auto", CUDA, BF16, problem=(8192, 4096, 4096, 16)) == "composite"
    assert resolve_backend("auto", CUDA) == "composite"  # no problem given: nothing to look up


def test_auto_on_cpu_is_unaffected_by_tables(fake_gpu):
    fake_gpu(fake_table())
    assert resolve_backend("auto", torch.device("cpu"), BF16, problem=(8192, 4096, 4096, 16)) == "composite"


def test_lora_linear_passes_the_flattened_problem(monkeypatch):
    """lora_linear hands resolve_backend x's dtype and (M over all leading dims, N, K, r)."""
    calls = []
    real = lora_linear_mod.resolve_backend
    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)
    monkeypatch.setattr(lora_linear_mod, "resolve_backend", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, generator=g)
    W, A, B = torch.randn(7, 11, generator=g), torch.randn(2, 11, generator=g), torch.randn(7, 2, generator=g)
    rk.lora_linear(x, W, A, B, 0.5, backend="auto")
    (call,) = calls
    # (M, N, K, r) and what else the signature of auto's first-use measurement holds: op, dropout, bias
    assert (call["backend"], call["device"], call["dtype"], call["problem"]) == (
        "auto", x.device, torch.float32, (15, 7, 11, 2, "lora", 0.0, False))


def test_auto_backend_under_torch_compile(fake_gpu):
    """The decision is plain Python that dynamo traces (or constant-folds) under fullgraph=True."""
    fake_gpu(fake_table())

    def f(x):
        return x + (1.0 if tuning.auto_backend(torch.device("cuda"), torch.bfloat16, x.shape[0], 4096, 4096, 16) == "triton" else 2.0)

    for dynamic in (None, True):  # None: static first, then dynamic M after a new size
        torch._dynamo.reset()
        g = torch.compile(f, fullgraph=True, backend="eager", dynamic=dynamic)
        for M, expected in ((8192, 1.0), (64, 2.0), (6000, 1.0), (100, 2.0), (8192, 1.0)):  # the choice follows M
            assert g(torch.zeros(M)).unique().tolist() == [expected], (dynamic, M)
    torch._dynamo.reset()


def test_constant_marking_matches_torch():
    """tuning marks its lookup constant by hand (the public decorator would import Triton at
    package import); this is what torch.compiler.assume_constant_result still does."""
    def fn():
        return "x"
    assert getattr(torch.compiler.assume_constant_result(fn), "_dynamo_marked_constant", False) is True


def test_auto_backend_under_torch_compile_with_tensor_device_and_dtype(fake_gpu, monkeypatch):
    """As lora_linear calls it: device and dtype taken from the traced tensor."""
    fake_gpu(fake_table())
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: FAKE_GPU)  # this CPU "is" the fake GPU

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, w, a):
        chosen = tuning.auto_backend(x.device, x.dtype, x.shape[0], w.shape[0], x.shape[1], a.shape[0])
        return x.float().sum() + (1.0 if chosen == "triton" else 2.0)

    torch._dynamo.reset()
    w = torch.zeros(4096, 1, dtype=BF16)
    for dtype, r, expected in ((BF16, 16, 1.0), (BF16, 256, 2.0), (FP16, 16, 2.0), (BF16, 2048, 1.0)):
        assert f(torch.zeros(8192, 4096, dtype=dtype), w, torch.zeros(r, 1)).item() == expected, (dtype, r)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Committed tables
# ----------------------------------------------------------------------------------------------
COMMITTED = sorted(tuning.TUNED_DIR.glob("*.json"))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_candidates_include_the_measured_alternatives(dtype, arch, monkeypatch):
    """At most 8 candidates a family (what the tuner can afford to time); every config the rules
    give F1 with dropout that draws the mask has its twin that leaves it to the bits pass; on sm_90 in 16 bits
    the small-rank shrinks and B3 also come with other splits of their reductions."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    cands = configs.candidate_configs(dtype, arch)
    families = {f for f, _ in cands}
    assert all(sum(f == fam for f, _ in cands) <= 8 for fam in families)
    masked = {c for f, c in cands if f == "shrink_masked"}
    with tuning.rules_only():
        rules = {shrink_masked_config(M, 4096, r, dtype, arch) for M in (512, 8192) for r in (16, 64, 128, 4096)}
    assert rules <= masked
    for c in rules:
        if c.DRAW_BITS and c.BLOCK_RED % 32 == 0:
            assert dataclasses.replace(c, DRAW_BITS=False) in masked
    # the small-rank shrinks: the rules split the reduction; the tuner also times them unsplit, and F1
    # with dropout split otherwise (B1 and F1 without dropout: no 32-row tile, which gets no wgmma)
    splits = {(f, c.BLOCK_M, c.BLOCK_RED, c.SPLIT_PER_SM) for f, c in cands if f.startswith("shrink") and c.BLOCK_R == 64}
    if dtype != torch.float32:
        assert {("shrink", 64, 128 if arch == 90 else 64, 8), ("shrink_masked", 32, 128, 16)} <= splits
    if arch == 90 and dtype != torch.float32:
        assert {(f, 64, 64, 0) for f in ("shrink", "shrink_masked")} <= splits
        assert ("shrink_masked", 64, 64, 8) in splits
        assert not any(f == "shrink" and m < 64 for f, m, _, _ in splits), splits
        assert {c.SPLIT_PER_SM for f, c in cands if f == "grads"} == {2, 8}
    elif dtype != torch.float32:  # the alternatives are sm_90's only (fp32 shrinks never split)
        assert not any(c.SPLIT_PER_SM == 0 for f, c in cands if f.startswith("shrink") and c.BLOCK_R == 64)


@pytest.mark.skipif(not COMMITTED, reason="no tuning table is committed yet (none made on a GPU)")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_table(path, monkeypatch):
    """Named after its GPU, a real measurement, every choice the faster of its timings, and every
    config measured on the running kernel sources one the static report checks. Entries of other
    sources are never used (the hash tests above); the table says which sources it holds."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's candidates, not the interpreter's
    table = tuning.load_table(path)
    assert table is not None, f"{path.name} is a dry-run table: never commit one"
    assert path.stem == tuning.normalized_gpu_name(table["gpu"])
    assert "kernels" in table, f"{path.name}: record the kernel sources' hash (or that it predates them)"
    for e in tuning.current_entries(table["configs"]):
        with tuning.rules_only():
            cands = configs.candidate_configs(getattr(torch, e["dtype"]), table["arch"])
        assert (e["family"], TileConfig(**e["config"])) in cands, e
    for e in table["backends"]:
        assert e["backend"] == min(e["ms"], key=e["ms"].get) and set(e["ms"]) == {"triton", "composite"}, e
    for e in table.get("plans", []):
        assert e["plan"] == min(e["ms"], key=e["ms"].get) and set(e["ms"]) == set(tuning.PLANS), e


def test_the_h200_table_is_stale_so_auto_is_composite_there(monkeypatch):
    """The committed H200 table was measured on kernels before the split-K shrinks (and before
    entries recorded a hash): under the hash rule it answers nothing until re-measured."""
    path = tuning.TUNED_DIR / "nvidia-h200.json"
    table = tuning.load_table(path)
    assert table["kernels"] != tuning.kernel_hash() and not tuning.current_entries(table["backends"])
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: "NVIDIA H200")
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    tuning.reload_tables()
    try:
        assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 16) == "composite"
        assert tuning.auto_backend(CUDA, BF16, 8192, 4096, 4096, 256) == "composite"
        assert dual_gemm_config(8192, 4096, 4096, 16, BF16, 90) == rules(dual_gemm_config, 8192, 4096, 4096, 16, BF16, 90)
    finally:
        tuning.reload_tables()


# ----------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------
def test_coordinate_descent_picks_the_fastest_and_records_failures():
    """tune_case with a fake op (it asks two config functions) and a fake timer (cost per config)."""
    from benchmarks.tune import tune_case

    cands = {"dual_gemm": [C1, C2, C3], "shrink": [C4, C5, C1]}
    cost = {C1: 3.0, C2: 1.0, C3: 2.0, C4: 0.5, C5: 0.25}  # C1 as a shrink config fails
    used = []

    def run(backend):
        def op():
            used[:] = [dual_gemm_config(300, 70, 90, 5, BF16, 90), shrink_config(300, 90, 5, BF16, 90)]
            if used[1] == C1:
                raise RuntimeError("out of resources: shared memory")
        return op

    def timer(fn, grads):
        fn()
        return sum(cost.get(c, 10.0) for c in used)

    results, backend_ms, plan_ms = tune_case(run, [], timer, cands, log=lambda *a: None)
    by_family = {req.family: res for req, res in results.items()}
    assert set(by_family) == {"dual_gemm", "shrink"}
    assert by_family["dual_gemm"][0] == asdict(C2) and by_family["shrink"][0] == asdict(C5)
    trials = by_family["shrink"][1]
    assert [("ms" in t, "error" in t) for t in trials] == [(True, False), (True, False), (False, True)]
    assert "out of resources" in trials[2]["error"]
    assert backend_ms["triton"] == pytest.approx(1.25)  # the chosen pair
    assert plan_ms == {plan: pytest.approx(1.25) for plan in tuning.PLANS}  # each plan timed with them


def test_tuner_times_both_plans_and_records_the_faster():
    """tune_case times the Triton backend under each plan (forced_plan) and takes the faster as the
    backend's time; add_case records plan and backend entries with the running kernel hash."""
    from benchmarks.tune import add_case, tune_case

    cost = {"fused": 2.0, "rank_mm": 1.5}

    def run(backend):
        def op():
            dual_gemm_config(300, 70, 90, 5, BF16, 90)
            run.last = tuning.tuned_plan(CUDA, BF16, 300, 70, 90, 5) if backend == "triton" else "composite"
        return op

    def timer(fn, grads):
        fn()
        return {"composite": 1.75, **cost}[run.last]

    results, backend_ms, plan_ms = tune_case(run, [], timer, {"dual_gemm": [C1]}, log=lambda *a: None)
    assert plan_ms == {"fused": 2.0, "rank_mm": 1.5} and backend_ms == {"triton": 1.5, "composite": 1.75}
    table = {"configs": [], "plans": [], "backends": []}
    add_case(table, results, backend_ms, plan_ms, BF16, 300, 70, 90, 5)
    (plan,), (backend,) = table["plans"], table["backends"]
    assert (plan["plan"], backend["backend"]) == ("rank_mm", "triton")
    assert (plan["M"], plan["N"], plan["K"], plan["r"]) == (512, 70, 90, 8)
    assert {e["kernels"] for e in table["configs"] + table["plans"] + table["backends"]} == {tuning.kernel_hash()}


def test_resume_keeps_current_cases_and_drops_stale_ones(tmp_path):
    """--resume: cases the table holds for the running kernel sources are skipped; entries of other
    sources are dropped; a table of another GPU is an error, not a silent restart."""
    from benchmarks.tune import done_cases, resumed_table

    new = {"gpu": FAKE_GPU, "arch": 90, "dry_run": False, "configs": [], "plans": [], "backends": []}
    assert resumed_table(tmp_path / "absent.json", new, log=lambda *a: None) is new
    old = dict(new, configs=[cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 16, C1),
                             cfg_entry("dual_gemm", "bfloat16", 8192, 4096, 4096, 64, C2, kernels=STALE)],
               plans=[plan_entry("bfloat16", 8192, 4096, 4096, 16, "fused")],
               backends=[backend_entry("bfloat16", 8192, 4096, 4096, 16, "triton"),
                         backend_entry("bfloat16", 8192, 4096, 4096, 64, "triton", kernels=STALE)])
    path = tmp_path / "t.json"
    path.write_text(json.dumps(old))
    lines = []
    table = resumed_table(path, new, log=lines.append)
    assert table["configs"] == old["configs"][:1] and table["backends"] == old["backends"][:1]
    assert table["plans"] == old["plans"]
    assert done_cases(table) == {("bfloat16", 8192, 4096, 4096, 16)}
    assert "2 entries of other sources dropped" in lines[0]
    path.write_text(json.dumps(dict(old, gpu="Another GPU")))
    with pytest.raises(ValueError, match="gpu"):
        resumed_table(path, new, log=lambda *a: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run needs the interpreter; this process runs the kernels compiled")
def test_tuner_dry_run_resumes(tmp_path, capsys):
    """A second --resume run over the same cases measures nothing and keeps the table's entries."""
    from benchmarks.tune import main

    out = tmp_path / "dry.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    capsys.readouterr()
    assert main(["--dry-run", "--out", str(out), "--resume"]) == 0
    second = json.loads(out.read_text())
    assert "in the table (--resume)" in capsys.readouterr().out
    for key in ("configs", "plans", "backends"):
        assert second[key] == first[key] and second[key]
    assert second["complete"] is True and second["kernels"] == tuning.kernel_hash()


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run needs the interpreter; this process runs the kernels compiled")
def test_tuner_dry_run_writes_a_valid_table(tmp_path, capsys):
    from benchmarks.tune import main

    out = tmp_path / "dry.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["dry_run"] is True and table["complete"] is True and table["skipped"] == []
    assert table["format"] == tuning.FORMAT_VERSION and table["torch"] == torch.__version__
    with tuning.rules_only():
        cands = configs.candidate_configs(torch.bfloat16, 0)
    # p = 0.1 fwd+bwd asks every family but DoRA's (rules only: the tuner times the LoRA op)
    assert {e["family"] for e in table["configs"]} == {f for f, _ in cands} - {"dora_gemm"}
    for e in table["configs"]:
        assert (e["family"], TileConfig(**e["config"])) in cands
        timed = [t["ms"] for t in e["candidates"] if "ms" in t]
        assert e["op_ms"] == min(timed) and all(math.isfinite(t) and t > 0 for t in timed)
    (b,) = table["backends"]
    assert b["backend"] in ("triton", "composite") and b["ms"][b["backend"]] == min(b["ms"].values())
    (plan,) = table["plans"]
    assert set(plan["ms"]) == set(tuning.PLANS) and b["ms"]["triton"] == min(plan["ms"].values())
    assert table["kernels"] == tuning.kernel_hash()
    assert tuning.load_table(out) is None  # the loader ignores dry-run tables
    assert "dry-run table" in capsys.readouterr().out
