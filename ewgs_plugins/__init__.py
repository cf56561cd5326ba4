"""ewgs-plugins: quantization-aware training where the backward pass through
rounding is a plugin (STE, EWGS).

The names that need torch are imported on first use (``ewgs_plugins.quantize_model``
imports torch then), so that the ``ewgs`` command line answers ``--help`` without it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("ewgs-plugins")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# torch-free: imported with the package
from .errors import ConfigError, EwgsError, ExportError, PluginError, TrainingError
from .hookspecs import hookimpl
from .registry import register_plugin, registry, reset_registry, unregister_plugin

if TYPE_CHECKING:
    from .backward import BackwardRule, ElementWiseGradientScaling, RoundContext, StraightThrough
    from .delta import DeltaEstimator, FixedDelta, HessianDelta, estimate_hessian_deltas
    from .gradient_scale import scale_gradient
    from .host_memory import keep_freed_memory
    from .quant import (
        IntegerMap,
        LayerOverride,
        QuantConv2d,
        Quantizer,
        QuantizerMethod,
        QuantLinear,
        active_round_sites,
        deltas,
        full_precision_layers,
        initialize_quantizers,
        quantize_model,
        quantized_layers,
        set_backward,
        set_deltas,
    )
    from .round_site import RoundSite, round_sites
    from .train import RunParts, Trainer, build_run

#: the names imported on first use -> the module (relative to this package) that defines each
_EXPORTS = {
    "BackwardRule": "backward",
    "DeltaEstimator": "delta",
    "ElementWiseGradientScaling": "backward",
    "FixedDelta": "delta",
    "HessianDelta": "delta",
    "IntegerMap": "quant",
    "LayerOverride": "quant",
    "QuantConv2d": "quant",
    "QuantLinear": "quant",
    "Quantizer": "quant",
    "QuantizerMethod": "quant",
    "RoundContext": "backward",
    "RoundSite": "round_site",
    "RunParts": "train",
    "StraightThrough": "backward",
    "Trainer": "train",
    "active_round_sites": "quant",
    "deltas": "quant",
    "build_run": "train",
    "estimate_hessian_deltas": "delta",
    "full_precision_layers": "quant",
    "initialize_quantizers": "quant",
    "keep_freed_memory": "host_memory",
    "quantize_model": "quant",
    "quantized_layers": "quant",
    "round_sites": "round_site",
    "scale_gradient": "gradient_scale",
    "set_backward": "quant",
    "set_deltas": "quant",
}
__all__ = [
    "BackwardRule",
    "ConfigError",
    "DeltaEstimator",
    "ElementWiseGradientScaling",
    "EwgsError",
    "ExportError",
    "FixedDelta",
    "HessianDelta",
    "IntegerMap",
    "LayerOverride",
    "PluginError",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "QuantizerMethod",
    "RoundContext",
    "RoundSite",
    "RunParts",
    "StraightThrough",
    "Trainer",
    "TrainingError",
    "active_round_sites",
    "build_run",
    "deltas",
    "estimate_hessian_deltas",
    "full_precision_layers",
    "hookimpl",
    "initialize_quantizers",
    "keep_freed_memory",
    "quantize_model",
    "quantized_layers",
    "register_plugin",
    "registry",
    "reset_registry",
    "round_sites",
    "scale_gradient",
    "set_backward",
    "set_deltas",
    "unregister_plugin",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
