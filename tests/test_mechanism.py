"""The ``mechanism`` callback: clip fraction, discretization error, flips and δ per layer,
on layers whose latents the tests set, then through the trainer (resume, rank 0, report)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toys import digits_recipe, toy_plugins

from ewgs_plugins import RoundSite, distributed, quantize_model
from ewgs_plugins.mechanism import Mechanism, observe
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.report import write_report
from ewgs_plugins.rundir import MECHANISM, read_mechanism
from ewgs_plugins.train import Trainer

# The interval method at W2 with l = -1, u = 1: the latent is z = 1.5 w + 1.5 (level
# units, exact in binary for these weights), steps = 3, clip bounds 0..3.
STEPS = 3


def interval_layer(weights: list[float], bits: int = 2) -> nn.Module:
    """A model of one quantized linear layer (1 × len(weights)) with the given weights."""
    model = quantize_model(
        nn.Sequential(nn.Linear(len(weights), 1, bias=False)),
        "interval",
        weight_bits=bits,
        activation_bits=bits,
        backward="ewgs",
        delta=0.25,
        quantize_first_last=True,
    )
    layer = model[0]
    layer.weight_quantizer.lower.data.fill_(-1.0)
    layer.weight_quantizer.upper.data.fill_(1.0)
    set_weights(model, weights)
    return model


def set_weights(model: nn.Module, weights: list[float]) -> None:
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weights]))


def drive(model: nn.Module, run_dir: Path, states: list[list[float]]) -> tuple[Mechanism, dict]:
    """One epoch of the callback's hooks on a stand-in trainer: the model holds
    ``states[0]`` before training and ``states[i]`` after optimizer step i. Returns the
    callback and the epoch's metrics."""
    trainer = SimpleNamespace(model=model, run_dir=run_dir, step=0)
    callback = Mechanism()
    set_weights(model, states[0])
    callback.ewgs_train_start(trainer)
    callback.ewgs_epoch_start(trainer, 0)
    for weights in states[1:]:
        set_weights(model, weights)
        trainer.step += 1
        callback.ewgs_step_end(trainer)
    metrics: dict = {}
    callback.ewgs_epoch_end(trainer, 0, metrics)
    return callback, metrics


def test_the_observer_sees_the_latent_the_levels_and_the_bounds():
    site = RoundSite()
    seen = []
    site.observer = lambda *call: seen.append(call)
    latent = torch.tensor([-0.7, 0.4, 2.6, 3.2])
    rounded = site(latent, 3, 0.0, 3.0)
    (call,) = seen
    assert torch.equal(call[0], latent) and torch.equal(call[1], rounded)
    assert call[2:] == (3, 0.0, 3.0)
    assert rounded.tolist() == [0.0, 0.0, 3.0, 3.0]
    site.observer = None
    assert torch.equal(site(latent, 3, 0.0, 3.0), rounded) and len(seen) == 1


def test_observe_leaves_the_quantizer_alone_and_unsets_the_observer():
    model = interval_layer([-0.5, 0.25, 0.75, 1.5])
    quantizer = model[0].weight_quantizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = observe(quantizer, model[0].weight)
    assert quantizer.round_site.observer is None
    assert view.steps == STEPS and (view.low, view.high) == (0.0, 3.0)
    assert view.latent.tolist() == [[0.75, 1.875, 2.625, 3.75]]
    assert not view.rounded.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_constructed_layer_gives_its_known_clip_fraction_error_and_flips(tmp_path):
    # latents z = 1.5 w + 1.5 and levels round(clip(z, 0, 3)):
    # before: z -0.75 0 0.75  1.6875 1.875 2.625 3.0  4.5  levels 0 0 1 2 2 3 3 3
    # step 1: z -0.75 0 1.875 1.6875 1.125 2.625 3.0  4.5  levels 0 0 2 2 1 3 3 3 (2 flips)
    # step 2: z  0.75 0 1.875 1.6875 1.125 2.625 2.25 4.5  levels 1 0 2 2 1 3 2 3 (2 flips)
    before = [-1.5, -1.0, -0.5, 0.125, 0.25, 0.75, 1.0, 2.0]
    step1 = [-1.5, -1.0, 0.25, 0.125, -0.25, 0.75, 1.0, 2.0]
    step2 = [-0.5, -1.0, 0.25, 0.125, -0.25, 0.75, 0.5, 2.0]
    model = interval_layer(before)
    callback, metrics = drive(model, tmp_path, [before, step1, step2])
    (row,) = read_mechanism(tmp_path)
    assert row == callback.history[0]
    assert (row["epoch"], row["step"], row["steps"]) == (0, 2, 2)
    layer = row["layers"]["0"]
    # at or beyond the bounds (z <= 0 or z >= 3): 4 of 8 after step 1, 2 of 8 after step 2
    assert layer["clip_fraction"] == pytest.approx((4 + 2) / 16)
    # |z - round z| of the latents inside, over 3 steps per unit of the range
    inside1 = [0.125, 0.3125, 0.125, 0.375]
    inside2 = [0.25, 0.125, 0.3125, 0.125, 0.375, 0.25]
    expected_error = sum(inside1 + inside2) / len(inside1 + inside2) / STEPS
    assert layer["error"] == pytest.approx(expected_error)
    assert layer["flips_per_weight"] == pytest.approx((2 + 2) / 8)
    assert layer["weights"] == 8
    assert layer["delta_weight"] == 0.25 and layer["delta_input"] is None  # raw input: FP
    assert metrics["mechanism_flips_per_weight"] == pytest.approx(0.5)
    assert metrics["mechanism_clip_fraction"] == pytest.approx(6 / 16)
    assert metrics["mechanism_error"] == pytest.approx(expected_error)


def test_a_site_without_clip_bounds_has_no_clip_fraction(tmp_path):
    # DoReFa's weights: tanh-normalised onto [0, 1], no bounds at the round site
    model = quantize_model(
        nn.Sequential(nn.Linear(4, 1, bias=False)),
        "dorefa",
        weight_bits=1,
        activation_bits=1,
        quantize_first_last=True,
    )
    states = [[0.5, -0.5, 0.1, -2.0], [0.5, -0.5, -0.1, -2.0]]  # one flip (0.1 -> -0.1)
    callback, metrics = drive(model, tmp_path, states)
    layer = callback.history[0]["layers"]["0"]
    assert layer["clip_fraction"] is None and "mechanism_clip_fraction" not in metrics
    assert layer["flips_per_weight"] == 0.25
    w_n = np.tanh(states[1]) / (2 * np.abs(np.tanh(states[1])).max()) + 0.5
    assert layer["error"] == pytest.approx(np.mean(np.abs(w_n - np.round(w_n))))


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4]),
    data=st.lists(
        st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=6, max_size=6),
        min_size=2,
        max_size=4,
    ),
)
def test_the_statistics_are_the_plain_formulas(tmp_path_factory, bits, data):
    """Clip fraction, error and flips equal their definitions computed with numpy on the
    interval latent z = (w - l) / (u - l) · steps, for any weights and steps."""
    steps = 2**bits - 1
    model = interval_layer(data[0], bits=bits)
    callback, _ = drive(model, tmp_path_factory.mktemp("run"), data)
    layer = callback.history[0]["layers"]["0"]
    z = [observe(model[0].weight_quantizer, torch.tensor([w])).latent.numpy()[0] for w in data]
    levels = [np.round(np.clip(zi, 0, steps)) for zi in z]
    after = z[1:]
    clipped = [(zi <= 0) | (zi >= steps) for zi in after]
    assert layer["clip_fraction"] == pytest.approx(np.mean(clipped))
    inside = np.concatenate(
        [np.abs(zi - np.round(zi))[~c] / steps for zi, c in zip(after, clipped)]
    )
    if inside.size:
        assert layer["error"] == pytest.approx(inside.mean(), rel=1e-5, abs=1e-7)
    else:
        assert layer["error"] is None
    flips = sum(int((a != b).sum()) for a, b in zip(levels, levels[1:]))
    assert layer["flips_per_weight"] == pytest.approx(flips / 6)


def test_only_the_main_process_measures_and_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    callback, metrics = drive(interval_layer([0.1, 0.9]), tmp_path, [[0.1, 0.9], [0.9, 0.1]])
    assert callback.history == [] and metrics == {}
    assert not (tmp_path / MECHANISM).exists()


# ------------------------------------------------------------------ through the trainer


def train(output: Path, **changes) -> Trainer:
    runs = expand_runs(digits_recipe(output, **changes), source="test")
    trainer = Trainer(runs[0].recipe, resume=(output / "checkpoint_last.pt").is_file())
    trainer.run()
    return trainer


def test_resume_writes_the_same_mechanism_file_and_report_plots_it(tmp_path):
    with toy_plugins():
        straight = train(tmp_path / "ewgs", epochs=3, callbacks={"mechanism": {}})
        stopped = {"mechanism": {}, "stop_after": {"epoch": 1}}
        train(tmp_path / "resumed", epochs=3, callbacks=stopped)
        assert len(read_mechanism(tmp_path / "resumed")) == 2
        train(tmp_path / "resumed", epochs=3, callbacks=stopped)
        train(tmp_path / "ste", epochs=3, backward="ste", callbacks={"mechanism": {}})
    rows = read_mechanism(tmp_path / "ewgs")
    assert rows == read_mechanism(tmp_path / "resumed")
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert [row["steps"] for row in rows] == [straight.steps_per_epoch] * 3
    layers = rows[-1]["layers"]
    assert list(layers) == ["3", "6"]  # the toy CNN's middle convs
    for layer in layers.values():
        assert 0 <= layer["clip_fraction"] <= 1 and 0 <= layer["error"] <= 0.5 / 3
        assert layer["flips_per_weight"] >= 0
    # the δ schedule estimated δ after epoch 1 under EWGS; STE keeps 0
    assert rows[0]["layers"]["3"]["delta_weight"] == 0.0
    assert (
        rows[-1]["layers"]["3"]["delta_weight"]
        == straight.model[3].weight_quantizer.round_site.delta
    )
    metrics = [json.loads(line) for line in (tmp_path / "ewgs" / "metrics.jsonl").open()]
    assert all("mechanism_flips_per_weight" in row for row in metrics)

    (tmp_path / "resumed" / "metrics.jsonl").unlink()  # one run per side in the report
    report = write_report(tmp_path).markdown.read_text()
    assert "![mechanism_toy_W2A2](mechanism_toy_W2A2.png)" in report
    assert (tmp_path / "mechanism_toy_W2A2.png").stat().st_size > 10_000
