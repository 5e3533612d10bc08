"""Static kernel quality, no GPU needed: every shipped Triton kernel variant compiled for sm_80 and sm_90.

Runs ``python -m benchmarks.static_report --quick`` in a fresh process without TRITON_INTERPRET
(conftest.py turns the interpreter on for this process) and checks the compiled variants:

* every kernel the packages define is launched by a scenario, and every variant compiles;
* the gate of issue 9 (``test_sm90_16bit_gate``): no spill and no serialized wgmma (ptxas C7515)
  in a 16-bit sm_90 variant, and the exit code and the last line say the same as the rows;
* no spills elsewhere either, except IEEE fp32 products (FFMA; reported, not failed);
* shared memory within one block's limit; tensor cores (HGMMA on sm_90, HMMA on sm_80) in every
  kernel whose products are not IEEE fp32;
* the C7515 detection flips on a known pair (the report checks that itself on every run).

Dtypes: bf16 (fp16 takes the same 16-bit code path; the full report covers it), fp32 and tf32.
The pure helpers (CTAs per SM, loop finding in SASS) are tested on hand-made inputs.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static_report as sr

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bf16", "fp32", "tf32")


def _have_toolchain():
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


needs_toolchain = pytest.mark.skipif(not _have_toolchain(), reason="needs Triton with its bundled NVIDIA tools")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.static_report", "--quick", "--dtype", *DTYPES,
         "--json", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"static report did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(report):
    return report[1]["rows"]


def _name(r):
    return f"{r['arch']} {r['dtype']} {r['kernel']} {r['role']} [{r['flags']}] {r['tiles']} w{r['warps']}/s{r['stages']}"


@needs_toolchain
def test_sm90_16bit_gate(report, rows):
    """Issue 9's gate: no spill and no serialized wgmma in any shipped 16-bit sm_90 variant."""
    proc, _ = report
    bad = [f"{_name(r)}: {'; '.join(sr.check_row(r))}" for r in rows if sr.failing(r)]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@needs_toolchain
def test_exit_code_and_last_line_agree_with_the_rows(report, rows):
    proc, _ = report
    assert proc.returncode == (1 if any(map(sr.failing, rows)) else 0), proc.stderr[-3000:]
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    m = re.fullmatch(r"(\d+) variants: (\d+) spills, (\d+) serialized wgmma", last)
    assert m, last
    ok = [r for r in rows if "error" not in r]
    assert int(m[1]) == len(rows)
    assert int(m[2]) == sum(1 for r in ok if r["stack_bytes"] or r["local_bytes"] or r["spill_store_bytes"])
    assert int(m[3]) == sum(1 for r in ok if r["wgmma_serialized"])


@needs_toolchain
def test_every_kernel_launched_and_every_variant_compiles(rows):
    errors = [f"{_name(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    seen = {(r["arch"], r["dtype"]) for r in rows}
    assert seen == {(a, d) for a in ("sm_80", "sm_90") for d in DTYPES}
    roles = {role for r in rows for role in r["role"].split("/")}
    assert {"mask", "dropout", "merge"} <= roles
    assert any(x.startswith("F") for x in roles) and any(x.startswith("B") for x in roles), roles
    flags = {f for r in rows for f in r["flags"].split(",")}
    assert {"HAS_DROPOUT", "HAS_BIAS"} <= flags


@needs_toolchain
def test_no_spills_except_ieee_fp32(rows):
    spills = [f"{_name(r)}: {r['registers']} regs, stack {r['stack_bytes']} B, local {r['local_bytes']} B"
              for r in rows if sr.has_spills(r) and (sr.tensor_cores_expected(r) or not r["dots"])]
    assert not spills, "\n".join(spills)


@needs_toolchain
def test_shared_memory_and_tensor_cores(rows):
    bad = []
    for r in rows:
        if "error" in r:
            continue
        limit = sr.SM_LIMITS[int(r["arch"][3:])]["smem_block"]
        if r["shared_bytes"] > limit:
            bad.append(f"{_name(r)}: {r['shared_bytes']} B shared > {limit} B")
        if r["ctas_per_sm"] < 1:
            bad.append(f"{_name(r)}: no CTA fits an SM")
        if sr.tensor_cores_expected(r) and not r["hgmma" if r["arch"] == "sm_90" else "hmma"]:
            bad.append(f"{_name(r)}: no tensor-core MMA")
    assert not bad, "\n".join(bad)
    bf16_products = [r for r in rows if "error" not in r and any(d["dtype"] == "bf16" for d in r["dots"])]
    assert bf16_products and all(sr.tensor_cores_expected(r) for r in bf16_products)


@needs_toolchain
def test_hot_loop_and_yardstick_reported_for_every_product_kernel(rows):
    missing = [_name(r) for r in rows if "error" not in r and r["dots"]
               and not (r["hot_loop_instructions"] and "vs_tutorial" in r)]
    assert not missing, "\n".join(missing)
    for r in rows:
        if "vs_tutorial" in r:  # a loop holds its products: never fewer instructions than MMAs
            assert r["hot_loop_instructions"] >= r["hot_loop_mma"] > 0, _name(r)


@needs_toolchain
def test_c7515_detector_flips(report):
    """The report compiles the tutorial matmul and a twin that ptxas must serialize, and stops
    unless the detection says pipelined for one and serialized for the other."""
    check = report[1]["detector_check"]
    assert check and "pipelined" in check and "serialized" in check, check


# ---- pure helpers, on hand-made inputs ----------------------------------------------------------
def test_ctas_per_sm_by_hand():
    # 172 regs x 32 threads = 5504 -> 5632 per warp (units of 256); x 8 warps = 45056 of 65536: 1 CTA
    assert sr.ctas_per_sm(90, 172, 97 * 1024, 8) == (1, "regs")
    # 128 regs x 8 warps = 32768: 2 CTAs; 97 KiB + 1 KiB reserved into 228 KiB: 2 CTAs
    assert sr.ctas_per_sm(90, 128, 97 * 1024, 8) == (2, "regs/smem")
    # 193 KiB: one CTA on sm_90; over sm_80's 163 KiB per-block limit: none
    assert sr.ctas_per_sm(90, 64, 193 * 1024, 4)[0] == 1
    assert sr.ctas_per_sm(80, 64, 193 * 1024, 4) == (0, "smem>block limit")
    # 16 regs, 1 warp: the 32-CTA slot limit binds before the threads (64 CTAs of 32 threads)
    assert sr.ctas_per_sm(80, 16, 0, 1) == (32, "ctas")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   NOP ;
.L_x_1:
	//## File "/src/kernels.py", line 12
        /*0020*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
        /*0040*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;
        /*0050*/              @!P0 BRA `(.L_x_2) ;
        /*0060*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0070*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0080*/              @!P1 BRA `(.L_x_1) ;
	//## File "/src/kernels.py", line 30 inlined at "/src/kernels.py", line 50
        /*0090*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00a0*/                   ISETP.GE.AND P2, PT, R2, R5, PT ;
        /*00b0*/                   BRA.U !UP0, 0x90 ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   BRA `(.L_x_3);
"""


def test_find_loops_on_hand_made_sass():
    instrs = sr.sass_instructions(SASS)
    assert len(instrs) == 13  # the NOP is left out
    assert instrs[4] == (0x50, "@!P0 BRA 0x40", "/src/kernels.py:12")  # label resolved, source kept
    loops = sr.find_loops(instrs)
    # the wait loop at 0x40 has no MMA; the loop 0x20..0x80 holds 3 HGMMA in 7 instructions (the
    # wait loop inside counts once); the loop 0x90..0xb0 (a helper's loop, inlined at line 50)
    # holds 1 HGMMA in 3; 0xd0 is padding
    assert sorted((lp["start"], lp["end"], lp["instructions"], lp["mma"], lp["source"]) for lp in loops) == \
        [(0x20, 0x80, 7, 3, "/src/kernels.py:12"), (0x90, 0xb0, 3, 1, "/src/kernels.py:30<kernels.py:50")]
    assert sr.hot_loop(loops)["start"] == 0x20


def test_ttir_dots_parse():
    ttir = ("%7 = tt.dot %a, %b, %acc : tensor<64x32xbf16> * tensor<32x128xbf16> -> tensor<64x128xf32> loc(#l)\n"
            "%8 = tt.dot %c, %d, %acc2, inputPrecision = tf32 : tensor<16x8xf32> * tensor<8x32xf32> -> "
            "tensor<16x32xf32>\n"
            "%9 = tt.dot %c, %d, %acc3 : tensor<16x8xf32> * tensor<8x32xf32> -> tensor<16x32xf32>\n")
    assert sr.ttir_dots(ttir) == [
        {"m": 64, "n": 128, "k": 32, "dtype": "bf16", "precision": None},
        {"m": 16, "n": 32, "k": 8, "dtype": "f32", "precision": "tf32"},
        {"m": 16, "n": 32, "k": 8, "dtype": "f32", "precision": "ieee"},
    ]


def test_trip_count_and_hot_loop_rule(tmp_path):
    src = tmp_path / "k.py"
    src.write_text("def k():\n    for red0 in range(0, RED, BLOCK_RED):\n        pass\n"
                   "    for k in range(0, tl.cdiv(K, BLOCK_K)):  # tutorial style\n        pass\n"
                   "    x = 1\n")
    assert sr.trip_count(f"{src}:2", {"RED": 4000, "BLOCK_RED": 64}) == 63  # 0, 64, ..., 3968
    assert sr.trip_count(f"{src}:4", {"K": 4000, "BLOCK_K": 64}) == 63
    assert sr.trip_count(f"{src}:2", {"RED": 4000}) is None  # bound not a launch argument
    assert sr.trip_count(f"{src}:6", {}) is None  # not a for statement
    assert sr.trip_count(f"{src}:2<caller.py:9", {"RED": 128, "BLOCK_RED": 64}) == 2  # inlined helper
    # the rank loop (wider body, 1 trip) loses to the K loop (64 trips); unknown trips fall back
    rank = {"instructions": 125, "mma": 4, "trips": 1}
    red = {"instructions": 117, "mma": 4, "trips": 64}
    assert sr.hot_loop([rank, red]) is red
    assert sr.hot_loop([dict(rank, trips=None), red])["instructions"] == 125


@needs_toolchain
def test_philox_detection(rows):
    """The mask and dropout kernels run Philox, the merge does not; the report lists the backward
    launches that do (issue 9 wants none)."""
    ok = [r for r in rows if "error" not in r]
    assert all(r["philox"] for r in ok if r["role"] in ("mask", "dropout"))
    assert not any(r["philox"] for r in ok if r["role"] == "merge")


def test_every_candidate_config_is_recorded_for_each_launch_site():
    """The report records each launch site under every candidate config. Launch plans hold the
    config they were made with, so without the report making them afresh per scenario it would
    record the first candidate's tiles again and again (it did: 580 variants instead of 1140, and
    B2's spilling 128 x 256 tile with dropout went unseen). Recording only, no compiling."""
    code = """
from benchmarks import static_report as sr
from rslora_kernels.ops import configs
import torch
calls = sr.record_launches("bf16", 90)
tiles = lambda kw: (kw["BLOCK_M"], kw["BLOCK_F"], kw["BLOCK_RED"])
b2 = {tiles(kw) for role, fn, args, kw, *_ in (c for c in calls if c[0] != "error")
      if fn.__name__ == "_dual_gemm_kernel" and kw["HAS_DROPOUT"]}
want = {(c.BLOCK_M, c.BLOCK_F, c.BLOCK_RED) for f, c in configs.candidate_configs(torch.bfloat16, 90) if f == "dual_gemm"}
print(sorted(b2), sorted(want))
assert want <= b2, (sorted(want), sorted(b2))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
