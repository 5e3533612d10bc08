"""backend="auto" measured on first use (rslora_kernels.ops.autotune): on the CPU, with registered fake
backends and an injected timer, measuring switched on for the CPU by the module's private ``_testing``.

The fakes: "fake_fast" runs the composite backend's functions (correct) and is timed fastest;
"fake_wrong" returns y * 1.01 (wrong by far more than the numerics rule allows) and is timed faster
still, so only the self-check keeps it from being chosen. Times come from TIMES, per candidate;
the timer also runs the step once, so a candidate that raises when run is seen to raise.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels import quant
from rslora_kernels._runtime import triton_available_for
from rslora_kernels.ops import autotune, autotune_steps, tuning
from rslora_kernels.ops.autotune import Measurer, Problem
from rslora_kernels.ops.lora_linear import registered_backends, resolve_backend

# the fakes' failed self-checks warn, as they should; test_wrong_backend_... checks the warning
pytestmark = pytest.mark.filterwarnings("ignore:rslora_kernels. backend .* failed its self-check:RuntimeWarning")

CPU = torch.device("cpu")
F32 = torch.float32
TIMES = {"fake_wrong": 0.1, "fake_fast": 0.5, "composite": 1.0, "triton:fused": 2.0, "triton:rank_mm": 3.0,
         "triton": 2.5}
CALLS = {"fake_fast": 0, "fake_wrong": 0}  # forward calls of the fakes (measuring and the user's calls)


def _fake_forward(name, wrong):
    comp = registered_backends()["composite"]

    def forward(*args):
        CALLS[name] += 1
        y, T, state = comp.forward(*args)
        return (y * 1.01 if wrong else y), T, state
    return forward


@pytest.fixture
def fakes():
    comp = registered_backends()["composite"]
    for name, wrong in (("fake_fast", False), ("fake_wrong", True)):
        rk.register_backend(name, _fake_forward(name, wrong), comp.backward, devices=("cpu",), dtypes=(F32,))
    CALLS.update(fake_fast=0, fake_wrong=0)
    yield
    for name in ("fake_fast", "fake_wrong"):
        rk.unregister_backend(name)


@pytest.fixture
def tuner(tmp_path, monkeypatch, fakes):
    """Measuring on the CPU with a cache in tmp_path, candidates limited to the fakes and composite
    (Triton under the interpreter has its own test); returns the list of timed candidate labels."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    only(monkeypatch, {"composite", "fake_fast", "fake_wrong"})
    autotune.clear()
    timed = []

    def timer(candidate, step, device, budget_s):
        step()
        timed.append(candidate.label)
        return TIMES[candidate.label]

    with autotune._testing(timer=timer, warmup=1):
        yield timed
    autotune.clear()


def only(monkeypatch, labels):
    """Limit every op's candidates to ``labels``."""
    def keep(device, sig):
        return [c for c in autotune_steps.candidates(device, sig) if c.label in labels]

    for op, m in list(autotune._MEASURERS.items()):
        monkeypatch.setitem(autotune._MEASURERS, op, Measurer(keep, m.step, m.check))


def tensors(M=5, N=12, K=16, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 4, torch.randn(r, K, generator=g) / 4,
            torch.randn(N, r, generator=g) / 2)


def measured():
    return [d for d in autotune.decisions() if d.source == "measured"]


# ----------------------------------------------------------------------------------------------
# Measure once, pick the fastest that passed
# ----------------------------------------------------------------------------------------------
def test_first_call_measures_once_and_later_calls_do_not(tuner):
    x, W, A, B = tensors()
    rk.lora_linear(x, W, A, B, 0.5)
    assert sorted(tuner) == ["composite", "fake_fast"]  # fake_wrong failed its check: never timed
    (d,) = measured()
    assert d.choice == "fake_fast" and d.source == "measured"
    before = CALLS["fake_fast"]
    for M in (5, 6, 7, 8):  # one M bucket (8): the same signature, exact shapes differ
        x, W, A, B = tensors(M=M)
        y = rk.lora_linear(x, W, A, B, 0.5)
        torch.testing.assert_close(y, rk.lora_linear(x, W, A, B, 0.5, backend="reference"))
    assert len(tuner) == 2  # nothing timed again
    assert CALLS["fake_fast"] == before + 4  # the chosen backend ran the four auto calls


def test_a_new_bucket_or_dropout_or_bias_is_a_new_signature(tuner):
    x, W, A, B = tensors(M=5)
    rk.lora_linear(x, W, A, B, 0.5)
    rk.lora_linear(*tensors(M=9), 0.5)                              # M bucket 16
    rk.lora_linear(x, W, A, B, 0.5, dropout_p=0.1, seed=3)          # dropout on
    rk.lora_linear(x, W, A, B, 0.5, bias=torch.zeros(12))           # bias on
    rk.lora_linear(x, W, A, B, 0.5, dropout_p=0.2, seed=4)          # dropout on again: same as the third
    keys = [d.signature for d in measured()]
    assert len(keys) == len(set(keys)) == 4
    assert {(k.M, k.dropout, k.bias) for k in keys} == {(8, False, False), (16, False, False), (8, True, False),
                                                        (8, False, True)}


def test_wrong_backend_is_never_chosen_and_warns_once(tuner):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rk.lora_linear(*tensors(N=12), 0.5)
        rk.lora_linear(*tensors(N=20), 0.5)  # another signature: fake_wrong is not checked again
    msgs = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    # names the GPU (here the CPU), the versions, the shape and the worst error
    assert "'fake_wrong'" in msg and "cpu" in msg and torch.__version__ in msg and tuning.kernel_hash() in msg
    assert "N=12 K=16" in msg and "err" in msg and "> bound" in msg
    assert all(d.choice == "fake_fast" for d in measured())
    second = measured()[1]
    assert "before" in second.failed["fake_wrong"]
    assert tuner.count("fake_wrong") == 0


def test_a_backend_that_raises_is_not_chosen(tuner, monkeypatch):
    comp = registered_backends()["composite"]

    def broken(*args):
        raise RuntimeError("no kernel image for this GPU")

    rk.register_backend("fake_fast", broken, comp.backward, devices=("cpu",), dtypes=(F32,), replace=True)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        rk.lora_linear(*tensors(), 0.5)
    (d,) = measured()
    assert d.choice == "composite" and "no kernel image" in d.failed["fake_fast"]


def test_a_failure_of_the_measurement_itself_falls_back(tuner, monkeypatch):
    tries = []

    def broken(device, sig):
        tries.append(sig)
        raise OSError("disk on fire")

    monkeypatch.setitem(autotune._MEASURERS, "lora", Measurer(broken, autotune_steps.make_step, autotune_steps.check))
    with pytest.warns(RuntimeWarning, match="disk on fire"):
        y = rk.lora_linear(*tensors(), 0.5)
    assert y.shape == (5, 12)
    (d,) = autotune.decisions()
    assert d.choice is None and d.source == "failed" and "disk on fire" in d.why
    assert resolve_backend("auto", CPU, F32, F32, Problem(6, 12, 16, 4)) == "composite"
    assert len(tries) == 1  # not tried again in this process


def test_report_lists_signature_times_choice_and_why(tuner):
    rk.lora_linear(*tensors(), 0.5)
    report = rk.autotune_report()
    assert "lora float32 M<=8 N=12 K=16 r<=4" in report
    assert "fake_fast" in report and "<- chosen" in report and "0.5000 ms" in report and "1.0000 ms" in report
    assert "fake_wrong" in report and "failed its self-check" in report
    assert "fastest of 2 that passed the self-check" in report


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_measures_under_inference_mode_and_no_grad(tuner, mode):
    """The measurement runs with grad on and outside inference mode whatever the caller's mode."""
    x, W, A, B = tensors()
    with mode():
        y = rk.lora_linear(x, W, A, B, 0.5)
    (d,) = measured()
    assert d.choice == "fake_fast" and sorted(d.ms) == ["composite", "fake_fast"]
    torch.testing.assert_close(y, rk.lora_linear(x, W, A, B, 0.5, backend="reference"))


def test_user_rng_is_untouched(tuner):
    cpu_state = torch.get_rng_state()
    rk.lora_linear(*tensors(), 0.5, dropout_p=0.1, seed=11)
    assert len(measured()) == 1
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_train_step_notes_say_what_auto_chose(tuner):
    from benchmarks.train_step import auto_notes

    assert "composite at every call" in auto_notes()[0]  # nothing decided yet
    rk.lora_linear(*tensors(), 0.5)
    (note,) = auto_notes()
    assert note.startswith("auto: lora float32 M<=8 N=12 K=16 r<=4") and "-> fake_fast (measured" in note
    assert "fake_fast 0.500 ms, composite 1.000 ms" in note


# ----------------------------------------------------------------------------------------------
# Where nothing is measured
# ----------------------------------------------------------------------------------------------
def test_off_switch_restores_table_only_auto(tuner, monkeypatch):
    rk.lora_linear(*tensors(), 0.5)  # a decision in the process and in the cache file
    assert measured()[0].choice == "fake_fast"
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    autotune.clear()
    problem = Problem(5, 12, 16, 4)
    assert resolve_backend("auto", CPU, F32, F32, problem) == "composite"      # the cached decision is not read
    assert resolve_backend("auto", CPU, F32, F32, Problem(5, 40, 16, 4)) == "composite"  # nothing measured
    n = len(tuner)
    rk.lora_linear(*tensors(N=40), 0.5)
    assert len(tuner) == n and autotune.decisions() == []


def test_cpu_stays_composite_without_the_test_switch(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    autotune.clear()
    assert resolve_backend("auto", CPU, F32, F32, Problem(5, 12, 16, 4)) == "composite"
    rk.lora_linear(*tensors(), 0.5)
    assert autotune.decisions() == [] and list(tmp_path.iterdir()) == []
    assert CALLS["fake_fast"] == 0


def test_no_measuring_with_fake_or_meta_tensors(tuner):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert resolve_backend("auto", CPU, F32, F32, Problem(5, 12, 16, 4)) == "composite"
    assert tuner == []
    assert resolve_backend("auto", torch.device("meta"), F32, F32, Problem(5, 12, 16, 4)) in ("composite", "reference")
    assert tuner == [] and measured() == []
    # the fallback taken under fake tensors was not remembered as a decision: a real call measures
    rk.lora_linear(*tensors(), 0.5)
    assert measured()[0].choice == "fake_fast"


def test_no_measuring_in_a_backward(tuner):
    seen = []
    x = torch.randn(3, requires_grad=True)
    x.register_hook(lambda g: seen.append(resolve_backend("auto", CPU, F32, F32, Problem(5, 12, 16, 4))))
    (x * 2).sum().backward()
    assert seen == ["composite"] and tuner == []


def test_under_torch_compile_the_recorded_decision_is_a_trace_time_constant(tuner):
    x, W, A, B = tensors()
    for p in (A, B):
        p.requires_grad_(True)

    def f(x):
        return rk.lora_linear(x, W, A, B, 0.5)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    before = CALLS["fake_fast"]
    compiled(x).sum().backward()
    assert tuner == [] and measured() == [] and CALLS["fake_fast"] == before  # traced: composite, nothing measured
    rk.lora_linear(x, W, A, B, 0.5)  # eager: measures
    assert measured()[0].choice == "fake_fast"
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    n, before = len(tuner), CALLS["fake_fast"]
    compiled(x).sum().backward()
    assert len(tuner) == n and CALLS["fake_fast"] == before + 1  # the recorded choice, baked into the graph
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Ragged batches
# ----------------------------------------------------------------------------------------------
def test_signatures_per_process_are_bounded(tuner, monkeypatch):
    monkeypatch.setattr(autotune, "MAX_SIGNATURES", 2)
    for N in (12, 20, 28):
        rk.lora_linear(*tensors(N=N), 0.5)
    assert [d.signature.N for d in measured()] == [12, 20]
    last = [d for d in autotune.decisions() if d.signature.N == 28]
    assert last[0].choice is None and "2 signatures" in last[0].why
    assert resolve_backend("auto", CPU, F32, F32, Problem(5, 28, 16, 4)) == "composite"


# ----------------------------------------------------------------------------------------------
# DoRA, QLoRA and group follow the same rule
# ----------------------------------------------------------------------------------------------
def _weight4(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), generator=g, dtype=torch.uint8)
    return quant.Weight4bit(packed, torch.rand(-(-N * K // 64), generator=g) + 0.1, (N, K), 64, "nf4")


def test_dora_qlora_and_group_auto_measure_with_their_own_signature(tuner):
    x, W, A, B = tensors()
    m = W.norm(dim=1)
    rk.dora_linear(x, W, A, B, m, 0.5)
    rk.lora_linear(x, _weight4(12, 16), A, B, 0.5)  # a 4-bit base: the QLoRA op
    rk.lora_linear_group(x, [W, W[:6], W[:6]], [A, A, A], [B, B[:6], B[:6]], 0.5)
    by_op = {d.signature.op: d for d in measured()}
    assert set(by_op) == {"dora", "qlora", "group"}
    for op, d in by_op.items():
        assert d.choice == "fake_fast", (op, d)
        assert "fake_wrong" in d.failed and set(d.ms) == {"composite", "fake_fast"}, (op, d)
    assert by_op["group"].signature.N == 24
    n = len(tuner)
    calls = CALLS["fake_fast"]
    rk.dora_linear(x, W, A, B, m, 0.5)  # decided: no new measurement, the choice runs
    assert len(tuner) == n and CALLS["fake_fast"] > calls


# ----------------------------------------------------------------------------------------------
# The Triton backend's plans (the interpreter runs the real kernels)
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not triton_available_for(CPU), reason="Triton's CPU interpreter is off (TRITON_INTERPRET)")
def test_triton_plans_are_candidates_and_the_faster_plan_is_remembered(tuner, monkeypatch):
    only(monkeypatch, {"composite", "triton:fused", "triton:rank_mm"})
    monkeypatch.setitem(TIMES, "triton:rank_mm", 0.2)
    x, W, A, B = tensors(M=6, N=10, K=12, r=3)
    y = rk.lora_linear(x, W, A, B, 0.5)
    (d,) = measured()
    assert sorted(d.ms) == ["composite", "triton:fused", "triton:rank_mm"] and d.failed == {}
    assert d.choice == "triton:rank_mm" and d.backend == "triton"
    assert tuning.tuned_plan(CPU, F32, 6, 10, 12, 3) == "rank_mm"  # the plan auto measured, for that key
    assert tuning.tuned_plan(CPU, F32, 6, 10, 13, 3) == "fused"     # elsewhere the rule
    torch.testing.assert_close(y, rk.lora_linear(x, W, A, B, 0.5, backend="reference"))
    data = json.loads(autotune.cache_path(CPU).read_text())
    assert data["plans"] == {"float32|M8|N10|K12|r4": "rank_mm"}


# ----------------------------------------------------------------------------------------------
# The cache file: a fresh process, and two processes starting together
# ----------------------------------------------------------------------------------------------
def test_the_cache_is_keyed_by_versions(tuner, monkeypatch):
    rk.lora_linear(*tensors(), 0.5)
    first = autotune.cache_path(CPU)
    assert first.exists() and tuning.kernel_hash() in first.name and "torch-" in first.name and "triton-" in first.name
    n = len(tuner)
    autotune.clear()
    rk.lora_linear(*tensors(), 0.5)
    assert len(tuner) == n and autotune.decisions()[0].source == "cache"  # same versions: read back
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: its own file, measured again
    autotune.clear()
    rk.lora_linear(*tensors(), 0.5)
    assert len(tuner) == 2 * n and autotune.cache_path(CPU) != first and autotune.cache_path(CPU).exists()


def test_an_unusable_cache_directory_keeps_decisions_in_the_process(tuner, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path / "a_file" / "cache"))  # cannot be a directory
    autotune.clear()
    with pytest.warns(RuntimeWarning, match="cannot use the autotune cache"):
        rk.lora_linear(*tensors(), 0.5)
    assert measured()[0].choice == "fake_fast"
    n = len(tuner)
    rk.lora_linear(*tensors(M=7), 0.5)
    assert len(tuner) == n  # remembered in the process


def test_an_unreadable_cache_file_is_measured_over(tuner):
    path = autotune.cache_path(CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the autotune cache"):
        rk.lora_linear(*tensors(), 0.5)
    assert measured()[0].choice == "fake_fast"
    assert list(json.loads(path.read_text())["decisions"].values())[0]["choice"] == "fake_fast"


# ----------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time, torch, rslora_kernels as rk
    from rslora_kernels.ops import autotune
    from rslora_kernels.ops.autotune import Measurer
    from rslora_kernels.ops.lora_linear import registered_backends
    comp = registered_backends()["composite"]
    def wrong(*a):
        y, T, s = comp.forward(*a)
        return y * 1.01, T, s
    rk.register_backend("fake_fast", comp.forward, comp.backward, devices=("cpu",), dtypes=(torch.float32,))
    rk.register_backend("fake_wrong", wrong, comp.backward, devices=("cpu",), dtypes=(torch.float32,))
    labels = {"composite", "fake_fast", "fake_wrong"}
    m = autotune._MEASURERS["lora"]
    autotune._MEASURERS["lora"] = Measurer(lambda d, s: [c for c in m.candidates(d, s) if c.label in labels],
                                           m.step, m.check)
    times = {"fake_wrong": 0.1, "fake_fast": 0.5, "composite": 1.0}
    log = sys.argv[1]
    def timer(c, step, device, budget):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {c.label}\\n")
        time.sleep(0.5)  # long enough for the other process to be waiting at the lock
        return times[c.label]
    barrier = sys.argv[2:]  # files: each child creates its own, then waits for all
    if barrier:
        open(barrier[0], "w").close()
        while not all(os.path.exists(b) for b in barrier):
            time.sleep(0.01)
    g = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(5, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g),
                  torch.randn(12, 4, generator=g))
    with autotune._testing(timer=timer, warmup=1):
        rk.lora_linear(x, W, A, B, 0.5)
        (d,) = autotune.decisions()
        print("DECISION", d.choice, d.source)
""")


def _child(tmp_path, *args):
    env = {**os.environ, autotune.CACHE_DIR_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop(autotune.AUTOTUNE_ENV, None)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "timed.log"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _decision(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith("DECISION")]
    return line.split()[1:]


def test_decision_survives_a_fresh_process(tmp_path):
    assert _decision(_child(tmp_path)) == ["fake_fast", "measured"]
    timed = (tmp_path / "timed.log").read_text().split("\n")
    assert _decision(_child(tmp_path)) == ["fake_fast", "cache"]  # read from the file, nothing timed
    assert (tmp_path / "timed.log").read_text().split("\n") == timed


def test_two_processes_starting_together_measure_once(tmp_path):
    barrier = [str(tmp_path / "ready0"), str(tmp_path / "ready1")]
    procs = [_child(tmp_path, barrier[0], barrier[1]), _child(tmp_path, barrier[1], barrier[0])]
    results = sorted(tuple(_decision(p)) for p in procs)
    assert results == [("fake_fast", "cache"), ("fake_fast", "measured")]
    pids = {line.split()[0] for line in (tmp_path / "timed.log").read_text().splitlines()}
    assert len(pids) == 1  # one process timed the candidates; the other waited at the lock and read its result
    data = json.loads(next((tmp_path / "cache").glob("autotune-*.json")).read_text())
    assert [d["choice"] for d in data["decisions"].values()] == ["fake_fast"]
    assert "lora/fake_wrong" in data["failed"]


@pytest.mark.parametrize("impl", ["filelock", "fcntl"])
def test_the_file_lock_excludes_a_second_holder(tmp_path, monkeypatch, impl):
    if impl == "fcntl":  # filelock missing: the fcntl.flock fallback
        monkeypatch.setitem(sys.modules, "filelock", None)
    monkeypatch.setattr(autotune, "LOCK_TIMEOUT_S", 0.3)
    path = tmp_path / "decisions.json"

    def try_lock(out):
        with autotune._file_lock(path) as ok:
            out.append(ok)

    got = []
    with autotune._file_lock(path) as ok:
        assert ok
        t = threading.Thread(target=try_lock, args=(got,))
        t.start()
        t.join()
    assert got == [False]  # timed out while held
    try_lock(got)
    assert got == [False, True]  # free again once released


# ----------------------------------------------------------------------------------------------
# On a GPU: the real candidates, CUDA events
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures on a CUDA GPU")
def test_first_use_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    autotune.clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    W = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    A = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    B = torch.randn(384, 16, device="cuda", dtype=torch.bfloat16, generator=g) / 4
    rk.lora_linear(x, W, A, B, 0.5, dropout_p=0.1, seed=1)
    (d,) = measured()
    assert {"composite", "triton:fused", "triton:rank_mm"} <= set(d.ms) and d.failed == {}, d
    assert d.ms[d.choice] == min(d.ms.values())
    assert autotune.cache_path(x.device).exists()
    autotune.clear()
