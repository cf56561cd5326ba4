"""δ pooled over refreshes (``HessianDelta.average``): the laws of the pooled mean, its
standard error and its lag, and the state a checkpoint keeps."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from toys import digits_recipe, toy_plugins

from ewgs_plugins import (
    ConfigError,
    HessianDelta,
    estimate_hessian_deltas,
    quantize_model,
    registry,
)
from ewgs_plugins.delta import RatioPool
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.train import Trainer

ratio = st.floats(-1.0, 1.0, allow_nan=False)
batch_ratios = st.lists(ratio, min_size=1, max_size=4)
sites = st.sampled_from(["a.weight", "a.input", "b.weight"])
refresh = st.dictionaries(sites, batch_ratios, min_size=1).map(
    lambda r: {name: r[name] for name in sorted(r)}
)
averages = st.sampled_from(
    [("none", 3, 0.5), ("window", 3, 0.5), ("window", None, 0.5), ("ema", 3, 0.7)]
)


def pool_of(average: tuple) -> RatioPool:
    kind, window, decay = average
    return RatioPool(kind, window, decay)


@given(averages, refresh)
def test_one_refresh_is_the_plain_estimate(average, ratios):
    deltas = pool_of(average).add(ratios)
    # the plain estimate's arithmetic (estimate_hessian_deltas): mean, then max(0, ·)
    assert deltas == {name: max(0.0, sum(rs) / len(rs)) for name, rs in ratios.items()}


@given(averages, st.lists(refresh, min_size=1, max_size=6))
def test_delta_is_never_negative_and_zero_at_zero_trace(average, refreshes):
    pool = pool_of(average)
    for ratios in refreshes:
        assert all(d >= 0 for d in pool.add(ratios).values())
    flat = pool_of(average)
    for ratios in refreshes:
        zero = flat.add({name: [0.0] * len(rs) for name, rs in ratios.items()})
        assert set(zero.values()) == {0.0}


@given(st.lists(refresh, min_size=1, max_size=8), st.integers(1, 4))
def test_the_window_pools_exactly_the_last_refreshes(refreshes, window):
    pool = RatioPool("window", window)
    for ratios in refreshes:
        deltas = pool.add(ratios)
    last = refreshes[-window:]
    for name, delta in deltas.items():
        values = [v for r in last if name in r for v in r[name]]
        assert delta == pytest.approx(max(0.0, sum(values) / len(values)), abs=1e-12)


@given(st.lists(ratio, min_size=2, max_size=5, unique=True), st.integers(1, 9))
def test_the_standard_error_shrinks_as_one_over_root_k(batch, k):
    # k refreshes with the same spread: the pooled standard error is SE(1)/√k
    pool = RatioPool("window", None)
    first = pool.add({"a.weight": batch})
    one = pool.standard_errors()["a.weight"]
    assert one == pytest.approx(math.sqrt(_variance(batch) / len(batch)))
    for i in range(1, k):
        rotated = batch[i % len(batch) :] + batch[: i % len(batch)]
        assert pool.add({"a.weight": rotated}) == pytest.approx(first)
    assert pool.standard_errors()["a.weight"] == pytest.approx(one / math.sqrt(k))


@given(st.floats(0.0, 0.9), st.integers(1, 12))
def test_the_ema_standard_error_follows_its_weights(decay, k):
    batch = [0.1, 0.3, 0.2]
    pool = RatioPool("ema", decay=decay)
    weights2 = 0.0
    for _ in range(k):
        pool.add({"a.input": batch})
        weights2 = decay**2 * weights2 + (1 - decay) ** 2 if weights2 else 1.0
    error = pool.standard_errors()["a.input"]
    assert error == pytest.approx(math.sqrt(weights2 * _variance(batch) / 3))
    # the limit: variance (1 - decay) / (1 + decay) of one refresh's
    if k == 12 and decay <= 0.5:
        limit = math.sqrt((1 - decay) / (1 + decay) * _variance(batch) / 3)
        assert error == pytest.approx(limit, rel=1e-3)


@given(st.floats(0.05, 0.5), st.floats(-0.01, 0.01), st.integers(1, 5), st.integers(0, 10))
def test_a_steady_drift_lags_as_stated(start, slope, window, extra):
    # δ(t) = start + slope·t, exactly known at every refresh: the window's mean lags
    # (k-1)/2 refreshes once full, the EMA's decay/(1-decay) (less its start's share)
    decay = 0.5
    windowed, moving = RatioPool("window", window), RatioPool("ema", decay=decay)
    count = window + extra
    for t in range(count):
        value = start + slope * t
        a = windowed.add({"s.weight": [value, value]})
        b = moving.add({"s.weight": [value]})
    now = start + slope * (count - 1)
    assert windowed.pooled["s.weight"].mean == pytest.approx(now - slope * (window - 1) / 2)
    lag = decay / (1 - decay) * (1 - decay ** (count - 1))
    assert moving.pooled["s.weight"].mean == pytest.approx(now - slope * lag)
    assert a["s.weight"] == max(0.0, windowed.pooled["s.weight"].mean)
    assert b["s.weight"] == max(0.0, moving.pooled["s.weight"].mean)


def test_the_running_mean_of_noisy_estimates_converges():
    # i.i.d. noisy refreshes around a known ratio: the running mean's error falls
    # within a few of its own standard errors, and that error shrinks with k
    generator = torch.Generator().manual_seed(0)
    pool = RatioPool("window", None)
    errors = []
    for _ in range(400):
        noise = torch.randn(3, generator=generator, dtype=torch.float64) * 0.05
        pool.add({"s.weight": (0.07 + noise).tolist()})
        errors.append(pool.standard_errors()["s.weight"])
    assert abs(pool.pooled["s.weight"].mean - 0.07) < 4 * errors[-1]
    assert errors[-1] < errors[3] / 5 and errors[-1] < 0.05 / math.sqrt(1200) * 1.2


@given(averages, st.lists(refresh, min_size=2, max_size=6), st.data())
def test_the_state_restores_the_pool_exactly(average, refreshes, data):
    split = data.draw(st.integers(1, len(refreshes) - 1))
    straight = pool_of(average)
    expected = [straight.add(r) for r in refreshes]
    first = pool_of(average)
    for r in refreshes[:split]:
        first.add(r)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = pool_of(average)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.standard_errors() == first.standard_errors()
    assert [resumed.add(r) for r in refreshes[split:]] == expected[split:]
    assert resumed.standard_errors() == straight.standard_errors()


def test_a_pooling_estimator_starts_at_the_plain_estimate_on_a_model():
    torch.manual_seed(0)
    model = quantize_model(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
        "dorefa",
        weight_bits=2,
        activation_bits=2,
        quantize_first_last=True,
    )
    inputs, targets = torch.randn(8, 3), torch.randint(0, 2, (8,))
    model(inputs)
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    torch.manual_seed(1)
    plain = estimate_hessian_deltas(model, batches, loss_fn, samples=2)
    for average in ("window", "ema"):
        torch.manual_seed(1)
        estimator = HessianDelta(samples=2, average=average)
        assert estimator.estimate(model, batches, loss_fn) == plain
        assert set(estimator.standard_errors()) == set(plain)


def test_recipe_options_and_their_errors():
    delta = registry().create("delta", "hessian", {"average": "ema", "decay": 0.8}, "delta")
    assert delta.average == "ema" and delta.decay == 0.8
    with pytest.raises(ConfigError, match=r"delta\.options: .*decay must be in \[0, 1\)"):
        registry().create("delta", "hessian", {"average": "ema", "decay": 1.0}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options: .*window must be >= 1"):
        registry().create("delta", "hessian", {"average": "window", "window": 0}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options\.average: expected one of"):
        registry().create("delta", "hessian", {"average": "running"}, "delta")


def test_a_resumed_run_pools_the_refreshes_of_the_first_part(tmp_path: Path):
    delta = {
        "name": "hessian",
        "options": {"every": 1, "batches": 2, "samples": 2, "average": "window", "window": 3},
    }

    def run(name: str, resume: bool = False, stop: bool = False) -> Trainer:
        callbacks = {"stop_after": {"epoch": 1}} if stop else {}
        (spec,) = expand_runs(
            digits_recipe(tmp_path / name, epochs=4, delta=delta, callbacks=callbacks),
            source="test",
        )
        trainer = Trainer(spec.recipe, resume=resume, progress=False)
        trainer.run()
        return trainer

    with toy_plugins():
        straight = run("straight")
        run("resumed", stop=True)
        resumed = run("resumed", resume=True, stop=True)
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "deltas.jsonl").open()]
        for name in ("straight", "resumed")
    }
    assert rows["straight"] == rows["resumed"]
    assert len(rows["straight"]) == 4  # the start, then after epochs 1, 2, 3
    assert all(set(row["standard_errors"]) == set(row["deltas"]) for row in rows["straight"][1:])
    pool = straight.delta_estimator.pool
    assert len(pool.refreshes) == 3
    assert pool.state_dict() == resumed.delta_estimator.pool.state_dict()


def _variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
