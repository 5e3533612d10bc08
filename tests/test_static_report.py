"""Static kernel quality, no GPU needed: every Triton kernel compiled for sm_80 and sm_90.

Runs ``python -m benchmarks.static_report --quick`` in a fresh process without TRITON_INTERPRET
(conftest.py turns the interpreter on for this process) and checks each compiled variant:

* it compiles;
* no register spills (the cubin's stack and local sizes are 0);
* shared memory fits one block's limit: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100);
* the op's GEMM kernels (F1/B1, F2/B2, B3) use tensor cores: HGMMA (warpgroup MMA) in the sm_90
  SASS and HMMA on sm_80, for bf16 and TF32. Not for IEEE fp32 (torch's default matmul
  precision): no tensor core computes full fp32 products, so those dots are FFMA by design. The
  mask and dropout kernels are elementwise; the merge kernel's dot is IEEE fp32 on purpose.

Dtypes: bf16 (fp16 takes the same 16-bit code path; the full report in the README covers it),
fp32 and tf32. ``--quick`` compiles, per kernel, the configs with the smallest and the largest
rank tile. The full matrix: ``python -m benchmarks.static_report``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
GEMM_KERNELS = {"_shrink_kernel", "_dual_gemm_kernel", "_m_reduce_kernel"}
ALL_KERNELS = GEMM_KERNELS | {"_keep_bits_kernel", "_mask_kernel", "_dropout_scale_kernel", "_merge_kernel"}
DTYPES = ("bf16", "fp32", "tf32")


def _have_toolchain():
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


pytestmark = pytest.mark.skipif(not _have_toolchain(), reason="needs Triton with its bundled NVIDIA tools")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.static_report", "--quick", "--dtype", *DTYPES,
         "--json", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"static report did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())["rows"]


def _name(r):
    return f"{r['arch']} {r['dtype']} {r['kernel']} {r['role']} [{r['flags']}] {r['tiles']}"


def test_covers_every_kernel_arch_dtype_and_launch(rows):
    seen = {(r["arch"], r["dtype"], r["kernel"]) for r in rows}
    want = {(a, d, k) for a in SMEM_LIMIT for d in DTYPES for k in ALL_KERNELS}
    assert want <= seen, f"missing: {sorted(want - seen)}"
    roles = {role for r in rows for role in r["role"].split("/")}
    assert roles == {"bits", "F1", "F2", "B1", "B2", "B3", "mask", "dropout", "merge"}
    flags = {f for r in rows for f in r["flags"].split(",")}
    assert {"HAS_DROPOUT", "COLSUM", "HAS_BIAS", "SPLIT_M"} <= flags


def test_every_variant_compiles(rows):
    errors = [f"{_name(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_register_spills(rows):
    spills = [f"{_name(r)}: {r['registers']} regs, stack {r['stack_bytes']} B, local {r['local_bytes']} B"
              for r in rows if "error" not in r and (r["stack_bytes"] or r["local_bytes"])]
    assert not spills, "\n".join(spills)


def test_shared_memory_within_device_limit(rows):
    over = [f"{_name(r)}: {r['shared_bytes']} B" for r in rows
            if "error" not in r and r["shared_bytes"] > SMEM_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_gemm_kernels_use_tensor_cores(rows):
    missing = []
    for r in rows:
        if "error" in r or r["kernel"] not in GEMM_KERNELS or r["dtype"] == "fp32":
            continue
        if r["arch"] == "sm_90" and r["hgmma"] == 0:
            missing.append(f"{_name(r)}: no HGMMA")
        if r["arch"] == "sm_80" and r["hmma"] == 0:
            missing.append(f"{_name(r)}: no HMMA")
    assert not missing, "\n".join(missing)
