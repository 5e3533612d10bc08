"""The rank sweep runs end to end on a tiny case and writes what the README promises.

Timing figures are never asserted (they belong to benchmarks); this checks the plumbing: every
requested provider/mode/rank gives a finite row, the baseline's speedup is exactly 1, the roofline
row is there, the FLOP formula, and CSV/JSON/Markdown/PNG files exist.
"""
import csv
import json
import math

import pytest

sweep = pytest.importorskip("benchmarks.sweep")


def test_op_flops_match_the_design_formula():
    M, K, N, r = 8192, 4096, 4096, 16
    assert sweep.op_flops(M, K, N, r, "fwd+bwd") == 4 * M * N * K + 6 * M * (N + K) * r
    assert sweep.op_flops(M, K, N, r, "fwd") + sweep.op_flops(M, K, N, r, "bwd") == sweep.op_flops(M, K, N, r, "fwd+bwd")


def test_tiny_sweep_writes_tables_and_plots(tmp_path):
    pytest.importorskip("peft")  # a provider of this sweep (the 'peft' extra)
    pytest.importorskip("matplotlib")  # the plots (the 'bench' extra)
    providers = ["eager", "reference", "peft"]
    out = tmp_path / "sweep"
    rc = sweep.main(["--device", "cpu", "--shapes", "72x40", "--m", "33", "--ranks", "3", "20",
                     "--modes", "fwd+bwd", "bwd", "--dropout", "0.1", "--providers", *providers,
                     "--min-time", "0.02", "--rounds", "1", "--rotate", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    got = {(x["provider"], x["mode"], x["r"]) for x in rows}
    for p in providers + ["roofline"]:
        for mode in ("fwd+bwd", "bwd"):
            for r in (3, 20):
                assert (p, mode, r) in got
    for x in rows:
        assert not x["error"], x
        assert math.isfinite(x["ms"]) and x["ms"] > 0
        if x["provider"] == "eager":
            assert x["speedup_vs_eager"] == 1.0
        if x["provider"] == "roofline":
            assert x["roofline_pct"] == pytest.approx(100.0)
        else:
            assert x["saved_bytes"] is not None and x["saved_bytes"] > 0
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| r | eager | reference | peft | roofline |" in (out / "sweep.md").read_text()
    assert len(list(out.glob("*.png"))) == 2


def test_group_sweep_rows(tmp_path):
    """--group: the group, its members separately and PEFT's layers, each with a finite time and the
    bytes saved for backward; PEFT's speedup and bytes ratio exactly 1."""
    pytest.importorskip("peft")
    out = tmp_path / "group"
    rc = sweep.main(["--group", "qkv", "--group-k", "64", "--m", "33", "--ranks", "3", "--dropout", "0.1",
                     "--min-time", "0.02", "--rounds", "1", "--rotate", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "group.json").read_text())["rows"]
    assert [x["provider"] for x in rows] == ["peft", "separate:composite", "group:composite"]
    assert rows[0]["Ns"] == [64, 16, 16] and rows[0]["K"] == 64
    for x in rows:
        assert math.isfinite(x["ms"]) and x["ms"] > 0 and x["saved_bytes"] > 0
    assert rows[0]["speedup_vs_peft"] == 1.0 and rows[0]["saved_vs_peft"] == 1.0
    assert "| 33 | 3 | 0.1 | group:composite |" in (out / "group.md").read_text()


def test_dora_cpu_floor_rows_are_printed_and_the_sparse_rewrite_is_exact(capsys):
    """benchmarks.dora_cpu runs on a tiny case and prints its floor rows; the dropout rewrite that
    the floor-sparse row times is exact: drop(x) W^T = (x W^T - (x*D) W^T) / (1-p) and
    keep/(1-p) * (dy W) = (dy W) / (1-p) - D * (dy W) / (1-p), D the dropped positions."""
    pytest.importorskip("peft")
    import torch

    from benchmarks import dora_cpu

    dora_cpu.main(["--M", "37", "--K", "40", "--N", "24", "--r", "4", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    floors = [row for row in rows if len(row) > 2 and row[1].startswith("floor")]
    assert [(f[0], f[1]) for f in floors] == [("0.0", "floor"), ("0.1", "floor"), ("0.1", "floor-sparse")]
    # the times themselves, not their printed rounding (0.1 ms: a tiny case can print 0.0)
    timed = [(row["p"], row["method"], row["ms"]) for row in dora_cpu.run(37, 40, 24, 4, [0.0, 0.1], 1, 0)
             if row["method"].startswith("floor")]
    assert [(p, m) for p, m, _ in timed] == [(0.0, "floor"), (0.1, "floor"), (0.1, "floor-sparse")]
    assert all(math.isfinite(ms) and ms > 0 for _, _, ms in timed)

    g = torch.Generator().manual_seed(5)
    M, K, N, p = 37, 40, 24, 0.1
    x, W, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((M, K), (N, K), (M, N)))
    dropped = torch.rand(M, K, generator=g) < 0.3  # denser than p, so every row has some
    x_drop = torch.where(dropped, 0.0, x) / (1 - p)
    x_dropped_csr = (x * dropped).to_sparse_csr()
    torch.testing.assert_close((x @ W.t() - torch.sparse.mm(x_dropped_csr, W.t())) / (1 - p), x_drop @ W.t())
    sampled = torch.sparse.sampled_addmm(dropped.double().to_sparse_csr(), dy, W, beta=0.0).to_dense()
    torch.testing.assert_close((dy @ W - sampled) / (1 - p), torch.where(dropped, 0.0, dy @ W) / (1 - p))


def test_profile_step_kernel_work_counts_each_launchs_operands():
    """benchmarks.profile_step.kernel_work: the bytes of the tensors each launch reads and writes
    (sized here from real tensors) and 2 m n k per product, summed over a kernel's launches."""
    import torch
    from benchmarks.profile_step import kernel_work
    M, K, N, r, p = 48, 96, 40, 8, 0.1
    e = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, dtype=dt).nbytes  # noqa: E731
    bits = e(M, K // 32, dt=torch.int32)
    x, W, A, B, T, U, dy = e(M, K), e(N, K), e(r, K), e(N, r), e(M, r), e(M, r), e(M, N)
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    expected = {
        "_shrink_kernel": (x + A + T + bits + dy + B + U, mm(M, K, r) + mm(M, N, r)),
        "_dual_gemm_kernel": (x + W + T + B + e(N) + e(M, N) + dy + W + U + A + bits + e(M, K),
                              mm(M, K, N) + mm(M, r, N) + mm(M, N, K) + mm(M, r, K)),
        "_m_reduce_kernel": (U + x + bits + A + dy + T + B + e(N, dt=torch.float32), mm(r, M, K) + mm(N, M, r)),
        "_keep_bits_kernel": (bits, 0),
        "_drop_by_bits_kernel": (2 * (x + bits + x), 0),
    }
    for name, want in expected.items():
        assert kernel_work(f"triton_{name}_0d1d", M, K, N, r, p, 2) == want, name
    # DoRA: two products a tile over the same W; the plain dual GEMM name means nothing there
    assert kernel_work("_dora_fwd_kernel", M, K, N, r, p, 2) == (
        x + W + T + B + e(N, dt=torch.float32) + bits + 2 * e(M, N), 2 * mm(M, K, N) + mm(M, r, N))
    assert kernel_work("_dual_gemm_kernel", M, K, N, r, p, 2, dora=True) is None
    # no dropout: no keep-bits anywhere
    assert kernel_work("_shrink_kernel", M, K, N, r, 0.0, 2)[0] == x + A + T + dy + B + U
    assert kernel_work("_keep_bits_kernel", M, K, N, r, 0.0, 2) == (0, 0)
    for other in ("aten::mm", "sm90_xmma_gemm_bf16bf16", "_sum_splits_kernel"):
        assert kernel_work(other, M, K, N, r, p, 2) is None


def test_profile_step_kernel_table_rates(monkeypatch):
    """The GB/s and TFLOP/s columns are work over the row's own per-step time (no timing asserted:
    the rate is checked against the time printed next to it)."""
    import torch
    from benchmarks.profile_step import kernel_table
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    total, table = kernel_table(lambda: torch.mm(a, b), torch.device("cpu"), steps=2,
                                work=lambda name: (5e8, 3e9) if name == "aten::mm" else None)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["ms / step", "calls / step", "GB/s", "TFLOP/s", "kernel"]
    (mm_row,) = [row for row in rows[2:] if row[4] == "`aten::mm`"]
    ms = float(mm_row[0])
    if ms >= 1e-3:  # printed with 4 decimals: a rate is only checkable against a readable time
        assert float(mm_row[2]) == pytest.approx(5e8 / ms / 1e6, rel=0.05 + 1e-4 / ms)
        assert float(mm_row[3]) == pytest.approx(3e9 / ms / 1e9, rel=0.05 + 1e-4 / ms, abs=0.06)
    assert all(row[2:4] == ["-", "-"] for row in rows[2:] if row[4] != "`aten::mm`")
