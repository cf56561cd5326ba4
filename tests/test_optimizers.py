"""Optimizers and learning-rate schedules by name: torch's, with their options checked
against the recipe's key paths, a linear warm-up before any schedule, plugins through
``ewgs_optimizers``/``ewgs_lr_schedules``, and exact restore of a schedule's state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from toys import digits_recipe, toy_plugins

from ewgs_plugins import ConfigError, hookimpl, register_plugin, unregister_plugin
from ewgs_plugins.recipe import ScheduleConfig, expand_runs, validate
from ewgs_plugins.recipe.schema import parse_section
from ewgs_plugins.train import LRSchedule, Trainer, make_optimizers, parameter_groups


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def recipe(tmp_path, **changes):
    return expand_runs(digits_recipe(tmp_path / "run", **changes), source="test")[0].recipe


def schedule(total: int, warmup: int = 0, **section) -> LRSchedule:
    config = parse_section(ScheduleConfig, {"warmup_epochs": warmup, **section}, "schedule")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    return LRSchedule(optimizer, config, total, warmup)


def test_any_torch_optimizer_by_name_with_its_options(tmp_path):
    weights = {"name": "AdamW", "lr": 2e-3, "weight_decay": 0.05, "options": {"betas": [0.8, 0.9]}}
    quantizer = {"name": "sgd", "lr": 1e-4, "nesterov": True, "momentum": 0.5}
    run = recipe(tmp_path, optimizers={"weights": weights, "quantizer": quantizer})
    validate(run)
    trainer = Trainer(run, progress=False)
    adamw, sgd = trainer.optimizers["weights"], trainer.optimizers["quantizer"]
    assert type(adamw) is torch.optim.AdamW and type(sgd) is torch.optim.SGD
    assert tuple(adamw.param_groups[0]["betas"]) == (0.8, 0.9)
    assert adamw.param_groups[0]["weight_decay"] == 0.05
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.5
    rms = recipe(tmp_path, optimizers={"weights": {"name": "rmsprop", "options": {"alpha": 0.9}}})
    validate(rms)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"name": "adamz"},
            r"optimizers\.weights\.name: unknown optimizer 'adamz'; known: .*adamw",
        ),
        (
            {"name": "adamw", "options": {"betas": "high"}},
            r"optimizers\.weights\.options\.betas: expected a list of",
        ),
        (
            {"name": "adamw", "options": {"beta": [0.9, 0.9]}},
            r"optimizers\.weights\.options\.beta: unknown option of optimizer 'adamw'; "
            r"known options: .*betas",
        ),
        (
            {"name": "adamw", "options": {"lr": 0.1}},
            r"optimizers\.weights\.options\.lr: set it as optimizers\.weights\.lr",
        ),
        ({"name": "rmsprop", "momentum": 0.5}, r"optimizers\.weights\.momentum: applies to sgd"),
        ({"name": "rprop", "weight_decay": 0.1}, r"optimizers\.weights\.weight_decay: optimizer"),
        ({"name": "adamw", "options": {"betas": [2.0, 0.9]}}, r"optimizers\.weights: optimizer"),
    ],
)
def test_a_bad_optimizer_is_one_error_naming_its_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        validate(recipe(tmp_path, optimizers={"weights": section}))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "steps"}, r"schedule\.name: unknown learning-rate schedule 'steps'; known: .*"),
        ({"name": "step", "options": {"step": 1}}, r"schedule\.options\.step: unknown option"),
        ({"name": "step", "options": {"gamma": "x"}}, r"schedule\.options\.gamma: expected float"),
        ({"name": "cosine", "options": {"gamma": 0.1}}, r"schedule\.options\.gamma: schedule"),
        ({"name": "step", "final_lr_factor": 0.1}, r"schedule\.final_lr_factor: applies to"),
    ],
)
def test_a_bad_schedule_is_one_error_naming_its_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        validate(recipe(tmp_path, schedule=section))


def test_torch_schedules_give_torchs_values():
    ours = schedule(6, name="multistep", options={"milestones": [2, 4], "gamma": 0.5})
    values = [ours.factor(t) for t in range(7)]
    assert values == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert ours.optimizer.param_groups[0]["lr"] == 0.5
    ours.step(), ours.step()
    assert ours.optimizer.param_groups[0]["lr"] == 0.25
    # one-cycle's total_steps is the schedule's length: its last count ends the cycle
    cycle = schedule(10, warmup=0, name="onecycle", options={"max_lr": 1.0})
    assert cycle.factor(0) == pytest.approx(1.0 / 25)
    assert cycle.factor(9) == pytest.approx(1.0 / 25 / 1e4)
    assert max(cycle.factor(t) for t in range(11)) == pytest.approx(1.0)


@given(
    warmup=st.integers(1, 5),
    length=st.integers(1, 8),
    start=st.floats(0.0, 1.0),
    gamma=st.floats(0.1, 1.0),
    name=st.sampled_from(["exponential", "cosine", "constant"]),
)
def test_warmup_rises_linearly_to_the_schedules_first_value_then_runs_it(
    warmup, length, start, gamma, name
):
    options = {"options": {"gamma": gamma}} if name == "exponential" else {}
    warmed = schedule(warmup + length, warmup, name=name, warmup_start_factor=start, **options)
    plain = schedule(length, 0, name=name, **options)
    first = plain.factor(0)
    ramp = [warmed.factor(t) for t in range(warmup)]
    assert ramp[0] == pytest.approx(start * first)
    steps = [b - a for a, b in zip(ramp, ramp[1:])]
    assert all(s == pytest.approx((1 - start) * first / warmup) for s in steps)
    for t in range(length + 1):
        assert warmed.factor(warmup + t) == pytest.approx(plain.factor(t), rel=1e-12)
    if name == "exponential":
        assert all(math.isclose(plain.factor(t), gamma**t, rel_tol=1e-9) for t in range(length))


@given(done=st.integers(0, 12), later=st.integers(0, 6))
def test_a_schedules_state_restores_exactly(done, later):
    options = {"name": "cosine_restarts", "options": {"T_0": 3, "T_mult": 2}}
    straight = schedule(20, 2, **options)
    for _ in range(done):
        straight.step()
    restored = schedule(20, 2, **options)
    restored.load_state_dict(straight.state_dict())
    for _ in range(later):
        straight.step(), restored.step()
    assert restored.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


class HalvingPlugin:
    """A plugin's optimizer (SGD without momentum, under a new name) and schedule."""

    @staticmethod
    @hookimpl
    def ewgs_optimizers():
        def plain_sgd(params, lr: float, weight_decay: float = 0.0, dampening: float = 0.0):
            return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, dampening=dampening)

        return {"plain_sgd": plain_sgd}

    @staticmethod
    @hookimpl
    def ewgs_lr_schedules():
        def halving(optimizer, every: int = 1):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.5)

        return {"halving": halving}


def test_plugins_add_optimizers_and_schedules(tmp_path):
    register_plugin(HalvingPlugin, "halving")
    try:
        run = recipe(
            tmp_path,
            optimizers={"weights": {"name": "plain_sgd", "options": {"dampening": 0.1}}},
            schedule={"name": "halving", "options": {"every": 1}},
        )
        validate(run)
        trainer = Trainer(run, progress=False)
        trainer.run()
        assert [row["lr_weights"] for row in trainer.history] == [1e-3, 5e-4]
        assert trainer.optimizers["weights"].param_groups[0]["dampening"] == 0.1
        with pytest.raises(ConfigError, match=r"schedule\.options\.every: expected int"):
            validate(recipe(tmp_path, schedule={"name": "halving", "options": {"every": "x"}}))
    finally:
        unregister_plugin("halving")


def test_a_run_with_a_torch_schedule_resumes_to_the_same_run(tmp_path):
    changes = {
        "epochs": 3,
        "optimizers": {"weights": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01}},
        "schedule": {
            "name": "step",
            "unit": "step",
            "warmup_epochs": 1,
            "options": {"step_size": 3},
        },
    }
    straight = Trainer(recipe(tmp_path / "a", **changes), progress=False)
    straight.run()
    first = Trainer(recipe(tmp_path / "b", **changes), progress=False)
    first.request_stop()
    first.run()
    resumed = Trainer(recipe(tmp_path / "b", **changes), resume=True, progress=False)
    resumed.run()
    assert [r["test_loss"] for r in resumed.history] == [r["test_loss"] for r in straight.history]
    assert [r["lr_weights"] for r in resumed.history] == [r["lr_weights"] for r in straight.history]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_the_two_groups_and_optimizers_from_plain_keywords(tmp_path):
    model = Trainer(recipe(tmp_path), progress=False).model
    groups = parameter_groups(model)
    assert {id(p) for p in groups["weights"]}.isdisjoint(id(p) for p in groups["quantizer"])
    assert len(groups["weights"]) + len(groups["quantizer"]) == len(list(model.parameters()))
    optimizers, schedulers = make_optimizers(
        model,
        epochs=4,
        weights={"name": "sgd", "lr": 0.1},
        schedule={"name": "step", "options": {"step_size": 2, "gamma": 0.1}},
    )
    assert type(optimizers["weights"]) is torch.optim.SGD
    assert type(optimizers["quantizer"]) is torch.optim.Adam  # the paper's default
    assert optimizers["quantizer"].param_groups[0]["lr"] == 1e-5
    for _ in range(2):
        schedulers["weights"].step()
    assert optimizers["weights"].param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match=r"optimizers\.weights\.name: unknown optimizer"):
        make_optimizers(model, epochs=1, weights={"name": "nope"})
