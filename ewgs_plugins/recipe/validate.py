"""Recipe validation: everything a recipe names is checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..quant import QuantizerMethod, quantizable_layers, unmatched_overrides
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
    if recipe.model.weights is not None and not Path(recipe.model.weights).is_file():
        raise ConfigError(
            "model.weights",
            f"file not found: {recipe.model.weights} (expected a local file of "
            "full-precision weights, a state_dict saved with torch.save)",
        )
    recipe.resolve_device()


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
