"""The model of a run: built by name, quantized, with its full-precision weights."""

from __future__ import annotations

import torch
from torch import nn

from .. import models
from ..backward import BackwardRule
from ..delta import DeltaEstimator
from ..errors import ConfigError, EwgsError
from ..quant import QuantizerMethod, quantize_model
from ..recipe import Recipe


def quantized_model(
    recipe: Recipe,
    num_classes: int,
    method: QuantizerMethod,
    backward: BackwardRule,
    delta: float = 0.0,
) -> nn.Module:
    """The recipe's model, quantized by ``method`` with ``backward`` and ``delta`` at
    every round site (but where the recipe's per-layer ``overrides`` say otherwise), its
    weights as built (a run's checkpoint or export loads into it)."""
    return quantize_model(
        recipe.make_model(num_classes),
        method,
        weight_bits=recipe.bits.weights,
        activation_bits=recipe.bits.activations,
        backward=backward,
        delta=delta,
        quantize_first_last=recipe.quantize_first_last,
        overrides=recipe.layer_overrides(),
        inplace=True,
        require_all_quantized=recipe.require_all_quantized,
    )


def build_model(
    recipe: Recipe,
    num_classes: int,
    method: QuantizerMethod,
    backward: BackwardRule,
    delta_estimator: DeltaEstimator,
) -> nn.Module:
    """The recipe's model, quantized by ``method`` with ``backward`` at every round site,
    with its full-precision weights loaded (after the conversion, so a file from a run of
    this trainer at 32 bits loads too; the quantizers are initialised afterwards, on a
    training batch). On the CPU; the trainer moves it."""
    model = quantized_model(recipe, num_classes, method, backward, delta_estimator.initial())
    if recipe.model.weights is not None:
        try:
            models.load_full_precision(model, recipe.model.weights)
        except EwgsError:
            raise
        except Exception as error:  # a user's file: any failure is bad input
            raise ConfigError("model.weights", f"{type(error).__name__}: {error}") from None
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
