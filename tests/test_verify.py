"""The shared self-check (rslora_kernels/selfcheck.py) and ``python -m rslora_kernels.verify``.

The self-check must pass the package's own backends on every op kind and fail a backend that is
wrong in one place (naming that tensor), whatever the caller's RNG, grad or autocast state.
"""
import math

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels.ops.composite import composite_backward, composite_forward
from rslora_kernels.selfcheck import Case, compare, error_bound, self_check

SMALL = dict(M=13, N=11, K=9, r=3)  # the Triton interpreter runs this in seconds


# ----------------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------------
def test_bound_is_twice_the_same_dtype_error_plus_four_ulps_at_the_oracles_largest_magnitude():
    oracle = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    same = torch.tensor([1.0, -3.0 + 2**-10, 0.5], dtype=torch.float32)
    assert error_bound(torch.float32, oracle, same) == 2 * 2**-10 + 4 * 2**-23 * 3.0
    assert error_bound(torch.bfloat16, oracle, same) == 2 * 2**-10 + 4 * 2**-7 * 3.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_never_passes(bad):
    oracle = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got = torch.tensor([1.0, bad])
    result = compare("y", got, oracle, oracle.float())
    assert not result.ok and result.ratio == math.inf


def test_just_inside_and_just_outside_the_bound():
    oracle = torch.tensor([0.0, 1.0], dtype=torch.float64)
    same = torch.tensor([0.0, 1.0 + 2**-20], dtype=torch.float64)  # same-dtype error 2^-20
    limit = error_bound(torch.float64, oracle, same)
    assert compare("y", oracle + limit / 2, oracle, same).ok
    assert not compare("y", oracle + 2 * limit, oracle, same).ok


def test_wrong_shape_or_dtype_is_a_named_failure():
    oracle = torch.zeros(3, 2, dtype=torch.float64)
    r = compare("dx", torch.zeros(2, 3), oracle, oracle.float())
    assert not r.ok and "shape" in r.problem
    r = compare("dx", torch.zeros(3, 2, dtype=torch.float16), oracle, oracle.float(), torch.float32)
    assert not r.ok and "dtype" in r.problem


def test_an_unusable_oracle_is_a_value_error():
    with pytest.raises(ValueError, match="float64"):
        compare("y", torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="not finite"):
        compare("y", torch.zeros(1), torch.tensor([math.inf], dtype=torch.float64), torch.zeros(1))


# ----------------------------------------------------------------------------------------------
# the self-check on the package's backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["lora", "dora", "qlora", "group"])
@pytest.mark.parametrize("backend", ["composite", "reference"])
@pytest.mark.parametrize("dtype, adapter_dtype, p, bias", [
    (torch.float32, None, 0.0, True), (torch.bfloat16, torch.float32, 0.1, False), (torch.float16, None, 0.1, True)])
def test_package_backends_pass(op, backend, dtype, adapter_dtype, p, bias):
    result = self_check(backend, op=op, M=37, N=29, K=21, r=5, dtype=dtype, adapter_dtype=adapter_dtype,
                        dropout_p=p, bias=bias)
    assert result.ok, result.summary()
    names = {t.name for t in result.tensors}
    assert {"dx", "dlora_A" if op != "group" else "dlora_A0"} <= names
    assert ("dbias" in names or "dbias0" in names) == bias
    assert ("dmagnitude" in names) == (op == "dora")
    assert len([n for n in names if n.startswith("y")]) == (3 if op == "group" else 1)


@pytest.mark.parametrize("op, p", [("lora", 0.0), ("lora", 0.1), ("dora", 0.1), ("qlora", 0.0), ("group", 0.1)])
def test_triton_passes_in_the_interpreter(op, p):
    if not rk.registered_backends()["triton"].runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run on the CPU here (TRITON_INTERPRET unset)")
    result = self_check("triton", op=op, dropout_p=p, **SMALL)
    assert result.ok, result.summary()


def test_empty_m_passes():
    assert self_check("composite", op="lora", M=0).ok


def test_float64_is_refused():  # no wider oracle: the same-dtype error would be 0
    with pytest.raises(TypeError, match="dtype"):
        Case(dtype=torch.float64)


def test_callers_rng_grad_mode_and_autocast_are_left_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with torch.no_grad():
        assert self_check("composite", op="lora", dropout_p=0.1).ok
    with torch.inference_mode():
        assert self_check("composite", op="dora", dropout_p=0.1).ok
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = self_check("composite", op="lora")  # fp32 case: autocast must not turn it into bf16
    assert result.ok and result.tensors[0].dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), before)


def test_same_case_same_errors():
    a, b = self_check("composite", op="group", dropout_p=0.1), self_check("composite", op="group", dropout_p=0.1)
    assert [(t.name, t.err, t.bound) for t in a.tensors] == [(t.name, t.err, t.bound) for t in b.tensors]


# ----------------------------------------------------------------------------------------------
# the self-check on deliberately wrong backends
# ----------------------------------------------------------------------------------------------
def _wrong_forward(*args):  # y off by a small relative error: more than any rounding
    y, T, state = composite_forward(*args)
    return y * (1 + 1e-3), T, state


def _wrong_dA(*args):  # dA with the scale applied twice
    dx, dA, dB, db = composite_backward(*args)
    return dx, (dA * args[6] if dA is not None else None), dB, db


def _nan_dx(*args):
    dx, dA, dB, db = composite_backward(*args)
    if dx is not None:
        dx = dx.clone()
        dx.view(-1)[0] = float("nan")
    return dx, dA, dB, db


def _raises(*args):
    raise RuntimeError("no kernel for this shape")


@pytest.fixture
def wrong():
    names = []

    def register(name, forward=composite_forward, backward=composite_backward):
        rk.register_backend(name, forward, backward, devices=("cpu", "cuda"),
                            dtypes=(torch.float16, torch.bfloat16, torch.float32))
        names.append(name)
        return name

    yield register
    for name in names:
        rk.unregister_backend(name)


@pytest.mark.parametrize("op", ["lora", "dora", "qlora", "group"])
@pytest.mark.parametrize("how, failing", [("forward", {"y", "y0", "y1", "y2"}), ("dA", {"dlora_A", "dlora_A0"}),
                                          ("nan", {"dx"})])
def test_a_wrong_backend_fails_and_the_wrong_tensor_is_named(wrong, op, how, failing):
    forward, backward = {"forward": (_wrong_forward, composite_backward), "dA": (composite_forward, _wrong_dA),
                         "nan": (composite_forward, _nan_dx)}[how]
    name = wrong("wrong_" + how, forward, backward)
    result = self_check(name, op=op, dropout_p=0.1)
    assert not result.ok
    bad = {t.name for t in result.tensors if not t.ok}
    assert bad & failing and bad <= failing | {"dmagnitude", "dx", "dlora_A1", "dlora_A2"}, bad
    assert result.worst.name in bad
    assert name in result.summary() and "FAILED" in result.summary()


def test_a_backend_that_raises_is_a_failed_check(wrong):
    name = wrong("raising", _raises)
    result = self_check(name, op="lora")
    assert not result.ok and "no kernel for this shape" in result.error and result.worst is None


# ----------------------------------------------------------------------------------------------
# python -m rslora_kernels.verify
# ----------------------------------------------------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from rslora_kernels import verify  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, interpret=False, extra_path=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "rslora_kernels.verify", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cli_on_the_cpu_passes_without_triton():
    # adapters in x's dtype: DoRA's magnitude grad with fp32 adapters and 16-bit x is a known failure (below)
    out = _cli("--adapter-dtypes", "same")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backends: reference, composite" in out.stdout or "backends: composite, reference" in out.stdout
    for op in ("lora", "dora", "qlora", "group"):
        assert f"\n{op} " in out.stdout
    assert "triton " not in out.stdout.split("\n", 2)[2]  # no triton rows without the interpreter
    assert out.stdout.rstrip().splitlines()[-1].startswith("all ")


def test_cli_naming_triton_on_the_cpu_turns_the_interpreter_on():
    out = _cli("--backends", "triton", "--ops", "lora", "--shapes", "13x11x9", "--ranks", "3", "--dtypes",
               "float32", "--adapter-dtypes", "same", "--dropout", "0.1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Triton interpreter" in out.stdout and "\nlora    triton" in out.stdout


def test_triton_composite_and_reference_pass_in_the_interpreter(capsys):
    if not rk.registered_backends()["triton"].runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run on the CPU here (TRITON_INTERPRET unset)")
    # adapters in x's dtype: bf16 x with fp32 adapters is the known finding below
    rc = verify.main(["--backends", "triton,composite,reference", "--ranks", "4", "--adapter-dtypes", "same",
                      "--shapes", "37x29x21", "--dtypes", "float32,bfloat16,float16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("\n") > 3 * 4 * 3 * 2  # backends x ops x dtypes x dropout rows


def test_fp32_adapters_on_a_16bit_base_are_judged_by_the_math_in_x_dtype():
    """PEFT's default, bf16 x with fp32 adapters: the kernels multiply with bf16 operands, so the
    rule's same-dtype error includes the reference run with every tensor in bf16. DoRA's magnitude
    grad exceeded the bound measured against the fp32-adapter reference alone (1.36x on composite at
    seed 1); with the magnitude grad's products in fp32 every result is within the rule."""
    for seed in range(6):
        for p in (0.0, 0.1):
            result = self_check("composite", op="dora", M=5, N=48, K=40, r=4, dtype=torch.bfloat16,
                                adapter_dtype=torch.float32, dropout_p=p, seed=seed)
            assert result.ok, result.summary()


@pytest.mark.xfail(strict=True, reason="known: triton's DoRA with dropout, bf16 x and fp32 adapters: the magnitude grad "
                                       "is 1.14x the rule's bound at M=5, seed 1 (0.32-0.98x at seeds 0, 2-5 and "
                                       "0.5-0.7x at M=128); docs/testing.md, Verify on demand")
def test_known_triton_dora_magnitude_grad_with_bf16_x_and_fp32_adapters():
    if not rk.registered_backends()["triton"].runs_on(torch.device("cpu")):
        pytest.skip("Triton cannot run on the CPU here (TRITON_INTERPRET unset)")
    result = self_check("triton", op="dora", M=5, N=48, K=40, r=4, dtype=torch.bfloat16,
                        adapter_dtype=torch.float32, dropout_p=0.1, seed=1)
    assert result.ok, result.summary()


def test_the_x_dtype_reference_counts_only_for_wider_adapters():
    """With adapters in x's dtype the bound comes from that one reference run: a backend that
    computes the adapter branch in fp16 while x is fp32 fails (it would pass were the fp16 run
    counted)."""
    name = "rk_test_fp16_adapter_math"

    def forward(x2d, weight, lora_A, lora_B, bias, scaling, p, seed):
        from rslora_kernels import reference
        return reference.lora_linear(x2d, weight, lora_A.half().float(), lora_B.half().float(), scaling, bias, 0.0)

    rk.register_backend(name, forward, None, devices=("cpu",), dtypes=(torch.float32, torch.bfloat16, torch.float16))
    try:
        result = self_check(name, op="lora", M=37, N=29, K=21, r=4, dtype=torch.float32, seed=0)
    finally:
        rk.unregister_backend(name)
    assert not result.ok, result.summary()


def test_dora_composite_lora_grads_with_fp32_adapters_match_the_reference_rounding():
    """g dy rounded once to x's dtype (the reference's type promotion): dA and dB within the rule on
    the seeds where rounding g first doubled dB's error (2.25x the bound at seed 1)."""
    for seed in range(4):
        result = self_check("composite", op="dora", M=37, N=29, K=21, r=4, dtype=torch.bfloat16,
                            adapter_dtype=torch.float32, dropout_p=0.1, seed=seed)
        assert all(t.ok for t in result.tensors if t.name in ("dlora_A", "dlora_B")), result.summary()


def test_a_wrong_backend_fails_the_command_and_is_named(wrong, capsys):
    name = wrong("skewed", _wrong_forward)
    rc = verify.main(["--backends", f"composite,{name}", "--ops", "lora,dora", "--dtypes", "float32",
                      "--ranks", "4", "--adapter-dtypes", "same"])
    out = capsys.readouterr().out
    assert rc == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("FAILED") and name in last and "composite" not in last
    assert all(("FAIL" in line) == (f" {name} " in line) for line in out.splitlines()[2:-1])


def test_a_wrong_backend_registered_by_an_imported_module_fails_the_cli(tmp_path):
    (tmp_path / "wrong_backend_plugin.py").write_text(
        "import torch, rslora_kernels as rk\n"
        "from rslora_kernels.ops.composite import composite_forward, composite_backward\n"
        "def bwd(*a):\n"
        "    dx, dA, dB, db = composite_backward(*a)\n"
        "    return dx, dA, (None if dB is None else dB * 1.01), db\n"
        "rk.register_backend('plugin_wrong', composite_forward, bwd, devices=('cpu',), dtypes=(torch.float32,))\n")
    out = _cli("--import", "wrong_backend_plugin", "--backends", "plugin_wrong", "--ops", "lora,group",
               "--dtypes", "float32", "--ranks", "4", extra_path=str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "plugin_wrong" in out.stdout.rstrip().splitlines()[-1] and "dlora_B" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--backends", "nope"], "not registered"), (["--ops", "lora,conv"], "conv"), (["--dtypes", "float8"], "float8"),
    (["--shapes", "3x4"], "shapes"), (["--import", "no_such_module_h7"], "no_such_module_h7")])
def test_bad_options_exit_2_with_a_message(args, message, capsys):
    assert verify.main(args) == 2
    assert message in capsys.readouterr().err
