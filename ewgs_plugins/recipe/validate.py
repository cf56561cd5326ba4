"""Recipe validation: everything a recipe names is checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .schema import Recipe


def validate(recipe: Recipe) -> None:
    """Check everything the recipe names: plugins exist and take the options given,
    the bit-widths suit the method, the files exist, the device is there. Nothing
    heavy is built (the model is built on the ``meta`` device)."""
    method = recipe.make_method()
    for name, bits in (("weights", recipe.bits.weights), ("activations", recipe.bits.activations)):
        maker = method.weight_quantizer if name == "weights" else method.activation_quantizer
        try:
            maker(bits)
        except ValueError as error:
            raise ConfigError(f"bits.{name}", f"method {recipe.method.name!r}: {error}") from None
    recipe.make_backward()
    recipe.make_delta()
    for name, options in recipe.callback_options(method).items():
        callback = recipe.make_callback(name, options)
        if hasattr(callback, "check_recipe"):  # checks against the rest of the recipe
            callback.check_recipe(recipe)
    spec = recipe.make_dataset()
    spec.check(recipe.data.root)
    with torch.device("meta"):
        recipe.make_model(spec.num_classes(recipe.data.root))
    if recipe.model.weights is not None and not Path(recipe.model.weights).is_file():
        raise ConfigError(
            "model.weights",
            f"file not found: {recipe.model.weights} (expected a local file of "
            "full-precision weights, a state_dict saved with torch.save)",
        )
    recipe.resolve_device()
