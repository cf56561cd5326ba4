"""The Trainer: parameter groups, schedule, δ schedule, callbacks, checkpoints, resume,
and stopping on a non-finite loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from toys import RUN_FILES, digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import Quantizer, TrainingError, cli, quantized_layers
from ewgs_plugins.recipe import Recipe, expand_runs
from ewgs_plugins.train import Trainer


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def recipe(output: Path, overrides=(), **changes) -> Recipe:
    runs = expand_runs(digits_recipe(output, **changes), source="test", overrides=overrides)
    assert len(runs) == 1
    return runs[0].recipe


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in metrics]


def test_resume_continues_to_the_same_weights_and_metrics(tmp_path):
    # Hessian δ every epoch, a stateful callback, and a strategy that freezes a layer
    # and lowers the activation bits at epoch 1: all of it must survive the resume.
    callbacks = {"count_steps": None, "freeze_first_conv": {"epoch": 1, "bits": 3}}
    straight = Trainer(recipe(tmp_path / "straight", epochs=3, callbacks=callbacks))
    straight.run()

    interrupted = dict(callbacks, stop_after={"epoch": 1})
    first = Trainer(recipe(tmp_path / "resumed", epochs=3, callbacks=interrupted))
    first.run()
    assert len(first.history) == 2 and not first.finished
    resumed = Trainer(recipe(tmp_path / "resumed", epochs=3, callbacks=interrupted), resume=True)
    assert resumed.start_epoch == 2 and resumed.step == first.step
    resumed.run()

    assert resumed.finished
    assert without_time(resumed.history) == without_time(straight.history)
    assert resumed.history[-1]["counted_steps"] == straight.step
    assert [row.get("frozen_layers") for row in resumed.history] == [None, 1, None]
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    for kind in straight.optimizers:
        a, b = straight.optimizers[kind].state_dict(), resumed.optimizers[kind].state_dict()
        assert a["param_groups"] == b["param_groups"]
        for index, state in a["state"].items():
            assert all(torch.equal(state[k], b["state"][index][k]) for k in state)
    assert [q.bits for q in resumed.quantizers().values()] == [
        q.bits for q in straight.quantizers().values()
    ]
    for name in ("metrics.jsonl", "deltas.jsonl"):
        a, b = rows(tmp_path / "straight" / name), rows(tmp_path / "resumed" / name)
        assert without_time(a) == without_time(b)
    assert len(rows(tmp_path / "straight" / "deltas.jsonl")) == 3  # δ=0, after epochs 1, 2


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    raw = digits_recipe(tmp_path / "run", epochs=3, callbacks={"nan_loss": {"epoch": 1}})
    path = write_recipe(tmp_path / "nan.yaml", raw)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the training loss is nan at epoch 2 (step 8); training stopped" in err
    assert "the last good checkpoint" in err and "Traceback" not in err
    run = tmp_path / "run"
    assert [row["epoch"] for row in rows(run / "metrics.jsonl")] == [0]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2
    checkpoint = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step"] == 8 and not checkpoint["finished"]
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )
    # the Python API raises the same TrainingError
    with pytest.raises(TrainingError, match="no epoch had finished, so there is no checkpoint"):
        Trainer(recipe(tmp_path / "other", callbacks={"nan_loss": {"epoch": 0}})).run()


def test_the_hessian_delta_schedule_writes_the_delta_history(tmp_path):
    trainer = Trainer(recipe(tmp_path / "epoch", epochs=3))
    assert trainer.steps_per_epoch == 8  # 899 training images, batches of 128
    trainer.run()
    history = rows(tmp_path / "epoch" / "deltas.jsonl")
    sites = {"3.weight", "3.input", "6.weight", "6.input"}  # first and last layers stay FP
    assert [(row["epoch"], row["step"]) for row in history] == [(0, 0), (1, 8), (2, 16)]
    assert all(set(row["deltas"]) == sites for row in history)
    assert all(v == 0.0 for v in history[0]["deltas"].values())  # STE until the first estimate
    assert all(v > 0 for v in history[1]["deltas"].values())
    assert history[1]["deltas"] != history[2]["deltas"]
    from ewgs_plugins import deltas

    assert {k: v for k, v in deltas(trainer.model).items() if k in sites} == history[-1]["deltas"]

    # per step, and once before training (from δ = 0.5, so that the estimate changes δ
    # even where the curvature is negative and δ becomes 0)
    options = {"every": 5, "unit": "step", "batches": 1, "samples": 2}
    options.update(before_training=True, initial_value=0.5)
    Trainer(recipe(tmp_path / "step", delta={"name": "hessian", "options": options})).run()
    steps = [row["step"] for row in rows(tmp_path / "step" / "deltas.jsonl")]
    assert steps == [0, 0, 5, 10, 15]

    # STE: δ has no effect, nothing is estimated; a fixed δ is logged once
    Trainer(recipe(tmp_path / "ste", backward="ste")).run()
    assert len(rows(tmp_path / "ste" / "deltas.jsonl")) == 1
    fixed = {"name": "fixed", "options": {"value": 0.01}}
    Trainer(recipe(tmp_path / "fixed", delta=fixed)).run()
    (row,) = rows(tmp_path / "fixed" / "deltas.jsonl")
    assert list(row["deltas"].values()) == pytest.approx([0.01] * 4)


def test_ste_and_ewgs_runs_of_one_seed_see_the_same_data(tmp_path):
    ste = Trainer(recipe(tmp_path / "ste", backward="ste"))
    ewgs = Trainer(recipe(tmp_path / "ewgs"))
    ste.run()
    ewgs.run()
    # δ = 0 during epoch 0 (EWGS is then STE bit for bit); the δ estimate before epoch 1
    # draws its own batches, so the training stream is the same
    assert without_time(ste.history[:1]) == without_time(ewgs.history[:1])
    assert ste.history[1] != ewgs.history[1]


def test_two_optimizers_hold_every_parameter_exactly_once(tmp_path):
    trainer = Trainer(recipe(tmp_path / "run", epochs=1))
    quantizer = {id(p) for g in trainer.optimizers["quantizer"].param_groups for p in g["params"]}
    weights = {id(p) for g in trainer.optimizers["weights"].param_groups for p in g["params"]}
    expected = set()
    for layer in quantized_layers(trainer.model).values():
        expected.add(id(layer.output_scale))
        for module in layer.modules():
            if isinstance(module, Quantizer):
                expected |= {id(p) for p in module.parameters()}
    assert quantizer == expected and len(expected) == 2 * 3  # 2 quantizers + α, 2 layers
    assert weights == {id(p) for p in trainer.model.parameters()} - quantizer
    q_group = trainer.optimizers["quantizer"].param_groups[0]
    assert (q_group["lr"], q_group["weight_decay"]) == (1e-5, 0.0)
    w_group = trainer.optimizers["weights"].param_groups[0]
    assert (w_group["lr"], w_group["weight_decay"]) == (0.01, 1e-4)
    assert isinstance(trainer.optimizers["weights"], torch.optim.Adam)

    # a method without quantizer parameters (as DoReFa) has one optimizer; SGD options
    sgd = {"weights": {"name": "sgd", "lr": 0.1, "momentum": 0.8, "nesterov": True}}
    plain = Trainer(recipe(tmp_path / "plain", method="toy_plain", optimizers=sgd))
    assert list(plain.optimizers) == ["weights"]
    group = plain.optimizers["weights"].param_groups[0]
    assert isinstance(plain.optimizers["weights"], torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 1e-4)
    plain.check_param_groups()
    plain.optimizers["weights"].param_groups[0]["params"].pop()
    with pytest.raises(TrainingError, match="exactly one optimizer param group; wrong for: 11"):
        plain.check_param_groups()


def test_the_cosine_schedule_and_lr_scale(tmp_path):
    schedule = {"warmup_epochs": 1, "warmup_start_factor": 0.5}
    trainer = Trainer(recipe(tmp_path / "run", epochs=4, schedule=schedule))
    trainer.run()
    lrs = [row["lr_weights"] for row in trainer.history]
    cosine = [0.01 * 0.5 * (1 + math.cos(math.pi * t / 3)) for t in (0, 1, 2)]
    assert lrs == pytest.approx([0.005, *cosine])
    assert trainer.optimizers["weights"].param_groups[0]["lr"] == 0.0  # annealed to 0
    assert [row["lr_quantizer"] / row["lr_weights"] for row in trainer.history] == pytest.approx(
        [1e-3] * 4
    )
    per_step = Trainer(recipe(tmp_path / "step", epochs=2, schedule={"unit": "step"}))
    per_step.run()
    assert per_step.history[1]["lr_weights"] == pytest.approx(
        0.01 * 0.5 * (1 + math.cos(math.pi * 8 / 16))
    )


def test_set_lr_scale_and_set_bits_for_strategy_callbacks(tmp_path):
    trainer = Trainer(recipe(tmp_path / "run", epochs=1))
    layers = list(quantized_layers(trainer.model).values())
    frozen = layers[0].weight
    before = frozen.detach().clone()
    trainer.set_lr_scale([frozen], 0.0, weight_decay=0.0)
    groups = trainer.optimizers["weights"].param_groups
    assert len(groups) == 2 and groups[1]["params"] == [frozen]
    assert (groups[1]["lr"], groups[1]["weight_decay"], groups[0]["lr"]) == (0.0, 0.0, 0.01)
    trainer.set_bits(weights=4, layers=["3"])
    assert layers[0].weight_quantizer.bits == 4 and layers[1].weight_quantizer.bits == 2
    trainer.run()
    assert torch.equal(frozen, before)
    assert not torch.equal(layers[1].weight, before)
    with pytest.raises(KeyError, match="no quantized layer named"):
        trainer.set_bits(weights=4, layers=["0"])


def test_the_run_directory_and_its_guards(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", digits_recipe(tmp_path / "run"))
    assert cli.main(["train", str(path)]) == 0
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert names == RUN_FILES
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["optimizers"]["quantizer"]["lr"] == 1e-5 and resolved["epochs"] == 2
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "step", "train_loss", "train_top1", "test_loss", "test_top1"]
    out = capsys.readouterr().out
    assert "[run] epoch 2/2  train loss" in out
    # an existing run is not overwritten; resuming a finished one does nothing
    assert cli.main(["train", str(path)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert cli.main(["train", str(path), "--resume"]) == 0
    assert "finished already; nothing to resume" in capsys.readouterr().out
    # a resumed run keeps its recipe
    assert cli.main(["train", str(path), "--resume", "optimizers.weights.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimizers.weights.lr: differs from the recipe" in err and "was 0.01, now 0.1" in err
    # --resume before the first checkpoint (a kill in the first epoch) trains from the start
    assert cli.main(["train", str(path), "--resume", "output=" + str(tmp_path / "x")]) == 0
    assert "no checkpoint yet; training from the start" in capsys.readouterr().out
    assert len(rows(tmp_path / "x" / "metrics.jsonl")) == 2


def test_a_step_schedule_does_not_estimate_after_the_last_step(tmp_path):
    options = {"every": 8, "unit": "step", "batches": 1, "samples": 1}
    trainer = Trainer(
        recipe(tmp_path / "run", epochs=2, delta={"name": "hessian", "options": options})
    )
    assert trainer.steps_per_epoch * 2 == 16  # due at 8 and 16; 16 is the last step
    trainer.run()
    assert [row["step"] for row in rows(tmp_path / "run" / "deltas.jsonl")] == [0, 8]
