"""Per-layer overrides (recipe ``overrides:``, ``quantize_model(overrides=...)``): glob and
regex patterns on module names, applied in order, the resulting per-layer method, bits,
backward rule and δ, and errors that name the override's index and key."""

from __future__ import annotations

import json

import pytest
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import (
    ConfigError,
    ElementWiseGradientScaling,
    LayerOverride,
    StraightThrough,
    cli,
    quantize_model,
    quantized_layers,
)
from ewgs_plugins.models import resnet20
from ewgs_plugins.quant import fixed_delta_sites, set_layer_bits
from ewgs_plugins.recipe import expand_runs, load_recipe
from ewgs_plugins.train import Trainer


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def convert(*overrides: LayerOverride, **options):
    """ResNet-20 quantized by LSQ at W2A2 (``options``: more ``quantize_model`` keywords)."""
    return quantize_model(
        resnet20(10), "lsq", weight_bits=2, activation_bits=2, overrides=overrides, **options
    )


def layer_bits(model) -> dict[str, tuple[int, int]]:
    return {
        name: (layer.weight_quantizer.bits, layer.input_quantizer.bits)
        for name, layer in quantized_layers(model).items()
    }


def rules(model) -> dict[str, str]:
    return {
        name: layer.weight_quantizer.round_site.rule.name
        for name, layer in quantized_layers(model).items()
    }


def test_first_and_last_layers_at_eight_bits_the_rest_at_two():
    model = convert(LayerOverride(("conv1", "linear"), weight_bits=8, activation_bits=8))
    bits = layer_bits(model)
    assert bits.pop("conv1") == (8, 32)  # the raw image input stays full precision
    assert bits.pop("linear") == (8, 8)
    assert len(bits) == 18 and set(bits.values()) == {(2, 2)}  # option-A shortcuts: no conv


def test_later_overrides_win_and_keep_what_they_do_not_set():
    model = convert(
        LayerOverride(("layer1.*",), weight_bits=4, activation_bits=4, backward="ste"),
        LayerOverride(("layer1.0.*",), weight_bits=3, activation_bits=3),
        LayerOverride(("layer1.0.conv2",), backward="ewgs"),
        backward="ewgs",
    )
    bits, rule = layer_bits(model), rules(model)
    assert bits["layer1.0.conv1"] == (3, 3) and rule["layer1.0.conv1"] == "ste"
    assert bits["layer1.0.conv2"] == (3, 3) and rule["layer1.0.conv2"] == "ewgs"
    assert bits["layer1.1.conv1"] == (4, 4) and rule["layer1.1.conv1"] == "ste"
    assert bits["layer2.0.conv1"] == (2, 2) and rule["layer2.0.conv1"] == "ewgs"
    assert "conv1" not in bits and "linear" not in bits  # no bits given: first/last stay FP
    layer = quantized_layers(model)["layer1.0.conv1"]
    assert isinstance(layer.input_quantizer.round_site.rule, StraightThrough)
    assert isinstance(
        quantized_layers(model)["layer1.0.conv2"].input_quantizer.round_site.rule,
        ElementWiseGradientScaling,
    )


def test_a_bit_schedule_leaves_the_bits_an_override_gave():
    model = convert(
        LayerOverride(("conv1", "linear"), weight_bits=8, activation_bits=8),
        LayerOverride(("layer3.*",), weight_bits=3),  # its activations keep the default
    )
    set_layer_bits(model, weights=4, activations=5)
    bits = layer_bits(model)
    assert bits.pop("conv1") == (8, 32) and bits.pop("linear") == (8, 8)
    layer3 = {name: bits.pop(name) for name in list(bits) if name.startswith("layer3.")}
    assert set(layer3.values()) == {(3, 5)}  # weights fixed, activations scheduled
    assert set(bits.values()) == {(4, 5)}  # everything else follows the schedule
    layers = quantized_layers(model)
    assert layers["layer3.0.conv1"].weight_quantizer.fixed_bits
    assert not layers["layer3.0.conv1"].input_quantizer.fixed_bits
    assert not layers["layer1.0.conv1"].weight_quantizer.fixed_bits


def test_glob_and_regex_patterns_match_whole_names():
    overrides = [
        LayerOverride(("re:layer[12]\\.0\\.conv1",), weight_bits=5, activation_bits=5),
        LayerOverride(("layer3.?.conv2",), weight_bits=6, activation_bits=6),
        LayerOverride(("re:conv1",), weight_bits=7, activation_bits=7),  # whole name only
    ]
    bits = layer_bits(convert(*overrides))
    assert {n for n, b in bits.items() if b == (5, 5)} == {"layer1.0.conv1", "layer2.0.conv1"}
    assert {n for n, b in bits.items() if b == (6, 6)} == {f"layer3.{i}.conv2" for i in range(3)}
    assert bits["conv1"] == (7, 32)


def test_each_layer_keeps_its_own_method_and_fixed_delta():
    model = convert(
        LayerOverride(("layer3.*",), method="dorefa", delta=0.5), backward="ewgs", delta=0.01
    )
    layers = quantized_layers(model)
    assert layers["layer3.1.conv1"].method_name == "dorefa"
    assert layers["layer2.1.conv1"].method_name == "lsq"
    assert layers["layer3.1.conv1"].fixed_delta == 0.5
    assert layers["layer2.1.conv1"].fixed_delta is None
    assert float(layers["layer3.1.conv1"].weight_quantizer.round_site.delta) == 0.5
    assert float(layers["layer2.1.conv1"].input_quantizer.round_site.delta) == pytest.approx(0.01)
    fixed = fixed_delta_sites(model)
    assert "layer3.1.conv1.weight" in fixed and "layer3.1.conv1.input" in fixed
    assert not any(name.startswith("layer2") for name in fixed)


def test_an_override_matching_no_layer_is_an_error():
    with pytest.raises(ValueError, match=r"override 1 \(layer9\.\*\) matches no"):
        convert(LayerOverride(("conv1",), backward="ste"), LayerOverride(("layer9.*",)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([{"layers": "3"}, {"layers": "nope*", "bits": "W8A8"}], r"overrides\[1\]\.layers: nope\*"),
        ([{"layers": "3", "bits": "W9A2"}], r"overrides\[0\]\.bits\.weights: expected"),
        ([{"layers": "3", "colour": 1}], r"overrides\[0\]\.colour: unknown key"),
        ([{"layers": "3", "method": "nope"}], r"overrides\[0\]\.method\.name: unknown"),
        ([{"layers": "3", "backward": "nope"}], r"overrides\[0\]\.backward: unknown"),
        ([{"layers": "re:(", "bits": "W8A8"}], r"overrides\[0\]\.layers: bad regular"),
        ([{"layers": "3", "delta": -1.0}], r"overrides\[0\]\.delta: expected"),
        ([{"bits": "W8A8"}], r"overrides\[0\]\.layers: missing"),
        ({"layers": "3"}, r"overrides: expected a list"),
    ],
)
def test_recipe_errors_name_the_override_index_and_key(tmp_path, overrides, message):
    path = write_recipe(tmp_path / "r.yaml", digits_recipe(tmp_path / "out", overrides=overrides))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_the_cli_refuses_an_unmatched_override_before_training(tmp_path, capsys):
    raw = digits_recipe(tmp_path / "out", overrides=[{"layers": "layer1.*", "bits": "W8A8"}])
    assert cli.main(["train", str(write_recipe(tmp_path / "r.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "overrides[0].layers: layer1.* matches no" in err
    assert not (tmp_path / "out").exists()


def test_a_run_trains_with_overrides_and_the_schedule_leaves_a_fixed_delta_alone(tmp_path):
    # toy_cnn's quantized layers: "3" and "6" (the first and last stay full precision);
    # "11" (the linear head) at 8 bits by name; "6" keeps δ = 0.02 against the estimator
    overrides = [{"layers": "11", "bits": "W8A8"}, {"layers": "re:6", "delta": 0.02}]
    (run,) = expand_runs(digits_recipe(tmp_path / "run", overrides=overrides), source="t")
    trainer = Trainer(run.recipe, progress=False)
    trainer.run()
    assert layer_bits(trainer.model) == {"3": (2, 2), "6": (2, 2), "11": (8, 8)}
    history = [json.loads(line) for line in (tmp_path / "run" / "deltas.jsonl").open()]
    assert len(history) > 1  # the estimator changed δ elsewhere
    assert all(row["deltas"]["6.weight"] == pytest.approx(0.02) for row in history)
    assert all(row["deltas"]["6.input"] == pytest.approx(0.02) for row in history)
    assert any(row["deltas"]["3.weight"] != history[0]["deltas"]["3.weight"] for row in history)
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")  # the resolved recipe re-reads
    assert [o.patterns for o in saved.overrides] == [["11"], ["re:6"]]
