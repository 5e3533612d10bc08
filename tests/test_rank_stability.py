"""A small seeded run of examples/rank_stability.py: the rsLoRA paper's qualitative claims must hold.

Thresholds come from the theory, not from this run. At init B = 0, so the adapter gradient is
``dL/dB = s * dy^T (x A^T)`` and ``|x A^T|`` grows like ``sqrt(r)``: the gradient norm scales like
``s * sqrt(r)``, i.e. like ``r^-1/2`` under ``s = alpha / r`` and like ``r^0`` under
``s = alpha / sqrt(r)``. Over ranks 4..64 the theory therefore predicts a fall by a factor of
``sqrt(64 / 4) = 4`` under alpha/r and no change under alpha/sqrt(r). We allow the measurement a
factor ``TOL = 2`` either way around the theory -- so "falls clearly" means a fall by at least
4 / 2 = 2x, and "a narrow band" means max/min over ranks at most 2 -- and demand the same of the
gradient norm averaged over the whole run (the paper's claim is about training, not only init).
"""
import importlib.util
import math
import os
import sys

import copy

import pytest
import torch

from numerics import assert_close_to_oracle

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "rank_stability.py")
_spec = importlib.util.spec_from_file_location("rank_stability", _PATH)
rank_stability = importlib.util.module_from_spec(_spec)
sys.modules["rank_stability"] = rank_stability  # dataclasses look the module up while it executes
_spec.loader.exec_module(rank_stability)

RANKS = [4, 16, 64]
TOL = 2.0  # allowed factor between measurement and theory
THEORY_FALL = math.sqrt(RANKS[0] / RANKS[-1])  # grad norm ratio r_max / r_min under alpha/r (1 under alpha/sqrt(r))
CFG = rank_stability.Config(ranks=RANKS, width=128, steps=100, batch=256, eval_batch=2048, seed=0)


@pytest.fixture(scope="module")
def results():
    # Width-128 GEMMs gain nothing from threads, and OpenMP spin-waiting makes them crawl when the cores
    # are shared (measured on the 2-core dev box under load: 38 s with 2 threads, 3 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rank_stability.sweep(CFG)
    finally:
        torch.set_num_threads(threads)


def _mean(v):
    return sum(v) / len(v)


@pytest.mark.parametrize("stat", ["init", "mean over training"])
def test_alpha_over_r_grad_norm_falls_with_rank(results, stat):
    runs = results["alpha/r"]
    g = [runs[r]["grad_norm"][0] if stat == "init" else _mean(runs[r]["grad_norm"]) for r in RANKS]
    assert all(math.isfinite(v) and v > 0 for v in g), g
    assert all(a > b for a, b in zip(g, g[1:])), f"alpha/r grad norm should fall at every rank step: {g}"
    ratio = g[-1] / g[0]
    assert ratio <= TOL * THEORY_FALL, f"alpha/r grad norm fell only {1 / ratio:.2f}x over ranks {RANKS} (theory {1 / THEORY_FALL:.0f}x)"
    if stat == "init":  # the r^-1/2 law itself, from both sides
        assert ratio >= THEORY_FALL / TOL, f"alpha/r grad norm at init fell {1 / ratio:.2f}x; theory {1 / THEORY_FALL:.0f}x"


@pytest.mark.parametrize("stat", ["init", "mean over training"])
def test_rslora_grad_norm_stays_in_narrow_band(results, stat):
    runs = results["alpha/sqrt(r)"]
    g = [runs[r]["grad_norm"][0] if stat == "init" else _mean(runs[r]["grad_norm"]) for r in RANKS]
    assert all(math.isfinite(v) and v > 0 for v in g), g
    assert max(g) / min(g) <= TOL, f"alpha/sqrt(r) grad norm spread {max(g) / min(g):.2f}x over ranks {RANKS}: {g}"


def test_rslora_loss_improves_with_rank_and_beats_lora_at_top_rank(results):
    rs = [results["alpha/sqrt(r)"][r]["final_eval_loss"] for r in RANKS]
    lo = [results["alpha/r"][r]["final_eval_loss"] for r in RANKS]
    assert all(math.isfinite(v) for v in rs + lo), (rs, lo)
    assert all(a > b for a, b in zip(rs, rs[1:])), f"alpha/sqrt(r) final loss should fall with rank: {rs}"
    assert rs[-1] < lo[-1], f"at r={RANKS[-1]}: alpha/sqrt(r) loss {rs[-1]:.4f} vs alpha/r {lo[-1]:.4f}"


def test_every_run_starts_from_the_base_model(results):
    """Sanity of the setup: B = 0 at init, so step 0's loss is the base model's (1.0 relative) for all
    runs: each matches the base model's loss on the first batch in float64 by the numerics rule."""
    base, teacher, _, _, loss_norm = rank_stability.make_task(CFG)
    x = next(iter(rank_stability.batches(CFG)))

    def base_loss(dtype):
        b, t = copy.deepcopy(base).to(dtype), copy.deepcopy(teacher).to(dtype)
        with torch.no_grad():
            return torch.mean((b(x.to(dtype)) - t(x.to(dtype))) ** 2) / loss_norm

    oracle, same = base_loss(torch.float64), base_loss(torch.float32)
    for label in results:
        for r in RANKS:
            got = torch.tensor(results[label][r]["loss"][0], dtype=torch.float32)  # a float32 loss's .item()
            assert_close_to_oracle(f"step-0 loss, {label}, r={r}", got, oracle, same)
    # the step-0 batch differs from the eval set used for normalisation: allow sampling noise
    assert 0.8 < oracle.item() < 1.25, oracle.item()
