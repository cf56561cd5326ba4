"""The δ-estimator benchmark's scoring: the issue's agreement goal on constructed
estimates (no timing asserted)."""

from __future__ import annotations

import math

import pytest
from toys import bench_module


def load_bench():
    return bench_module("delta_estimator")


REFERENCE = {  # site -> (ratio averaged over batches, standard error)
    "a.weight": (0.10, 0.01),
    "a.input": (0.02, 0.001),
    "b.weight": (0.04, 0.002),
    "b.input": (-0.03, 0.002),  # resolved, negative: δ = 0
    "c.weight": (0.001, 0.01),  # unresolved: not scored
}


def test_agreement_scores_median_worst_factor_and_sign_flips():
    bench = load_bench()
    close = {"a.weight": 0.11, "a.input": 0.019, "b.weight": 0.05, "b.input": -0.01, "c.weight": 9}
    score = bench.agreement(close, REFERENCE)
    assert score["resolved"] == 4 and score["positive"] == 3
    assert score["median_relative"] == pytest.approx(0.10)  # of 10 %, 5 %, 25 %
    assert score["worst_factor"] == pytest.approx(1.25)
    assert score["flips"] == 0 and score["meets"]
    flipped = dict(close, **{"b.input": 0.01})  # a resolved negative trace turned positive
    assert bench.agreement(flipped, REFERENCE)["flips"] == 1
    assert not bench.agreement(flipped, REFERENCE)["meets"]
    zero = dict(close, **{"b.weight": -0.001})  # δ 0 where the reference's is 0.04
    score = bench.agreement(zero, REFERENCE)
    assert math.isinf(score["worst_factor"]) and score["flips"] == 1 and not score["meets"]


def test_pooled_references_average_means_and_combine_errors():
    bench = load_bench()
    one = {"samples": 2, "seconds": 1.0, "ratios": {"s": [(1.0, 0.2), (3.0, 0.4)]}}
    two = {"samples": 2, "seconds": 2.0, "ratios": {"s": [(2.0, 0.2), (5.0, 0.4)]}}
    pooled = bench.pool([one, two])
    assert pooled["samples"] == 4 and pooled["seconds"] == 3.0
    (first, first_error), (second, second_error) = pooled["ratios"]["s"]
    assert (first, second) == (1.5, 4.0)
    assert first_error == pytest.approx(math.sqrt(0.08) / 2)
    mean, error = bench.summarise(pooled["ratios"])["s"]
    assert mean == pytest.approx(2.75)
    assert error == pytest.approx(math.hypot(first_error, second_error) / 2)
