"""PROFIT (Park & Yoo, ECCV 2020) as a plugin: the DuQ quantizer (``quantizer``), the
AIWQ measurement (``aiwq``) and the training strategy that freezes layers by it, the
callback ``profit`` (``training``). Imports run one way: training ← aiwq, quantizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ewgs_plugins.hookspecs import hookimpl

from .aiwq import (
    AIWQTracker,
    activation_instability,
    current_quantized_weights,
    gaussian_kl,
    measure_aiwq,
    quantized_convs,
)
from .quantizer import ProfitMethod, ProfitQuantizer, inverse_softplus
from .training import ProfitTraining, frozen_layers

__all__ = [
    "AIWQTracker",
    "ProfitMethod",
    "ProfitQuantizer",
    "ProfitTraining",
    "activation_instability",
    "current_quantized_weights",
    "frozen_layers",
    "gaussian_kl",
    "inverse_softplus",
    "measure_aiwq",
    "quantized_convs",
]


@hookimpl
def ewgs_methods() -> Mapping[str, Callable[..., Any]]:
    return {"profit": ProfitMethod}


@hookimpl
def ewgs_callbacks() -> Mapping[str, Callable[..., Any]]:
    """PROFIT's training strategy, the callback ``profit``."""
    return {"profit": ProfitTraining}
