"""Every layer accounted for: each convolution kind quantizes like Conv2d, the layers
left in full precision are listed with why (and refused under require_all_quantized),
and quantizers initialise only where asked or on a training-mode forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ewgs_plugins.errors import ConfigError
from ewgs_plugins.quant import (
    QUANTIZED_VERSIONS,
    LayersLeftInFullPrecision,
    QuantizersNotInitialized,
    full_precision_layers,
    initialize_quantizers,
    quantize_model,
    quantized_layers,
)
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.recipe.validate import validate
from ewgs_plugins.summary import summary_markdown

#: (a layer, an input for it)
KINDS = {
    nn.Conv1d: (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, groups=1), (2, 3, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 3, 6, 6)),
    nn.Conv3d: (lambda: nn.Conv3d(3, 4, 2, dilation=1), (2, 3, 4, 4, 4)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
    nn.ConvTranspose2d: (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1),
        (2, 4, 5, 5),
    ),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(3, 2, 2, stride=2), (2, 3, 3, 3, 3)),
    nn.Linear: (lambda: nn.Linear(5, 4), (2, 5)),
}


def wrapped(layer: nn.Module) -> nn.Sequential:
    """``layer`` between two linear maps (the first and last, full precision by rule)."""
    return nn.Sequential(nn.Identity(), layer)


def convert(model: nn.Module, bits: int, **options) -> nn.Module:
    return quantize_model(
        model, "lsq", weight_bits=bits, activation_bits=bits, quantize_first_last=True, **options
    )


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_every_kind_has_a_quantized_version_identical_at_32_bits(kind) -> None:
    torch.manual_seed(0)
    make, shape = KINDS[kind]
    layer = make()
    x = torch.randn(shape)
    quantized = convert(wrapped(layer), 32)
    assert type(quantized[1]) is QUANTIZED_VERSIONS[kind]
    assert isinstance(quantized[1], kind)
    assert set(quantized[1].state_dict()) >= set(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(quantized.eval()(x), layer(x))


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_every_kind_quantizes_its_weight_and_input_and_trains(kind) -> None:
    torch.manual_seed(1)
    make, shape = KINDS[kind]
    layer = make()
    x = torch.randn(shape).abs()
    quantized = convert(wrapped(layer), 2)
    q = quantized[1]
    out = quantized.train()(x)
    assert out.shape == layer(x).shape
    weight_levels = torch.unique(q.weight_quantizer(q.weight).detach())
    assert len(weight_levels) <= 4
    out.square().mean().backward()
    assert q.weight.grad.abs().sum() > 0 and q.weight_quantizer.step.grad is not None
    # the same product as the layer itself on the quantized weight and input
    with torch.no_grad():
        expected = type(layer).forward(
            _with_weight(layer, q.weight_quantizer(q.weight)), q.input_quantizer(x)
        )
        assert torch.allclose(quantized.eval()(x), expected, atol=1e-6)


def _with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    clone = type(layer).__new__(type(layer))
    clone.__dict__ = {**layer.__dict__, "_parameters": dict(layer._parameters)}
    clone._parameters["weight"] = nn.Parameter(weight)
    return clone


def test_a_transposed_convolution_takes_its_output_size() -> None:
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2)
    quantized = convert(wrapped(layer), 32)[1].eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(quantized(x, (12, 12)), layer(x, (12, 12)))
        assert quantized(x, (12, 12)).shape[-2:] == (12, 12)


# ----------------------------------------------------------------- initialization


def small_cnn() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )


def test_an_eval_forward_of_uninitialised_quantizers_is_an_error_naming_the_layer() -> None:
    model = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4).eval()
    step = float(model[2].weight_quantizer.step.detach())
    with pytest.raises(QuantizersNotInitialized, match=r"'2' .*initialize_quantizers"):
        model(torch.rand(2, 1, 8, 8))
    assert float(model[2].weight_quantizer.step.detach()) == step  # nothing initialised silently


def test_a_training_forward_or_initialize_quantizers_initialises() -> None:
    x = torch.rand(8, 1, 8, 8)
    trained = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4)
    trained.train()(x)
    asked = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4)
    initialize_quantizers(asked.eval(), x)
    assert not asked.training  # the mode is given back
    for model in (trained, asked):
        assert float(model[2].weight_quantizer.step.detach()) != 1.0
        with torch.no_grad():
            model.eval()(x)
    assert torch.equal(trained[2].weight_quantizer.step, asked[2].weight_quantizer.step)


def test_a_loaded_initialised_state_runs_in_eval_and_full_precision_layers_need_nothing() -> None:
    x = torch.rand(8, 1, 8, 8)
    source = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4)
    initialize_quantizers(source, x)
    target = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source.eval()(x))
    identity = quantize_model(small_cnn(), "lsq", weight_bits=32, activation_bits=32)
    with torch.no_grad():
        assert torch.equal(identity.eval()(x), small_cnn()(x))


# ----------------------------------------------------------- full-precision layers


class Mixed(nn.Module):
    """Layers of every standing: convertible, normalization, without a quantized
    version (Embedding, MultiheadAttention whose out_proj is a Linear subclass)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
        return self.head(self.fc3(self.fc2(torch.relu(self.fc1(x))))).mean(1)


def test_every_layer_left_in_full_precision_is_listed_with_why() -> None:
    from ewgs_plugins.quant import LayerOverride

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quantize_model(
            Mixed(),
            "lsq",
            weight_bits=4,
            activation_bits=4,
            exclude=["fc2"],
            overrides=[LayerOverride(("fc3",), weight_bits=32, activation_bits=32)],
        )
    left = full_precision_layers(model)
    assert list(left) == ["embed", "attention", "fc1", "fc2", "fc3", "head"]
    assert left["embed"].startswith("unsupported: Embedding")
    assert left["attention"].startswith("unsupported: nn.MultiheadAttention")
    assert "in_proj_weight" in left["attention"]
    assert left["fc1"].startswith("rule: the first layer")
    assert left["fc2"].startswith("exclude")
    assert left["fc3"].startswith("override")
    assert left["head"].startswith("rule: the last layer")
    assert "norm" not in left and "attention.out_proj" not in left
    assert type(model.attention.out_proj) is not QUANTIZED_VERSIONS[nn.Linear]  # never wrapped
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "attention" in messages[0] and "embed" in messages[0]
    assert "fc1" not in messages[0]  # asked for (the rule) is listed, not warned about
    model(torch.randint(0, 10, (2, 5)))


def test_require_all_quantized_names_every_layer_left() -> None:
    with pytest.raises(LayersLeftInFullPrecision) as error:
        quantize_model(Mixed(), "lsq", weight_bits=4, activation_bits=4, require_all_quantized=True)
    assert set(error.value.layers) == {"embed", "attention", "fc1", "head"}
    assert "attention (unsupported" in str(error.value)
    model = quantize_model(
        small_cnn(),
        "lsq",
        weight_bits=4,
        activation_bits=4,
        quantize_first_last=True,
        require_all_quantized=True,
    )
    assert full_precision_layers(model) == {} and len(quantized_layers(model)) == 3


def test_a_conv1d_model_quantizes() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)
    )
    quantized = quantize_model(model, "lsq", weight_bits=4, activation_bits=4)
    assert list(quantized_layers(quantized)) == ["2"]


def _recipe(**extra) -> dict:
    return {
        "model": {"name": "digits_cnn", "options": {"width": 8}},
        "data": {"name": "digits", "batch_size": 32},
        "method": "lsq",
        "backward": "ste",
        "bits": "W4A4",
        "epochs": 1,
        "device": "cpu",
        **extra,
    }


def test_the_recipe_key_refuses_full_precision_layers_before_training() -> None:
    with pytest.raises(
        ConfigError, match=r"r.yaml: require_all_quantized: .*0 \(rule: the first layer.*11 "
    ):
        expand_runs(_recipe(require_all_quantized=True), source="r.yaml")
    allowed = expand_runs(
        _recipe(require_all_quantized=True, quantize_first_last=True), source="r.yaml"
    )[0].recipe
    validate(allowed)
    assert expand_runs(_recipe(), source="r.yaml")[0].recipe.require_all_quantized is False


def test_the_summary_lists_the_full_precision_layers() -> None:
    model = quantize_model(small_cnn(), "lsq", weight_bits=4, activation_bits=4)
    initialize_quantizers(model, torch.rand(4, 1, 8, 8))
    text = summary_markdown(model)
    section = text.split("## Layers in full precision")[1]
    assert "| 0 | rule: the first layer" in section and "| 5 | rule: the last layer" in section
    everything = convert(small_cnn(), 4)
    initialize_quantizers(everything, torch.rand(4, 1, 8, 8))
    assert "None: every layer with weights is quantized" in summary_markdown(everything)
