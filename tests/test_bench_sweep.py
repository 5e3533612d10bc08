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
