"""The GPU run script cannot rot between GPU leases: its --dry-run does every step on the CPU.

``RESULTS_ROOT=DIR bash benchmarks/gpu_run.sh --dry-run`` must exit 0, write DIR/summary.md with
every step PASS, and leave at most 8 files in DIR, none more than two folder levels down (what a GPU lease brings back).

Also here: the compile cache the run fills ahead (``benchmarks.precompile``) holds exactly what
Triton's JIT looks up -- one variant compiled by precompile, then the JIT, pointed at the same
cache, must find it without compiling anything.
"""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["a-env", "p-precompile", "b-sweep", "b-train-step", "b-profile", "c-numerics", "d-tune", "e-determinism", "f-sanitizer", "g-wide-sweep"]


def _have_nvidia_toolchain():
    triton = pytest.importorskip("triton")
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # the run's train-step (and precompile's enumeration of it) builds PEFT models: the `peft` extra
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("gpu_run") / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESULTS_ROOT")}
    env.update(RESULTS_ROOT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_exits_0_and_every_step_passes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    rows = dict(re.findall(r"^\| ([a-g p]-[\w-]+) \| ([^|]+) \|", summary, flags=re.M))
    assert list(rows) == STEPS, summary
    for name, status in rows.items():
        assert status.strip() == "PASS", f"{name}: {status}\n{summary}"
    assert "compute-sanitizer absent: ran without it" in summary
    # the training step's own section: the tiny preset's table, PEFT and the patched model at both dropouts
    section = summary.split("## Training step: Llama-shaped model, PEFT vs patched", 1)[1].split("\n## ", 1)[0]
    for provider in ("peft", "auto"):
        for p in ("0.0", "0.1"):
            assert f"| 4 | {p} | {provider} |" in section, section
    assert "| 4 | 0.0 | auto |" in section and "PASS (" in section, section


def test_dry_run_files_fit_what_a_lease_brings_back(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files  # DIR/a/b/file at most
    names = {p.name for p in files}
    assert {"summary.md", "logs.tar.gz", "sweep.csv", "sweep_wide.csv", "profile.md", "tuned_configs.json"} <= names
    profile = (out / "profile.md").read_text()
    assert "| 3 | 0.1 | triton |" in profile and "| 3 | 0.1 | dora:composite |" in profile, profile[:2000]


def test_dry_run_sweep_rows_arrive_in_the_csv(dry_run):
    _, out = dry_run
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"triton", "composite", "eager", "roofline"}
    assert all(not r["error"] and float(r["ms"]) > 0 for r in rows), rows


def test_precompiled_variant_is_what_the_jit_looks_up(tmp_path):
    if not _have_nvidia_toolchain():
        pytest.skip("needs Triton's bundled NVIDIA compiler (ptxas)")
    cache = tmp_path / "cache"
    code = f"""
import os, torch
os.environ["TRITON_CACHE_DIR"] = {str(cache)!r}
from benchmarks import precompile as pc
from rslora_kernels.dropout.kernels import keep_mask_triton
launch = lambda: keep_mask_triton(7, 37, 45, 0.3, torch.device("meta"))   # the mask kernel: the cheapest compile
variants = []
with pc.target_gpu(90, 132, record=lambda jit, *spec: variants.append((jit, spec))):
    launch()
assert len(variants) == 1, variants
jit, (signature, constexprs, attrs, options) = variants[0]
seconds, error = pc.compile_one((jit.fn.__module__, jit.fn.__qualname__, signature, constexprs, attrs,
                                  options.__dict__), 90)
assert error is None, error
before = set(pc.cache_entries({str(cache)!r}))
assert len(before) == 1, before
with pc.target_gpu(90, 132):                   # now the JIT itself compiles (or finds) the launch
    launch()
after = set(pc.cache_entries({str(cache)!r}))
print("entries before", len(before), "after", len(after))
assert after == before, "the JIT computed another cache key than precompile"
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "entries before 1 after 1" in proc.stdout


def test_precompile_covers_the_tuners_candidates():
    """Step p compiles what step d will launch: every candidate config the tuner forces, the
    alternatives only a tuned table can pick included (F1 leaving the mask to the bits pass, the
    unsplit and the split 64-row shrinks, the 4-stage B3 tiles) and plan rank_mm's drop(x) kernel, so
    that the tuner's time goes to timing, not compiling."""
    code = """
from benchmarks import precompile as pc
from rslora_kernels.ops.triton_kernels import _shrink_kernel
variants = pc.enumerate_variants("gpu", 90, 132, steps=["d-tune"])
names = {v.qualname for v in variants}
deep = {v.qualname for v in variants if v.options.get("num_stages") == 4}
arg = lambda k: _shrink_kernel.arg_names[k[0]] if isinstance(k, tuple) else k
shrinks = {(c.get("BLOCK_M"), c.get("BLOCK_RED")) for c in
           ({arg(k): val for k, val in v.constexprs.items()} for v in variants if v.qualname == "_shrink_kernel")}
print(len(variants), sorted(names), sorted(deep), sorted(shrinks))
assert {"_keep_bits_kernel", "_shrink_kernel", "_dual_gemm_kernel", "_m_reduce_kernel", "_sum_splits_kernel",
        "_drop_by_bits_kernel"} <= names, names
assert {"_m_reduce_kernel"} <= deep, deep
assert {(64, 128), (64, 64), (32, 128)} <= shrinks, shrinks
assert all(v.steps == ["d-tune"] for v in variants)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
