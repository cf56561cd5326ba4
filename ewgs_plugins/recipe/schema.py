"""The recipe schema: a tree of dataclasses, one per section, and the parser that
checks raw YAML data against it.

A recipe is one mapping (see ``Recipe`` for every key and its default). ``key=value``
overrides from the command line set dotted key paths (values parsed as YAML), and an
optional ``matrix:`` expands the recipe into several runs: each of its keys is a dotted
key path and each value a list; the runs are the Cartesian product, in the order written.

Every bad input is a ``ConfigError`` naming the file, the key path and what was
expected. The schema is a tree of dataclasses: a new key is one annotated field with its
default (types are checked from the annotation by ``options.check_type``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import data
from ..errors import ConfigError, quote
from ..options import call_with_options, check_type, describe_type, factory_options
from ..quant import FULL_PRECISION, VALID_BITS, LayerOverride
from ..registry import KINDS, registry


class Section:
    """Base of every recipe section (a dataclass). ``check`` does the checks that a type
    annotation cannot express; ``from_string`` turns a shorthand string into a mapping."""

    @classmethod
    def from_string(cls, text: str, key_path: str) -> dict[str, Any]:
        if "name" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            return {"name": text}
        raise ConfigError(key_path, f"expected a mapping, got {quote(text)}")

    def check(self, key_path: str) -> None:
        """Raise ``ConfigError`` for impossible values."""


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _positive(value: float | int, key_path: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key_path, f"expected a number {bound}, got {quote(value)}")


@dataclass(kw_only=True)
class ModelConfig(Section):
    #: a registered model (``ewgs plugins`` lists them)
    name: str
    #: keyword options of the model factory (``num_classes`` comes from the dataset)
    options: dict[str, Any] = field(default_factory=dict)
    #: a local file of full-precision weights to start from (state_dict, ``weights_only``)
    weights: str | None = None


@dataclass(kw_only=True)
class DataConfig(Section):
    #: a registered dataset: cifar10, imagenet, digits, ...
    name: str
    #: the folder the dataset lives in (not needed by ``digits``)
    root: str | None = None
    #: keyword options of the dataset factory (``download: true`` for cifar10, say)
    options: dict[str, Any] = field(default_factory=dict)
    #: the training images: ``train`` (all of the training set) or a range of it by
    #: index, ``train[0:10000]``
    train: str = "train"
    #: what is evaluated: ``test`` (the official test set) or a range of the training set
    #: held out for validation, ``train[10000:12000]`` (must not overlap ``train``)
    val: str = "test"
    #: the training batch size (under torchrun: the global batch, split across the processes)
    batch_size: int = 256
    #: DataLoader worker processes (0: load in the training process)
    workers: int = 0

    def check(self, key_path: str) -> None:
        _positive(self.batch_size, _join(key_path, "batch_size"))
        _positive(self.workers, _join(key_path, "workers"), allow_zero=True)
        data.check_splits(self.train, self.val, key_path)


@dataclass(kw_only=True)
class PluginConfig(Section):
    """A registered plugin by name, with the keyword options of its factory."""

    #: the plugin's registered name (``ewgs plugins`` lists them)
    name: str
    #: keyword options of the plugin's factory (checked against its signature)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DeltaConfig(Section):
    """The δ estimator. Its schedule (``every``, ``unit``, ``batches``, ``samples``,
    ``tol``, ``representative``, ``before_training``) is in its options."""

    #: the δ estimator: fixed (options: value) or hessian (the paper's Eq. 8-10), or a plugin's
    name: str = "hessian"
    #: the estimator's options, its schedule included (every, unit, batches, probe, samples, ...)
    options: dict[str, Any] = field(default_factory=dict)
    #: batch size of the batches δ is estimated on (null: the training batch size;
    #: the paper uses 16 on ImageNet)
    batch_size: int | None = None

    def check(self, key_path: str) -> None:
        if self.batch_size is not None:
            _positive(self.batch_size, _join(key_path, "batch_size"))


def parse_bits_label(text: str) -> tuple[int, int] | None:
    """``(weights, activations)`` of a label such as ``W4A4`` (any case), or None."""
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    return (int(match[1]), int(match[2])) if match else None


@dataclass(kw_only=True)
class BitsConfig(Section):
    """Bit-widths, 1..8, or 32 for "not quantized". Shorthand: ``W2A2``, ``W1A32``."""

    #: bit-width of the weights
    weights: int
    #: bit-width of the layers' inputs
    activations: int

    @classmethod
    def from_string(cls, text: str, key_path: str) -> dict[str, Any]:
        pair = parse_bits_label(text)
        if pair is None:
            raise ConfigError(
                key_path,
                f"expected {{weights: N, activations: N}} or 'W<N>A<N>', got {quote(text)}",
            )
        return {"weights": pair[0], "activations": pair[1]}

    def check(self, key_path: str) -> None:
        for name in ("weights", "activations"):
            value = getattr(self, name)
            if value not in VALID_BITS:
                raise ConfigError(
                    _join(key_path, name),
                    f"expected an integer 1..8, or {FULL_PRECISION} (not quantized), got {value}",
                )

    @property
    def label(self) -> str:
        return f"W{self.weights}A{self.activations}"


@dataclass(kw_only=True)
class LayerOverrideConfig(Section):
    """Per-layer settings for the layers whose qualified names (``layer1.0.conv1``,
    ``fc``) match ``layers``: glob patterns, or regular expressions written
    ``re:<regex>``, matched against the whole name. Keys left out keep the recipe's."""

    #: module names to match: a glob or ``re:<regex>``, or a list of them
    layers: str | list[str]
    #: these layers' bit-widths (fixed: a bit-width schedule leaves them alone)
    bits: BitsConfig | None = None
    #: these layers' quantizer method
    method: PluginConfig | None = None
    #: these layers' backward rule
    backward: str | None = None
    #: a fixed δ for these layers' round sites (the δ estimator leaves them alone)
    delta: float | None = None

    @property
    def patterns(self) -> list[str]:
        return [self.layers] if isinstance(self.layers, str) else list(self.layers)

    def check(self, key_path: str) -> None:
        if not self.patterns:
            raise ConfigError(_join(key_path, "layers"), "expected at least one pattern")
        for pattern in self.patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise ConfigError(
                        _join(key_path, "layers"), f"bad regular expression {pattern!r}: {error}"
                    ) from None
        if self.delta is not None:
            _positive(self.delta, _join(key_path, "delta"), allow_zero=True)


@dataclass(kw_only=True)
class OptimizerConfig(Section):
    """An optimizer by name: any ``torch.optim`` optimizer (``adam``, ``adamw``, ``sgd``,
    ``rmsprop``, ..., any case) or a plugin's (``ewgs_optimizers``), with ``lr``,
    ``weight_decay`` and the rest of its keyword arguments under ``options``."""

    #: the optimizer: any torch.optim optimizer by name (any case) or a plugin's
    name: str = "adam"
    #: the learning rate (the schedule scales it)
    lr: float = 1e-3
    #: L2 weight decay
    weight_decay: float = 0.0
    #: sgd only
    momentum: float = 0.9
    #: sgd only
    nesterov: bool = False
    #: adam only
    betas: tuple[float, float] = (0.9, 0.999)
    #: more keyword arguments of the optimizer (``eps``, ``amsgrad``, ``alpha``, ...)
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, key_path: str) -> None:
        _positive(self.lr, _join(key_path, "lr"))
        _positive(self.weight_decay, _join(key_path, "weight_decay"), allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError(
                _join(key_path, "momentum"), f"expected 0 <= momentum < 1, got {self.momentum}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(
                _join(key_path, "betas"), f"expected two numbers in [0, 1), got {list(self.betas)}"
            )
        if self.nesterov and (self.name.lower() != "sgd" or self.momentum == 0):
            raise ConfigError(
                _join(key_path, "nesterov"), "nesterov needs name: sgd and momentum > 0"
            )
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def make(self, params: Any, key_path: str = "") -> torch.optim.Optimizer:
        """The optimizer over ``params`` (parameters or param groups). Every option is
        checked against the optimizer's signature first: an unknown name or an ill-typed
        value is a ``ConfigError`` at ``key_path.options.<option>``."""
        reg = registry()
        names = reg.names("optimizer")
        name = self.name if self.name in names else self.name.lower()
        factory = reg.get("optimizer", name, _join(key_path, "name")).factory
        accepted = factory_options(factory)
        kwargs: dict[str, Any] = {"lr": self.lr}
        if "weight_decay" in accepted:
            kwargs["weight_decay"] = self.weight_decay
        elif self.weight_decay:
            raise ConfigError(
                _join(key_path, "weight_decay"), f"optimizer {name!r} takes no weight decay"
            )
        defaults = OptimizerConfig()
        if name == "sgd":
            kwargs.update(momentum=self.momentum, nesterov=self.nesterov)
        elif self.momentum != defaults.momentum:
            raise ConfigError(
                _join(key_path, "momentum"),
                f"applies to sgd only; give {name!r}'s under options.momentum",
            )
        if name == "adam":
            kwargs["betas"] = tuple(self.betas)
        elif tuple(self.betas) != defaults.betas:
            raise ConfigError(
                _join(key_path, "betas"),
                f"applies to adam only; give {name!r}'s under options.betas",
            )
        for key in self.options:
            if key in kwargs or key in ("params", "lr", "weight_decay"):
                raise ConfigError(
                    _join(key_path, f"options.{key}"),
                    f"set it as {_join(key_path, str(key))}, not under options",
                )
        free = {k: v for k, v in accepted.items() if k not in ("params", "lr", "weight_decay")}
        what = f"optimizer {name!r}"
        kwargs.update(_checked_options(self.options, free, _join(key_path, "options"), what))
        try:
            return factory(params, **kwargs)
        except (ValueError, TypeError) as error:
            raise ConfigError(key_path, f"optimizer {name!r}: {error}") from None


@dataclass(kw_only=True)
class WeightsOptimizerConfig(OptimizerConfig):
    """Network weights (the paper, CIFAR-10: Adam, lr 1e-3, weight decay 1e-4)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass(kw_only=True)
class QuantizerOptimizerConfig(OptimizerConfig):
    """Quantizer parameters (the paper: Adam, lr 1e-5, no weight decay)."""

    lr: float = 1e-5
    weight_decay: float = 0.0


@dataclass(kw_only=True)
class OptimizersConfig(Section):
    """Two optimizers, as the paper trains: network weights (conv/linear weights, biases,
    BN affine) and quantizer parameters (everything inside a Quantizer, and the
    layers' output scale α)."""

    #: the network's weights, biases and BatchNorm affine parameters
    weights: WeightsOptimizerConfig = field(default_factory=WeightsOptimizerConfig)
    #: the quantizers' parameters and the layers' output scale α
    quantizer: QuantizerOptimizerConfig = field(default_factory=QuantizerOptimizerConfig)


#: schedules computed by the core itself (every other name is a registered one)
BUILTIN_SCHEDULES = ("constant", "cosine")
#: options of a registered schedule filled in, when not given, with the number of
#: schedule steps after the warm-up
_LENGTH_OPTIONS = ("T_max", "total_iters", "total_steps")


@dataclass(kw_only=True)
class ScheduleConfig(Section):
    """Learning-rate schedule of both optimizers, after an optional linear warm-up of
    ``warmup_epochs`` from ``warmup_start_factor`` × the schedule's first value:
    ``cosine`` anneals to ``final_lr_factor`` × lr (0 by default); ``constant`` keeps lr;
    any other name is a registered schedule (torch's: ``step``, ``multistep``,
    ``exponential``, ``onecycle``, ``cosine_restarts``, ``polynomial``, ``linear``,
    ``cyclic``, ``cosine_annealing``; a plugin's through ``ewgs_lr_schedules``) with its
    keyword arguments under ``options``. A registered schedule runs on lr = 1, so the
    learning rates in its options (``max_lr``, ``eta_min``, ...) are factors of lr."""

    #: the schedule's shape: cosine, constant, or a registered schedule by name
    name: str = "cosine"
    #: epochs of linear warm-up before the schedule (0: none)
    warmup_epochs: int = 0
    #: the warm-up starts at this fraction of the learning rate
    warmup_start_factor: float = 0.1
    #: cosine ends at this fraction of the learning rate
    final_lr_factor: float = 0.0
    #: update the learning rate after every epoch (the paper's code) or every step
    unit: Literal["epoch", "step"] = "epoch"
    #: keyword arguments of a registered schedule (``step_size``, ``gamma``, ...)
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, key_path: str) -> None:
        _positive(self.warmup_epochs, _join(key_path, "warmup_epochs"), allow_zero=True)
        _positive(self.warmup_start_factor, _join(key_path, "warmup_start_factor"), allow_zero=True)
        _positive(self.final_lr_factor, _join(key_path, "final_lr_factor"), allow_zero=True)
        if self.name in BUILTIN_SCHEDULES and self.options:
            key = next(iter(self.options))
            raise ConfigError(
                _join(key_path, f"options.{key}"), f"schedule {self.name!r} takes no options"
            )
        if self.name != "cosine" and self.final_lr_factor:
            raise ConfigError(
                _join(key_path, "final_lr_factor"),
                "applies to schedule 'cosine' only; give the others' end under options",
            )

    def make(self, optimizer: torch.optim.Optimizer, length: int, key_path: str = "") -> Any:
        """The registered schedule ``name`` (not a built-in one) on ``optimizer``, for
        ``length`` steps (filled in for its ``T_max``/``total_iters``/``total_steps``
        when not given). Options are checked first, with their key paths."""
        known = (*BUILTIN_SCHEDULES, *registry().names("schedule"))
        if self.name not in registry().names("schedule"):
            raise ConfigError(
                _join(key_path, "name"),
                f"unknown learning-rate schedule {self.name!r}; known: {', '.join(known)}",
            )
        factory = registry().get("schedule", self.name).factory
        accepted = factory_options(factory)
        free = {k: v for k, v in accepted.items() if k not in ("optimizer", "last_epoch")}
        what = f"learning-rate schedule {self.name!r}"
        options = {k: length for k in _LENGTH_OPTIONS if k in free}
        options.update(_checked_options(self.options, free, _join(key_path, "options"), what))
        try:
            return factory(optimizer, **options)
        except (ValueError, TypeError) as error:
            raise ConfigError(_join(key_path, "options"), f"{what}: {error}") from None


@dataclass(kw_only=True)
class DistributedConfig(Section):
    """Multi-process training under ``torchrun`` (no effect in a single process).
    ``data.batch_size`` is then the global batch, split evenly across the processes."""

    #: BatchNorm statistics over the global batch (torch's SyncBatchNorm; CUDA only)
    sync_batchnorm: bool = False
    #: DDP's option (null: on when a quantizer at 32 bits has parameters, which get no
    #: gradient); turn it on for a model with parameters its forward does not use
    find_unused_parameters: bool | None = None


@dataclass(kw_only=True)
class Recipe(Section):
    """One run. Relative paths are relative to the current working directory."""

    #: the model to quantize (or a string: its name)
    model: ModelConfig
    #: the dataset and how it is loaded
    data: DataConfig
    #: the quantizer method: interval, dorefa, lsq, profit, or a plugin's (or a string: its name)
    method: PluginConfig
    #: the backward rule at every round site: ste, ewgs, or a plugin's
    backward: str
    #: bit-widths of weights and activations (or a string such as ``W2A2``)
    bits: BitsConfig
    #: training epochs
    epochs: int
    #: the δ of EWGS: a fixed value or the Hessian estimate, and its schedule
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    #: quantize the first and last layers (null: the method's default; PROFIT: yes)
    quantize_first_last: bool | None = None
    #: refuse the run if any layer with weights stays in full precision, whatever the
    #: reason (the first/last-layer rule, an override, a layer without a quantized version)
    require_all_quantized: bool = False
    #: the two optimizers (defaults: the paper's CIFAR-10 settings)
    optimizers: OptimizersConfig = field(default_factory=OptimizersConfig)
    #: the learning-rate schedule of both optimizers
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    #: the seed of initialisation, data order and augmentation (runs pair by it)
    seed: int = 0
    #: auto (CUDA when there is one), cpu, cuda or cuda:N
    device: str = "auto"
    #: the run directory (null: runs/<recipe file name>)
    output: str | None = None
    #: training callbacks by name -> options (or null), added to the method's default
    #: callbacks; false turns one of those defaults off
    callbacks: dict[str, dict[str, Any] | bool | None] = field(default_factory=dict)
    #: train through torch.compile(model) (speed only; the first steps compile)
    compile: bool = False
    #: mixed precision (autocast): null (float32), bf16, or fp16 (with a GradScaler);
    #: the quantizers compute in float32 either way
    amp: Literal["bf16", "fp16"] | None = None
    #: channels_last memory format for the model and its 4-D inputs (speed only)
    channels_last: bool = False
    #: settings for training under torchrun
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    #: per-layer overrides, applied in order (a later one wins): a list of {layers:
    #: <glob or re:regex on module names>, bits, method, backward, delta}
    overrides: list[LayerOverrideConfig] = field(default_factory=list)

    def check(self, key_path: str) -> None:
        _positive(self.epochs, "epochs")
        _positive(self.seed, "seed", allow_zero=True)
        if self.schedule.warmup_epochs >= self.epochs and self.schedule.warmup_epochs > 0:
            raise ConfigError(
                "schedule.warmup_epochs",
                f"expected fewer warm-up epochs than epochs ({self.epochs}), "
                f"got {self.schedule.warmup_epochs}",
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                "device", f"expected auto, cpu, cuda or cuda:N, got {quote(self.device)}"
            )
        for name, options in self.callbacks.items():
            if name == "delta":
                raise ConfigError(
                    "callbacks.delta", "the δ schedule is always on; configure it under delta:"
                )
            if not (options is None or isinstance(options, (Mapping, bool))):
                raise ConfigError(
                    f"callbacks.{name}",
                    f"expected a mapping of options, null (no options) or false (off), "
                    f"got {quote(options)}",
                )

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every key, defaults filled in) as plain YAML data."""
        return _plain(dataclasses.asdict(self))

    # -- building what the recipe names (the trainer and validation use the same code)

    def make_method(self) -> Any:
        return _create("method", self.method.name, self.method.options, "method")

    def make_backward(self) -> Any:
        return registry().create("backward", self.backward, None, "backward")

    def make_delta(self) -> Any:
        return _create("delta", self.delta.name, self.delta.options, "delta")

    def layer_overrides(self) -> list[LayerOverride]:
        """``overrides`` with their methods and backward rules built (errors name the
        override's index and key: ``overrides[1].method.name``)."""
        made = []
        for index, override in enumerate(self.overrides):
            where = f"overrides[{index}]"
            method, backward, bits = None, None, override.bits
            if override.method is not None:
                plugin = override.method
                method = _create("method", plugin.name, plugin.options, f"{where}.method")
            if override.backward is not None:
                backward = registry().create(
                    "backward", override.backward, None, f"{where}.backward"
                )
            made.append(
                LayerOverride(
                    tuple(override.patterns),
                    method=method,
                    weight_bits=bits.weights if bits else None,
                    activation_bits=bits.activations if bits else None,
                    backward=backward,
                    delta=override.delta,
                )
            )
        return made

    def make_dataset(self) -> Any:
        """The dataset plugin's ``data.DatasetSpec`` with ``data.train`` and ``data.val``
        applied (cheap: no data is read)."""
        spec = _create("dataset", self.data.name, self.data.options, "data")
        return data.with_splits(spec, self.data.train, self.data.val)

    def make_model(self, num_classes: int) -> torch.nn.Module:
        """The full-precision model (weights are loaded by the trainer)."""
        options = {"num_classes": num_classes, **self.model.options}
        return _create("model", self.model.name, options, "model")

    def callback_options(self, method: Any) -> dict[str, dict[str, Any]]:
        """Callbacks of the run by name -> options: the method's defaults, then the
        recipe's (a recipe entry with the same name gives that callback's options;
        ``false`` turns it off)."""
        chosen: dict[str, dict[str, Any]] = {name: {} for name in method.callbacks}
        for name, options in self.callbacks.items():
            if options is False:
                chosen.pop(name, None)
            else:
                chosen[name] = dict(options) if isinstance(options, Mapping) else {}
        return chosen

    def make_callback(self, name: str, options: Mapping[str, Any]) -> Any:
        key_path = f"callbacks.{name}"
        entry = registry().get("callback", name, key_path)
        return call_with_options(
            entry.factory, options, key_path, what=f"training callback {name!r}"
        )

    def resolve_device(self) -> torch.device:
        """The device to train on; ``auto`` is CUDA when there is one."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "device", f"{quote(self.device)} asked for, but CUDA is not available"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(
                    "device",
                    f"{quote(self.device)} asked for, but there are "
                    f"{torch.cuda.device_count()} CUDA devices",
                )
        return device


def _checked_options(
    options: Mapping[str, Any], accepted: Mapping[str, Any], key_path: str, what: str
) -> dict[str, Any]:
    """``options`` checked by name and type against ``accepted`` (a factory's keyword
    options); errors name ``key_path.<option>`` and list the known options."""
    checked = {}
    for key, value in options.items():
        path = _join(key_path, str(key))
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(path, f"unknown option of {what}; known options: {known}")
        checked[key] = check_type(value, accepted[key].annotation, path)
    return checked


def _create(kind: str, name: str, options: Mapping[str, Any], section: str) -> Any:
    """Build the plugin ``name`` of ``kind`` named at ``section.name`` with the options
    at ``section.options``."""
    entry = registry().get(kind, name, f"{section}.name")
    return call_with_options(
        entry.factory, options, f"{section}.options", what=f"{KINDS[kind][1]} {name!r}"
    )


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted key path: value} (an empty mapping is one value)."""
    if isinstance(data, Mapping) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def with_defaults(data: Mapping[str, Any], cls: type[Section] = Recipe) -> dict[str, Any]:
    """A resolved recipe (``data``, a section ``cls`` as plain data) with every key the
    schema has and ``data`` lacks filled in at its default: a run resolved before a
    release added a key reads as if the key had been there at its default, which keeps
    the behaviour the run had. Keys ``data`` has are kept as they are; a plugin's
    ``options`` gain nothing."""
    filled = dict(data)
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        name, hint = spec.name, hints[spec.name]
        if name not in filled:
            if spec.default is not dataclasses.MISSING:
                filled[name] = _plain(spec.default)
            elif spec.default_factory is not dataclasses.MISSING:
                default = spec.default_factory()
                is_section = dataclasses.is_dataclass(default)
                filled[name] = _plain(dataclasses.asdict(default) if is_section else default)
            continue
        section = _section_of(hint) or next(
            (s for s in map(_section_of, typing.get_args(hint)) if s), None
        )
        value = filled[name]
        if section and isinstance(value, Mapping):
            filled[name] = with_defaults(value, section)
        elif section and isinstance(value, list):
            filled[name] = [
                with_defaults(v, section) if isinstance(v, Mapping) else v for v in value
            ]
    return filled


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_section(cls: type[Section], data: Any, key_path: str) -> Section:
    if isinstance(data, str):
        data = cls.from_string(data, key_path)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = ", ".join(fields)
    if not isinstance(data, Mapping):
        raise ConfigError(key_path, f"expected a mapping with keys {known}, got {quote(data)}")
    for key in data:
        if key not in fields:
            raise ConfigError(_join(key_path, str(key)), f"unknown key; known keys: {known}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        path = _join(key_path, name)
        hint = hints[name]
        if name not in data:
            required = (
                spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            )
            if required:
                raise ConfigError(path, f"missing; expected {_describe(hint)}")
            continue
        values[name] = _parse_value(hint, data[name], path)
    section = cls(**values)
    section.check(key_path)
    return section


def _section_of(hint: Any) -> type[Section] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def _parse_value(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against ``hint``: a section, an optional section (``X | None``),
    a list of sections (each at ``path[i]``), or a plain annotated value."""
    if _section_of(hint):
        return parse_section(hint, value, path)
    args = typing.get_args(hint)
    optional = [a for a in args if a is not type(None)]
    if type(None) in args and len(optional) == 1 and _section_of(optional[0]):
        return None if value is None else parse_section(optional[0], value, path)
    if typing.get_origin(hint) is list and args and _section_of(args[0]):
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list of {_describe(args[0])}, got {quote(value)}")
        return [parse_section(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    return check_type(value, hint, path)


def _describe(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Section):
        keys = ", ".join(f.name for f in dataclasses.fields(hint))  # type: ignore[arg-type]
        return f"a mapping with keys {keys}"
    return describe_type(hint)


def section_type(path: Sequence[str]) -> type[Section] | None:
    """The Section class at a key path of the schema, or None for a plain value."""
    cls: Any = Recipe
    for key in path:
        if not (isinstance(cls, type) and issubclass(cls, Section)):
            return None
        hints = typing.get_type_hints(cls)
        if key not in hints:
            return None
        cls = hints[key]
    return cls if isinstance(cls, type) and issubclass(cls, Section) else None
