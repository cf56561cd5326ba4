"""The ``tensorboard`` training callback: the events of a run read back with
TensorBoard's own reader, rank 0 only, and one clear error without the extra."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toys import digits_recipe, toy_cnn, toy_plugins

from ewgs_plugins import ConfigError, active_round_sites, quantize_model
from ewgs_plugins import tensorboard as tb
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.train import Trainer


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_a_run_logs_losses_accuracies_lrs_deltas_quantizers_and_error_histograms(tmp_path):
    raw = digits_recipe(tmp_path / "run", callbacks={"tensorboard": {"histogram_sites": 2}})
    (run,) = expand_runs(raw, source="test")
    trainer = Trainer(run.recipe, progress=False)
    trainer.run()
    events = read_events(tmp_path / "run" / "tensorboard")
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])

    epoch_tags = {
        "train/loss",
        "train/top1",
        "test/loss",
        "test/top1",
        "lr/weights",
        "lr/quantizer",
    }
    assert epoch_tags <= scalars
    for tag in epoch_tags:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [row["step"] for row in trainer.history]
        key = tag.replace("/", "_")
        assert [e.value for e in logged] == pytest.approx([row[key] for row in trainer.history])
    assert len(events.Scalars("train/step_loss")) == trainer.step

    active = active_round_sites(trainer.model)
    assert {f"delta/{name}" for name in active} <= scalars
    for name, site in active.items():
        assert events.Scalars(f"delta/{name}")[-1].value == pytest.approx(float(site.delta))
    assert any(events.Scalars(f"delta/{name}")[-1].value > 0 for name in active)
    layer = next(iter(trainer.quantizers())).removesuffix(".weight_quantizer")
    assert f"quantizer/{layer}.weight/step" in scalars
    assert f"quantizer/{layer}/output_scale" in scalars  # the toy method has |α|

    # the discretization error EWGS scales, |x_n − x_q| ≤ 1/(2·steps), on two sites
    assert histograms == {f"error/{name}" for name in list(active)[:2]}
    for tag in histograms:
        logged = events.Histograms(tag)
        assert len(logged) == run.recipe.epochs
        for event in logged:
            value = event.histogram_value
            assert value.num > 0
            assert -1 / 6 - 1e-6 <= value.min <= value.max <= 1 / 6 + 1e-6  # W2A2: 3 steps


def test_named_histogram_sites_must_exist():
    callback = tb.TensorBoard(histogram_sites=["nope.weight"])
    model = quantize_model(toy_cnn(10), "toy", weight_bits=2, activation_bits=2)
    with pytest.raises(ConfigError, match=r"callbacks\.tensorboard\.histogram_sites: .*nope"):
        callback._histogram_sites(model)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tb.distributed, "is_main", lambda: False)
    callback = tb.TensorBoard()
    model = quantize_model(toy_cnn(10), "toy", weight_bits=2, activation_bits=2)
    trainer = SimpleNamespace(model=model, run_dir=tmp_path, step=0)
    callback.ewgs_train_start(trainer=trainer)
    callback.ewgs_epoch_end(trainer=trainer, epoch=0, metrics={"train_loss": 1.0})
    assert callback.writer is None
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError) as error:
        tb.TensorBoard()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("callbacks.tensorboard: ")
    assert "pip install 'ewgs-plugins[tensorboard]'" in message
