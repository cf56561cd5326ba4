"""The build step: ``build_run`` makes the parts the Trainer runs on; a Trainer given
parts built beforehand trains to the same weights and metrics as one that builds them."""

from __future__ import annotations

import pytest
import torch
from toys import digits_recipe, toy_plugins

from ewgs_plugins import ConfigError, PluginError, RunParts, build_run
from ewgs_plugins.callbacks import DeltaSchedule
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.train import Trainer, check_same_recipe


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def recipe(output, **changes):
    return expand_runs(digits_recipe(output, **changes), source="test")[0].recipe


def test_parts_built_beforehand_train_as_the_trainers_own(tmp_path):
    parts = build_run(recipe(tmp_path / "a"))
    assert isinstance(parts, RunParts) and isinstance(parts.delta, DeltaSchedule)
    assert list(parts.callbacks)[0] == "delta" and set(parts.optimizers) == set(parts.schedulers)
    flags = [m.quant_initialized for m in parts.model.modules() if hasattr(m, "quant_initialized")]
    assert flags and all(bool(flag) for flag in flags)
    assert parts.steps_per_epoch == len(parts.train_loader(0))
    given = Trainer(parts.recipe, parts=parts, progress=False)
    given.run()
    own = Trainer(recipe(tmp_path / "b"), progress=False)
    own.run()
    assert [r["test_loss"] for r in given.history] == [r["test_loss"] for r in own.history]
    for name, tensor in own.model.state_dict().items():
        assert torch.equal(tensor, given.model.state_dict()[name]), name


def test_parts_and_extra_callbacks_are_checked(tmp_path):
    run = recipe(tmp_path / "a")
    with pytest.raises(PluginError, match="two callbacks of this run are named 'delta'"):
        build_run(run, callbacks={"delta": object()})
    with pytest.raises(TypeError, match="built from this recipe"):
        Trainer(recipe(tmp_path / "b"), parts=build_run(run))


def test_a_run_saved_before_the_options_keys_existed_still_resumes(tmp_path):
    run = recipe(tmp_path / "a")
    saved = run.to_dict()
    del saved["optimizers"]["weights"]["options"], saved["schedule"]["options"]
    check_same_recipe(run, saved, tmp_path)
    saved["schedule"]["options"] = {"gamma": 0.5}
    with pytest.raises(ConfigError, match=r"schedule\.options"):
        check_same_recipe(run, saved, tmp_path)
