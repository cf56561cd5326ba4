"""Recipes: YAML files that say what to train, checked before anything runs.

A recipe is one mapping (see ``Recipe`` for every key and its default). ``key=value``
overrides from the command line set dotted key paths (values parsed as YAML), and an
optional ``matrix:`` expands the recipe into several runs: each of its keys is a dotted
key path and each value a list; the runs are the Cartesian product, in the order written.

Every bad input is a ``ConfigError`` naming the file, the key path and what was
expected. The schema is a tree of dataclasses: a new key is one annotated field with its
default (types are checked from the annotation by ``options.check_type``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import re
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .errors import ConfigError
from .options import call_with_options, check_type, describe_type
from .quant import FULL_PRECISION, VALID_BITS

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes: ``1e-3`` is a float (YAML 1.2; PyYAML reads it as a
    string) and a key written twice in one mapping is an error, not silently dropped."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(str(key), f"written twice in one mapping (line {line})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as error:
        raise ConfigError(error.key_path, error.message, source) from None
    except yaml.YAMLError as error:
        raise ConfigError("", f"not valid YAML: {error}", source) from None


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------------------- schema


class Section:
    """Base of every recipe section (a dataclass). ``check`` does the checks that a type
    annotation cannot express; ``from_string`` turns a shorthand string into a mapping."""

    @classmethod
    def from_string(cls, text: str, key_path: str) -> dict[str, Any]:
        if "name" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            return {"name": text}
        raise ConfigError(key_path, f"expected a mapping, got {text!r}")

    def check(self, key_path: str) -> None:
        """Raise ``ConfigError`` for impossible values."""


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _positive(value: float | int, key_path: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key_path, f"expected a number {bound}, got {value!r}")


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
    batch_size: int = 256
    #: DataLoader worker processes (0: load in the training process)
    workers: int = 0

    def check(self, key_path: str) -> None:
        _positive(self.batch_size, _join(key_path, "batch_size"))
        _positive(self.workers, _join(key_path, "workers"), allow_zero=True)


@dataclass(kw_only=True)
class PluginConfig(Section):
    """A registered plugin by name, with the keyword options of its factory."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DeltaConfig(Section):
    """The δ estimator. Its schedule (``every``, ``unit``, ``batches``, ``samples``,
    ``tol``, ``representative``, ``before_training``) is in its options."""

    name: str = "hessian"
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

    weights: int
    activations: int

    @classmethod
    def from_string(cls, text: str, key_path: str) -> dict[str, Any]:
        pair = parse_bits_label(text)
        if pair is None:
            raise ConfigError(
                key_path, f"expected {{weights: N, activations: N}} or 'W<N>A<N>', got {text!r}"
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
class OptimizerConfig(Section):
    name: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: sgd only
    momentum: float = 0.9
    #: sgd only
    nesterov: bool = False
    #: adam only
    betas: tuple[float, float] = (0.9, 0.999)

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
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError(
                _join(key_path, "nesterov"), "nesterov needs name: sgd and momentum > 0"
            )
        self.betas = (float(self.betas[0]), float(self.betas[1]))


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

    weights: WeightsOptimizerConfig = field(default_factory=WeightsOptimizerConfig)
    quantizer: QuantizerOptimizerConfig = field(default_factory=QuantizerOptimizerConfig)


@dataclass(kw_only=True)
class ScheduleConfig(Section):
    """Learning-rate schedule of both optimizers: ``cosine`` anneals to
    ``final_lr_factor`` × lr (0 by default), after an optional linear warm-up from
    ``warmup_start_factor`` × lr; ``constant`` keeps it."""

    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    final_lr_factor: float = 0.0
    #: update the learning rate after every epoch (the paper's code) or every step
    unit: Literal["epoch", "step"] = "epoch"

    def check(self, key_path: str) -> None:
        _positive(self.warmup_epochs, _join(key_path, "warmup_epochs"), allow_zero=True)
        _positive(self.warmup_start_factor, _join(key_path, "warmup_start_factor"), allow_zero=True)
        _positive(self.final_lr_factor, _join(key_path, "final_lr_factor"), allow_zero=True)


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

    model: ModelConfig
    data: DataConfig
    method: PluginConfig
    #: the backward rule at every round site: ste, ewgs, or a plugin's
    backward: str
    bits: BitsConfig
    epochs: int
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    #: quantize the first and last layers (null: the method's default; PROFIT: yes)
    quantize_first_last: bool | None = None
    optimizers: OptimizersConfig = field(default_factory=OptimizersConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

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
            raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name, options in self.callbacks.items():
            if name == "delta":
                raise ConfigError(
                    "callbacks.delta", "the δ schedule is always on; configure it under delta:"
                )
            if not (options is None or isinstance(options, (Mapping, bool))):
                raise ConfigError(
                    f"callbacks.{name}",
                    f"expected a mapping of options, null (no options) or false (off), "
                    f"got {options!r}",
                )

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every key, defaults filled in) as plain YAML data."""
        return _plain(dataclasses.asdict(self))

    # -- building what the recipe names (the trainer and validation use the same code)

    def make_method(self) -> Any:
        return _create("method", self.method.name, self.method.options, "method")

    def make_backward(self) -> Any:
        from .registry import registry

        return registry().create("backward", self.backward, None, "backward")

    def make_delta(self) -> Any:
        return _create("delta", self.delta.name, self.delta.options, "delta")

    def make_dataset(self) -> Any:
        """The dataset plugin's ``data.DatasetSpec`` (cheap: no data is read)."""
        return _create("dataset", self.data.name, self.data.options, "data")

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
        from .registry import registry

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
                raise ConfigError("device", f"{self.device!r} asked for, but CUDA is not available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(
                    "device",
                    f"{self.device!r} asked for, but there are "
                    f"{torch.cuda.device_count()} CUDA devices",
                )
        return device


def _create(kind: str, name: str, options: Mapping[str, Any], section: str) -> Any:
    """Build the plugin ``name`` of ``kind`` named at ``section.name`` with the options
    at ``section.options``."""
    from .registry import KINDS, registry

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


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse_section(cls: type[Section], data: Any, key_path: str) -> Section:
    if isinstance(data, str):
        data = cls.from_string(data, key_path)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = ", ".join(fields)
    if not isinstance(data, Mapping):
        raise ConfigError(key_path, f"expected a mapping with keys {known}, got {data!r}")
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
        if isinstance(hint, type) and issubclass(hint, Section):
            values[name] = _parse_section(hint, data[name], path)
        else:
            values[name] = check_type(data[name], hint, path)
    section = cls(**values)
    section.check(key_path)
    return section


def _describe(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Section):
        keys = ", ".join(f.name for f in dataclasses.fields(hint))  # type: ignore[arg-type]
        return f"a mapping with keys {keys}"
    return describe_type(hint)


def _section_type(path: Sequence[str]) -> type[Section] | None:
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


# ---------------------------------------------------------------- overrides, matrix


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key path, value parsed as YAML)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z0-9_][\w-]*)*", key):
        raise ConfigError("", f"expected key.path=value on the command line, got {text!r}")
    return key, parse_yaml(value, f"command line override {text!r}")


def set_path(data: dict[str, Any], key_path: str, value: Any) -> None:
    """Set a dotted key path in raw recipe data, making mappings on the way; a shorthand
    string where a section is (``method: lsq``) is expanded first."""
    keys = key_path.split(".")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        section = _section_type(keys[: depth + 1])
        if isinstance(child, str) and section is not None:
            child = section.from_string(child, ".".join(keys[: depth + 1]))
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(where, f"is {child!r}, not a mapping, so {key_path} cannot be set")
        node[key] = child
        node = child
    node[keys[-1]] = copy.deepcopy(value)


@dataclass
class Run:
    """One run of a recipe: its name (the sub-directory under ``compare``; empty for a
    recipe without a matrix) and its checked recipe."""

    name: str
    recipe: Recipe


_NAME_AXES = {"method", "backward", "model", "data", "delta"}


def _value_label(key: str, value: Any) -> str:
    """A short label of one matrix value, for the run's directory name."""
    if isinstance(value, Mapping) and "name" in value:
        value = value["name"]
    if key == "bits":
        if isinstance(value, Mapping):
            return f"W{value.get('weights')}A{value.get('activations')}"
        return str(value).upper()
    if key == "seed":
        return f"seed{value}"
    if key.removesuffix(".name") in _NAME_AXES:
        return str(value)
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
    return f"{key.rsplit('.', 1)[-1]}={str(text).strip().removesuffix('...').strip()}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_") or "run"


def expand_runs(
    data: Any, *, source: str, overrides: Iterable[str] = (), default_output: str = "runs/recipe"
) -> list[Run]:
    """Check raw recipe data (a parsed YAML mapping) with ``overrides`` applied and
    expand its ``matrix``. Errors name ``source``, or the override they came from, and
    a key set by the matrix by its matrix entry (``matrix.bits[1].weights``)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"a recipe must be a mapping of keys, got {data!r}", source)
    data = copy.deepcopy(data)
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        origins[key] = f"command line override {text!r}"
        with _error_source(source, origins):
            set_path(data, key, value)
    matrix = data.pop("matrix", None) or {}
    if not isinstance(matrix, Mapping):
        raise ConfigError("matrix", f"expected a mapping key.path -> list, got {matrix!r}", source)
    axes: list[tuple[str, list[Any]]] = []
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"matrix.{key}", f"expected a non-empty list of values, got {values!r}", source
            )
        axes.append((str(key), values))
    for key, origin in origins.items():
        for axis, _ in axes:
            if _under(key, axis):
                raise ConfigError(
                    key, f"is set by matrix.{axis}; override matrix.{axis}=[...] instead", origin
                )
    base_output = data.get("output") or default_output
    runs: list[Run] = []
    for combination in itertools.product(*(range(len(values)) for _, values in axes)):
        run_data = copy.deepcopy(data)
        renames = {key: f"matrix.{key}[{index}]" for (key, _), index in zip(axes, combination)}
        with _error_source(source, origins, renames):
            for (key, values), index in zip(axes, combination):
                set_path(run_data, key, values[index])
            labels = [_value_label(key, values[i]) for (key, values), i in zip(axes, combination)]
            name = _safe_name("-".join(labels)) if axes else ""
            run_data["output"] = str(Path(base_output) / name) if name else base_output
            recipe = _parse_section(Recipe, run_data, "")
            assert isinstance(recipe, Recipe)
            validate(recipe)
        runs.append(Run(name, recipe))
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            "matrix", f"two runs would share the directory name {duplicates[0]!r}", source
        )
    return runs


@contextlib.contextmanager
def _error_source(
    source: str, origins: Mapping[str, str], renames: Mapping[str, str] | None = None
) -> Iterator[None]:
    """A ConfigError raised inside gets its source: the file, or the command-line
    override that set its key; a key set by the matrix is named by its matrix entry."""
    try:
        yield
    except ConfigError as error:
        if error.source:
            raise
        path, where = error.key_path, source
        for key, origin in origins.items():
            if _under(path, key):
                where = origin
        for key, new in (renames or {}).items():
            if _under(path, key):
                path, where = new + path[len(key) :] if path.startswith(key) else new, source
                break
        raise ConfigError(path, error.message, where) from None


def _under(path: str, key: str) -> bool:
    """Whether ``path`` is ``key``, below it, or above it."""
    return path == key or path.startswith(key + ".") or key.startswith(path + ".")


def load_runs(path: str | Path, overrides: Iterable[str] = ()) -> list[Run]:
    """Read, check and expand a recipe file into its runs."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", "recipe file not found", source) from None
    except OSError as error:
        raise ConfigError("", f"cannot read the recipe: {error}", source) from None
    return expand_runs(
        parse_yaml(text, source),
        source=source,
        overrides=overrides,
        default_output=str(Path("runs") / path.stem),
    )


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """The single run of a recipe file (a matrix must expand into exactly one run)."""
    runs = load_runs(path, overrides)
    if len(runs) != 1:
        raise ConfigError(
            "matrix",
            f"expands into {len(runs)} runs; train them all with `ewgs compare`, or pick "
            "one with overrides (matrix=null method.name=... backward=...)",
            str(path),
        )
    return runs[0].recipe


# -------------------------------------------------------------------- validation


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
