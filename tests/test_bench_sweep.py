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
