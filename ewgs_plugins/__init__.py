"""ewgs-plugins: quantization-aware training where the backward pass through
rounding is a plugin (STE, EWGS)."""

# before the imports: ewgs_plugins.train imports modules that read it
__version__ = "0.1.0"

from .backward import BackwardRule, ElementWiseGradientScaling, RoundContext, StraightThrough
from .delta import DeltaEstimator, FixedDelta, HessianDelta, estimate_hessian_deltas
from .errors import ConfigError, EwgsError, ExportError, PluginError, TrainingError
from .gradient_scale import scale_gradient
from .hookspecs import hookimpl
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
from .registry import register_plugin, registry, reset_registry, unregister_plugin
from .round_site import RoundSite, round_sites
from .train import RunParts, Trainer, build_run

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
