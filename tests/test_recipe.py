"""Recipes: the schema, its error messages (file, key path, what was expected; exit
status 2 from the CLI), overrides and the matrix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import cli
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.recipe import (
    BitsConfig,
    Recipe,
    expand_runs,
    load_recipe,
    load_runs,
    parse_override,
    parse_yaml,
    with_defaults,
)


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def test_a_recipe_loads_with_its_defaults_and_shorthands(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name: toy_cnn}\n"
        "data: digits\n"
        "method: toy\n"
        "backward: ewgs\n"
        "bits: W2A4\n"
        "epochs: 3\n"
        "optimizers:\n"
        "  weights: {name: sgd, lr: 1e-2, nesterov: true}\n"
    )
    recipe = load_recipe(path)
    assert recipe.method.name == "toy" and recipe.method.options == {}
    assert recipe.data.name == "digits" and recipe.data.batch_size == 256
    assert (recipe.bits.weights, recipe.bits.activations) == (2, 4)
    weights, quantizer = recipe.optimizers.weights, recipe.optimizers.quantizer
    # 1e-2 is a float (PyYAML alone reads it as a string); unset keys keep the paper's values
    assert (weights.name, weights.lr, weights.weight_decay, weights.nesterov) == (
        "sgd",
        0.01,
        1e-4,
        True,
    )
    assert (quantizer.name, quantizer.lr, quantizer.weight_decay) == ("adam", 1e-5, 0.0)
    assert recipe.delta.name == "hessian" and recipe.schedule.name == "cosine"
    assert recipe.quantize_first_last is None and recipe.device == "auto"
    assert recipe.output == str(Path("runs") / "r")


def test_the_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", digits_recipe(tmp_path / "out")))
    again = expand_runs(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), source="resolved")
    assert again[0].recipe == recipe


def bad(tmp_path: Path, change, overrides=()) -> tuple[str, int]:
    """Run ``ewgs train`` on the digits recipe changed by ``change(raw)``; return
    (stderr line, exit status)."""
    raw = digits_recipe(tmp_path / "out")
    change(raw)
    path = write_recipe(tmp_path / "bad.yaml", raw)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, overrides)
    return str(caught.value), path


def set_(key_path: str, value):
    def change(raw):
        node = raw
        keys = key_path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def drop(key: str):
    return lambda raw: raw.pop(key)


CASES = {
    "unknown key": (set_("optimizers.weights.lrr", 0.1), "optimizers.weights.lrr: unknown key"),
    "unknown top-level key": (set_("epoch", 3), "epoch: unknown key; known keys: model, data"),
    "wrong type": (set_("epochs", "ten"), "epochs: expected int, got 'ten'"),
    "wrong type in a section": (set_("data.batch_size", 1.5), "data.batch_size: expected int"),
    "bool is not an int": (set_("seed", True), "seed: expected int, got True"),
    "literal": (set_("schedule.unit", "hour"), "schedule.unit: expected one of 'epoch'"),
    "missing key": (drop("epochs"), "epochs: missing; expected int"),
    "bits out of range": (
        set_("bits", {"weights": 9, "activations": 2}),
        "bits.weights: expected an integer 1..8, or 32",
    ),
    "bits shorthand": (
        set_("bits", "W2"),
        "bits: expected {weights: N, activations: N} or 'W<N>A<N>'",
    ),
    "zero bits": (set_("bits", "W2A0"), "bits.activations: expected an integer 1..8"),
    "negative delta": (
        set_("delta", {"name": "fixed", "options": {"value": -0.1}}),
        "delta.options: δ estimator 'fixed': δ must be >= 0",
    ),
    "unknown delta option": (
        set_("delta.options.evry", 2),
        "delta.options.evry: unknown option of δ estimator 'hessian'",
    ),
    "unknown method": (
        set_("method", "lsqq"),
        "method.name: unknown quantizer method 'lsqq'; known:",
    ),
    "unknown method option": (
        set_("method", {"name": "toy", "options": {"x": 1}}),
        "method.options.x: unknown option",
    ),
    "unknown backward": (
        set_("backward", "stee"),
        "backward: unknown backward rule 'stee'; known: ewgs, ste",
    ),
    "unknown model": (set_("model.name", "resnet99"), "model.name: unknown model 'resnet99'"),
    "unknown dataset": (
        set_("data.name", "mnist"),
        "data.name: unknown dataset 'mnist'; known: cifar10, digits, imagefolder, imagenet, npz",
    ),
    "unknown callback": (
        set_("callbacks", {"swa": None}),
        "callbacks.swa: unknown training callback 'swa'",
    ),
    "reserved callback": (set_("callbacks", {"delta": None}), "callbacks.delta: the δ schedule"),
    "callback options": (
        set_("callbacks", {"stop_after": 3}),
        "callbacks.stop_after: expected a mapping of options, null (no options) or false",
    ),
    "callback option type": (
        set_("callbacks", {"stop_after": {"epoch": "x"}}),
        "callbacks.stop_after.epoch: expected int",
    ),
    "missing data root": (
        set_("data", {"name": "cifar10", "root": "/nowhere/cifar"}),
        "data.root: /nowhere/cifar/cifar-10-batches-py/data_batch_1 not found; download https://",
    ),
    "no data root": (
        set_("data", {"name": "imagenet"}),
        "data.root: the imagenet dataset needs data.root",
    ),
    "missing weights file": (
        set_("model.weights", "/nowhere/fp.pth"),
        "model.weights: file not found: /nowhere/fp.pth",
    ),
    "negative learning rate": (
        set_("optimizers.quantizer.lr", -1e-5),
        "optimizers.quantizer.lr: expected a number > 0",
    ),
    "nesterov with adam": (
        set_("optimizers.weights.nesterov", True),
        "optimizers.weights.nesterov: nesterov needs name: sgd",
    ),
    "device": (set_("device", "gpu"), "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    "absent device": (set_("device", "cuda:99"), "device: 'cuda:99' asked for, but"),
    "warm-up": (
        set_("schedule.warmup_epochs", 5),
        "schedule.warmup_epochs: expected fewer warm-up epochs than epochs (2)",
    ),
    "section not a mapping": (
        set_("optimizers", [1]),
        "optimizers: expected a mapping with keys weights, quantizer, got [1]",
    ),
    "matrix not a list": (
        set_("matrix", {"seed": 1}),
        "matrix.seed: expected a non-empty list of values, got 1",
    ),
    "matrix value": (
        set_("matrix", {"bits": ["W2A2", "W2A9"]}),
        "matrix.bits[1].activations: expected an integer 1..8",
    ),
    "matrix key": (set_("matrix", {"seeds": [1, 2]}), "matrix.seeds[0]: unknown key; known keys:"),
    "matrix plugin": (
        set_("matrix", {"method": ["toy", "nosuch"]}),
        "matrix.method[1].name: unknown quantizer method 'nosuch'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_bad_input_is_one_error_naming_the_file_and_key_path(tmp_path, capsys, case):
    change, expected = CASES[case]
    message, path = bad(tmp_path, change)
    assert message.startswith(f"{path}: ")
    assert expected in message
    # the CLI: one line on stderr, exit status 2, no traceback
    capsys.readouterr()
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ewgs: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_yaml_mistakes_name_the_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 3\nepochs: 4\n")
    assert cli.main(["train", str(path)]) == 2
    assert "r.yaml: epochs: written twice in one mapping (line 2)" in capsys.readouterr().err
    path.write_text("model: [unclosed\n")
    assert cli.main(["train", str(path)]) == 2
    assert "r.yaml: not valid YAML" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: recipe file not found" in capsys.readouterr().err


def test_overrides_set_dotted_paths_with_yaml_values(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", digits_recipe(tmp_path / "out"))
    recipe = load_recipe(
        path,
        [
            "bits=W4A4",
            "optimizers.weights.lr=3e-4",
            "delta.options.every=2",
            "data.options={test_fraction: 0.25}",
            "quantize_first_last=true",
            "method.options.callbacks=[count_steps]",
            "callbacks.stop_after={epoch: 1}",
            "seed=7",
        ],
    )
    assert recipe.bits == BitsConfig(weights=4, activations=4)
    assert recipe.optimizers.weights.lr == 3e-4
    assert recipe.delta.options == {"every": 2, "batches": 1, "samples": 3}
    assert recipe.data.options == {"test_fraction": 0.25}
    assert recipe.quantize_first_last is True and recipe.seed == 7
    assert recipe.callbacks == {"stop_after": {"epoch": 1}}
    assert recipe.callback_options(recipe.make_method()) == {
        "count_steps": {},
        "stop_after": {"epoch": 1},
    }
    # false turns a method's default callback off (and is harmless for another method)
    off = load_recipe(
        path, ["method.options.callbacks=[count_steps]", "callbacks.count_steps=false"]
    )
    assert off.callback_options(off.make_method()) == {}
    assert load_recipe(path, ["callbacks={other: false}"]).callbacks == {"other": False}
    # a shorthand section is expanded before a key below it is set
    assert load_recipe(path, ["method.options.callbacks=[]"]).method.name == "toy"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=null") == ("x", None)


def test_override_errors_name_the_override(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", digits_recipe(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"override 'bits\.weights=9': bits\.weights: expected"):
        load_recipe(path, ["bits.weights=9"])
    with pytest.raises(ConfigError, match=r"override 'optimizers\.weights\.lrr=1'.*unknown key"):
        load_recipe(path, ["optimizers.weights.lrr=1"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value on the command line"):
        load_recipe(path, ["epochs"])
    with pytest.raises(ConfigError, match=r"epochs: is 2, not a mapping, so epochs\.x cannot"):
        load_recipe(path, ["epochs.x=1"])
    raw = digits_recipe(tmp_path / "out", matrix={"seed": [0, 1]})
    with pytest.raises(ConfigError, match=r"seed: is set by matrix\.seed; override matrix\.seed"):
        load_runs(write_recipe(tmp_path / "m.yaml", raw), ["seed=3"])


def test_the_matrix_expands_into_named_runs_in_order(tmp_path):
    raw = digits_recipe(
        tmp_path / "out",
        matrix={
            "method": ["toy", "toy_plain"],
            "backward": ["ste", "ewgs"],
            "bits": ["W2A2", {"weights": 4, "activations": 4}],
            "seed": [0, 1],
            "delta.options.every": [1],
        },
    )
    runs = load_runs(write_recipe(tmp_path / "m.yaml", raw))
    assert len(runs) == 16
    assert runs[0].name == "toy-ste-W2A2-seed0-every=1"
    assert runs[-1].name == "toy_plain-ewgs-W4A4-seed1-every=1"
    combos = {
        (r.recipe.method.name, r.recipe.backward, r.recipe.bits.label, r.recipe.seed) for r in runs
    }
    assert len(combos) == 16
    for run in runs:
        assert run.recipe.output == str(tmp_path / "out" / run.name)
        assert run.recipe.delta.options["every"] == 1
        assert isinstance(run.recipe, Recipe)
    # overriding the matrix itself
    runs = load_runs(tmp_path / "m.yaml", ["matrix.method=[toy]", "matrix.seed=[5]"])
    assert [r.name for r in runs] == [
        "toy-ste-W2A2-seed5-every=1",
        "toy-ste-W4A4-seed5-every=1",
        "toy-ewgs-W2A2-seed5-every=1",
        "toy-ewgs-W4A4-seed5-every=1",
    ]
    # one run: train takes it; a recipe without a matrix is one run without a name
    one = load_runs(tmp_path / "m.yaml", ["matrix=null"])
    assert len(one) == 1 and one[0].name == "" and one[0].recipe.output == str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"matrix: expands into 16 runs; .*ewgs compare"):
        load_recipe(tmp_path / "m.yaml")


def test_two_runs_may_not_share_a_directory(tmp_path):
    raw = digits_recipe(tmp_path / "out", matrix={"bits": ["W2A2", "w2a2"]})
    with pytest.raises(ConfigError, match="two runs would share the directory name 'W2A2'"):
        load_runs(write_recipe(tmp_path / "m.yaml", raw))


def test_bits_must_suit_the_method(tmp_path):
    from toys import ToyMethod

    class OnlyFourBits(ToyMethod):
        def weight_quantizer(self, bits):
            if bits != 4:
                raise ValueError("only 4-bit weights")
            return super().weight_quantizer(bits)

    plugin = type("P", (), {"ewgs_methods": staticmethod(lambda: {"four": OnlyFourBits})})
    from ewgs_plugins import hookimpl, register_plugin, unregister_plugin

    hookimpl(plugin.ewgs_methods)
    register_plugin(plugin, "four")
    try:
        raw = digits_recipe(tmp_path / "out", method="four")
        with pytest.raises(ConfigError, match=r"bits\.weights: method 'four': only 4-bit"):
            load_recipe(write_recipe(tmp_path / "r.yaml", raw))
        assert load_recipe(tmp_path / "r.yaml", ["bits=W4A2"]).bits.weights == 4
    finally:
        unregister_plugin("four")


def test_yaml_reads_exponent_floats_and_keeps_strings():
    data = parse_yaml("a: 1e-3\nb: 1.5E+2\nc: 5\nd: e5\ne: '1e-3'\n", "x")
    assert data == {"a": 1e-3, "b": 150.0, "c": 5, "d": "e5", "e": "1e-3"}
    assert copy.deepcopy(data) == data


# ---------------------------------------------------------------- keys added later

#: keys a later release added, each at the default that keeps the older behaviour
ADDED_LATER = {
    ("data", "train"): "train",
    ("data", "val"): "test",
    ("require_all_quantized",): False,
    ("method", "options"): {},
    ("optimizers", "weights", "options"): {},
    ("schedule", "options"): {},
    ("delta", "batch_size"): None,
}


@given(st.sets(st.sampled_from(sorted(ADDED_LATER))))
@settings(max_examples=40, deadline=None)
def test_a_recipe_resolved_before_keys_existed_reads_as_if_they_were_at_their_defaults(gone):
    resolved = expand_runs(digits_recipe(Path("out")), source="test")[0].recipe.to_dict()
    older = copy.deepcopy(resolved)
    for path in gone:
        *sections, key = path
        section = older
        for name in sections:
            section = section[name]
        assert section[key] == ADDED_LATER[path]
        del section[key]
    assert with_defaults(older) == resolved


def test_filling_defaults_keeps_every_value_a_recipe_has():
    raw = digits_recipe(Path("out"), require_all_quantized=True, plugin_key_free={"x": 1})
    raw["data"].update(train="train[0:100]", options={"test_fraction": 0.5, "mine": 2})
    filled = with_defaults(raw)
    assert filled["require_all_quantized"] is True and filled["plugin_key_free"] == {"x": 1}
    assert filled["data"]["train"] == "train[0:100]" and filled["data"]["val"] == "test"
    assert filled["data"]["options"] == {"test_fraction": 0.5, "mine": 2}  # a plugin's: as is
    assert filled["delta"]["options"] == raw["delta"]["options"]
    assert filled["method"] == "toy"  # a shorthand is not a mapping: left as it is
