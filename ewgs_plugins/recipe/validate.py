"""Recipe validation: everything a recipe names is checked before anything runs."""

from __future__ import annotations

import warnings

import torch

from .. import weights
from ..errors import ConfigError
from ..quant import (
    LayersLeftInFullPrecision,
    QuantizerMethod,
    quantizable_layers,
    quantize_model,
    unmatched_overrides,
)
from .schema import BUILTIN_SCHEDULES, BitsConfig, Recipe


def validate(recipe: Recipe) -> None:
    """Check everything the recipe names: plugins exist and take the options given,
    the bit-widths suit the method, the files exist, the device is there. Nothing
    heavy is built (the model is built on the ``meta`` device)."""
    method = recipe.make_method()
    _check_bits(method, recipe.method.name, recipe.bits, "bits")
    overrides = recipe.layer_overrides()
    for index, (config, override) in enumerate(zip(recipe.overrides, overrides)):
        if config.bits is not None:
            name = (config.method or recipe.method).name
            _check_bits(override.method or method, name, config.bits, f"overrides[{index}].bits")
    recipe.make_backward()
    recipe.make_delta()
    _check_optimizers(recipe)
    for name, options in recipe.callback_options(method).items():
        callback = recipe.make_callback(name, options)
        if hasattr(callback, "check_recipe"):  # checks against the rest of the recipe
            callback.check_recipe(recipe)
    spec = recipe.make_dataset()
    spec.check(recipe.data.root)
    with torch.device("meta"):
        model = recipe.make_model(spec.num_classes(recipe.data.root))
    unmatched = unmatched_overrides(model, overrides)
    if unmatched:
        raise ConfigError(
            f"overrides[{unmatched[0]}].layers",
            f"{', '.join(overrides[unmatched[0]].layers)} matches no conv/linear layer of "
            f"model {recipe.model.name!r}; its layers: {', '.join(quantizable_layers(model))}",
        )
    if recipe.require_all_quantized:
        _check_all_quantized(recipe, model, method, overrides)
    if recipe.model.weights is not None:
        weights.check(recipe.model.weights, "model.weights")
    recipe.resolve_device()


def _check_all_quantized(
    recipe: Recipe, model: torch.nn.Module, method: QuantizerMethod, overrides: list
) -> None:
    """``require_all_quantized``: the conversion of the (``meta``) model leaves no layer
    in full precision (a ConfigError naming each that it would)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the error names them all
            quantize_model(
                model,
                method,
                weight_bits=recipe.bits.weights,
                activation_bits=recipe.bits.activations,
                quantize_first_last=recipe.quantize_first_last,
                overrides=overrides,
                inplace=True,
                require_all_quantized=True,
            )
    except LayersLeftInFullPrecision as error:
        raise ConfigError("require_all_quantized", str(error)) from None


def _check_bits(method: QuantizerMethod, name: str, bits: BitsConfig, key_path: str) -> None:
    """The method registered as ``name`` makes quantizers at these bit-widths (a
    ConfigError at ``key_path.weights``/``.activations`` otherwise)."""
    for kind, value in (("weights", bits.weights), ("activations", bits.activations)):
        maker = method.weight_quantizer if kind == "weights" else method.activation_quantizer
        try:
            maker(value)
        except ValueError as error:
            raise ConfigError(f"{key_path}.{kind}", f"method {name!r}: {error}") from None


def _check_optimizers(recipe: Recipe) -> None:
    """Both optimizers and the schedule build, with the recipe's options, on a stand-in
    parameter (errors name ``optimizers.<kind>...`` and ``schedule...``)."""
    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    recipe.optimizers.weights.make(stand_in, "optimizers.weights")
    optimizer = recipe.optimizers.quantizer.make(stand_in, "optimizers.quantizer")
    if recipe.schedule.name not in BUILTIN_SCHEDULES:
        recipe.schedule.make(optimizer, recipe.epochs, "schedule")
