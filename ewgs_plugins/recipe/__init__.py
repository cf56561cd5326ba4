"""Recipes: YAML files that say what to train, checked before anything runs.

A recipe is one mapping (``schema.Recipe`` lists every key and its default).
``key=value`` overrides from the command line set dotted key paths and an optional
``matrix:`` expands the recipe into several runs (``matrix``); every run is checked
(``validate``) before anything is trained. Every bad input is a ``ConfigError`` naming
the file, the key path and what was expected.

Modules, each importing only those before it: ``yaml_text`` (the YAML loader),
``schema`` (the sections), ``validate``, ``matrix`` (overrides and expansion),
``loading`` (recipe files).
"""

from .loading import load_recipe, load_runs
from .matrix import Run, expand_runs, parse_override, set_path
from .schema import (
    BitsConfig,
    DataConfig,
    DeltaConfig,
    DistributedConfig,
    LayerOverrideConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizersConfig,
    PluginConfig,
    QuantizerOptimizerConfig,
    Recipe,
    ScheduleConfig,
    Section,
    WeightsOptimizerConfig,
    flatten,
    parse_bits_label,
    with_defaults,
)
from .validate import validate
from .yaml_text import dump_yaml, parse_yaml

__all__ = [
    "BitsConfig",
    "DataConfig",
    "DeltaConfig",
    "DistributedConfig",
    "LayerOverrideConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizersConfig",
    "PluginConfig",
    "QuantizerOptimizerConfig",
    "Recipe",
    "Run",
    "ScheduleConfig",
    "Section",
    "WeightsOptimizerConfig",
    "dump_yaml",
    "expand_runs",
    "flatten",
    "load_recipe",
    "load_runs",
    "parse_bits_label",
    "parse_override",
    "parse_yaml",
    "set_path",
    "validate",
    "with_defaults",
]
