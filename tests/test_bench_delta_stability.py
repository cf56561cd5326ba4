"""The δ-stability benchmark's analysis on constructed refreshes (no timing asserted)."""

from __future__ import annotations

import math
import random

import pytest
from toys import bench_module


def load_bench():
    return bench_module("delta_stability")


def refreshes(rng: random.Random, count: int, shift: float = 0.0) -> list[dict]:
    """Refreshes of 3 batches: a noisy site, a quiet one, and one at δ = 0."""
    out = []
    for _ in range(count):
        ratios = {
            "a.weight": [0.07 + shift + rng.gauss(0, 0.03) for _ in range(3)],
            "a.input": [0.01 + rng.gauss(0, 0.001) for _ in range(3)],
            "b.weight": [-0.02 + rng.gauss(0, 0.001) for _ in range(3)],
        }
        out.append({"seconds": 1.0, "ratios": ratios})
    return out


def test_pooling_shrinks_the_spread_as_root_window_and_drift_is_measured():
    bench = load_bench()
    rng = random.Random(0)
    result = {"plain": refreshes(rng, 300), "drift": refreshes(rng, 300, 0.01), "drift_steps": 40}
    summary = bench.analyse(result, window=3)
    assert summary["resolved"] == 2  # the site at δ = 0 is not scored
    noisy = summary["per_site"]["a.weight"]
    # one refresh: sd of the mean of 3 batches, 0.03/√3 of 0.07
    assert noisy["before"] == pytest.approx(0.03 / math.sqrt(3) / 0.07, rel=0.15)
    assert noisy["after"] == pytest.approx(noisy["before"] / math.sqrt(3), rel=0.3)
    assert summary["before"]["worst"] == noisy["before"]
    assert noisy["drift_per_step"] == pytest.approx(0.01 / 40, rel=0.3)
    drift = summary["drift"]
    assert drift["resolved"] >= 1 and drift["chi2"] > 2 * summary["resolved"]
    assert drift["rms_relative_per_step"] > 0
    # read off Σz²: the quiet site's 0.01 on 0.01 over 40 steps dominates the typical drift
    assert drift["typical_relative_per_step"] > 0.5 * drift["rms_relative_per_step"]
    text = bench.report(summary, window=3, every=80)
    assert "pooled over 3 refreshes" in text and "lags 80 steps" in text


def test_no_drift_reads_as_none_resolved():
    bench = load_bench()
    rng = random.Random(1)
    result = {"plain": refreshes(rng, 60), "drift": refreshes(rng, 60), "drift_steps": 40}
    drift = bench.analyse(result, window=3)["drift"]
    assert drift["resolved"] <= 1 and drift["chi2"] < 8
    assert drift["typical_relative_per_step"] < drift["resolution_relative_per_step"]


def test_the_per_site_estimators_spread_comes_from_its_per_batch_ratios():
    bench = load_bench()
    rng = random.Random(2)
    reference = {
        "a.weight": [0.07 + rng.gauss(0, 0.02) for _ in range(400)],
        "a.input": [0.01 + rng.gauss(0, 0.0005) for _ in range(400)],
        "b.weight": [-0.02] * 400,
    }
    result = {
        "args": {"batches": "3", "reference_samples": "50"},
        "plain": refreshes(rng, 60),
        "reference": {"seconds": 40.0, "ratios": reference},
    }
    summary = bench.analyse(result, window=3)
    spread = summary["reference_spread"]
    # one refresh of 3 batches: sd 0.02/√3 of 0.07 at the noisy site
    assert spread["site"] == "a.weight"
    assert spread["worst"] == pytest.approx(0.02 / math.sqrt(3) / 0.07, rel=0.15)
    assert summary["reference_seconds_per_refresh"] == pytest.approx(40.0 * 3 / 400)
    assert "the per-site estimator (probe: site), 50 probes" in bench.report(summary, 3, 80)
