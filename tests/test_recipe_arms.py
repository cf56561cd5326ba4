"""``matrix.arms``: named arms that set several keys together, one axis of the matrix."""

from __future__ import annotations

import pytest
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins.errors import ConfigError
from ewgs_plugins.recipe import load_runs

ARMS = {
    "ste": {"backward": "ste"},
    "ewgs-paper": {"backward": "ewgs"},
    "ewgs-first-step": {"backward": "ewgs", "delta.options.before_training": True},
    "ewgs-fixed": {"backward": "ewgs", "delta": {"name": "fixed", "options": {"value": 1e-3}}},
}


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def study(tmp_path, arms=ARMS, **matrix):
    raw = digits_recipe(tmp_path / "out", matrix={"arms": arms, **matrix})
    return write_recipe(tmp_path / "study.yaml", raw)


def test_arms_set_their_keys_together_and_name_their_runs(tmp_path):
    runs = load_runs(study(tmp_path, seed=[0, 1]))
    assert [run.name for run in runs] == [f"{arm}-seed{seed}" for arm in ARMS for seed in (0, 1)]
    by_arm = {run.name.rsplit("-", 1)[0]: run.recipe for run in runs if run.recipe.seed == 1}
    assert by_arm["ste"].backward == "ste"
    assert by_arm["ste"].delta.name == "hessian"  # the recipe's own δ, untouched
    assert by_arm["ewgs-paper"].delta.options == {"every": 1, "batches": 1, "samples": 3}
    assert by_arm["ewgs-first-step"].delta.options["before_training"] is True
    assert by_arm["ewgs-first-step"].delta.options["every"] == 1  # the rest kept
    assert (by_arm["ewgs-fixed"].delta.name, by_arm["ewgs-fixed"].delta.options) == (
        "fixed",
        {"value": 1e-3},
    )
    assert all(run.recipe.output == str(tmp_path / "out" / run.name) for run in runs)
    # an arm's key is overridden through the arm
    runs = load_runs(study(tmp_path), ["matrix.arms.ste.backward=ewgs"])
    assert runs[0].recipe.backward == "ewgs"


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ([{"backward": "ste"}], r"matrix\.arms: expected a mapping of named arms"),
        ({}, r"matrix\.arms: expected a mapping of named arms"),
        ({"ste": "ste"}, r"matrix\.arms\.ste: expected a mapping key\.path -> value"),
        ({"a b": {"backward": "ste"}}, r"matrix\.arms\.a b: an arm's name is its runs'"),
        ({"ste": {"back ward": "ste"}}, r"matrix\.arms\.ste\.back ward: expected a dotted"),
        ({"bad": {"backward": "nope"}}, r"matrix\.arms\.bad\.backward: .*nope"),
        ({"bad": {"delta.options.evry": 2}}, r"matrix\.arms\.bad\.delta\.options\.evry"),
    ],
)
def test_arm_errors_name_the_arm_and_key(tmp_path, arms, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_runs(study(tmp_path, arms=arms))
    assert caught.value.source == str(tmp_path / "study.yaml")


def test_an_override_reaches_the_arms_that_do_not_set_its_key(tmp_path):
    runs = {run.name: run.recipe for run in load_runs(study(tmp_path), ["delta.options.every=3"])}
    assert runs["ewgs-paper"].delta.options["every"] == 3
    assert runs["ewgs-first-step"].delta.options == {
        "every": 3,
        "batches": 1,
        "samples": 3,
        "before_training": True,
    }
    assert runs["ewgs-fixed"].delta.options == {"value": 1e-3}  # the arm replaces delta
    runs = {
        r.name: r.recipe
        for r in load_runs(study(tmp_path), ["delta.options.before_training=false"])
    }
    assert runs["ewgs-paper"].delta.options["before_training"] is False
    assert runs["ewgs-first-step"].delta.options["before_training"] is True
    # every arm sets backward: the override would reach no run
    with pytest.raises(
        ConfigError,
        match=r"backward: is set by every arm of matrix\.arms; override "
        r"matrix\.arms\.ste\.backward=\.\.\. \(each arm's own\) instead",
    ) as caught:
        load_runs(study(tmp_path), ["backward=ste"])
    assert caught.value.source == "command line override 'backward=ste'"
