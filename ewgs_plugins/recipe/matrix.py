"""Command-line overrides (``key.path=value``) and the ``matrix:`` that expands one recipe
into several runs: each matrix key is a dotted key path and each value a list; the runs
are the Cartesian product, in the order written, each checked by ``validate``.

One matrix key is not a key path: ``arms``, a mapping of named arms, each a mapping of key
paths to values that the arm sets together (``ste: {backward: ste}``, ``ewgs-fixed:
{backward: ewgs, delta: {name: fixed}}``). It is one axis of the product, whose run label
is the arm's name: how a study compares settings that are not a product (one STE
baseline against several EWGS variants). An arm's setting replaces what the recipe, with
the command line's overrides, holds at its key, so an override reaches the arms that do
not set it (or a section above it); an override that no arm would see is refused."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, quote
from .schema import Recipe, parse_section, section_type
from .validate import validate
from .yaml_text import parse_yaml


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key path, value parsed as YAML)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(_KEY_PATH, key):
        raise ConfigError("", f"expected key.path=value on the command line, got {quote(text)}")
    return key, parse_yaml(value, f"command line override {quote(text)}")


def set_path(data: dict[str, Any], key_path: str, value: Any) -> None:
    """Set a dotted key path in raw recipe data, making mappings on the way; a shorthand
    string where a section is (``method: lsq``) is expanded first."""
    keys = key_path.split(".")
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        section = section_type(keys[: depth + 1])
        if isinstance(child, str) and section is not None:
            child = section.from_string(child, ".".join(keys[: depth + 1]))
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(
                where, f"is {quote(child)}, not a mapping, so {key_path} cannot be set"
            )
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
#: the most runs a matrix may expand into (checked before any run is made)
MAX_RUNS = 1000
#: the matrix key of named arms (not a key path)
ARMS = "arms"
_KEY_PATH = r"[A-Za-z_][\w-]*(\.[A-Za-z0-9_][\w-]*)*"


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
    data: Any,
    *,
    source: str,
    overrides: Iterable[str] = (),
    default_output: str = "runs/recipe",
    problems: list[ConfigError] | None = None,
) -> list[Run]:
    """Check raw recipe data (a parsed YAML mapping) with ``overrides`` applied and
    expand its ``matrix``. Errors name ``source``, or the override they came from, and
    a key set by the matrix by its matrix entry (``matrix.bits[1].weights``). With
    ``problems``, a run that fails its checks is left out and its error appended there
    (each message once) instead of raised."""
    if not isinstance(data, dict):
        raise ConfigError("", f"a recipe must be a mapping of keys, got {quote(data)}", source)
    data = copy.deepcopy(data)
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        origins[key] = f"command line override {quote(text)}"
        with _error_source(source, origins):
            set_path(data, key, value)
    matrix = data.pop("matrix", None) or {}
    if not isinstance(matrix, Mapping):
        raise ConfigError(
            "matrix", f"expected a mapping key.path -> list, got {quote(matrix)}", source
        )
    axes: list[tuple[str, list[Any]]] = []
    for key, values in matrix.items():
        if key == ARMS:
            values = _arms(values, source)
        elif not isinstance(values, list) or not values:
            raise ConfigError(
                f"matrix.{key}", f"expected a non-empty list of values, got {quote(values)}", source
            )
        axes.append((str(key), values))
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_RUNS:
        sizes = " × ".join(str(len(values)) for _, values in axes)
        raise ConfigError(
            "matrix",
            f"expands into {sizes} = {count} runs; a matrix may have at most {MAX_RUNS}",
            source,
        )
    for key, origin in origins.items():
        for axis, values in axes:
            problem = _check_override(key, axis, values)
            if problem:
                raise ConfigError(key, problem, origin)
    base_output = data.get("output") or default_output
    runs: list[Run] = []
    for combination in itertools.product(*(range(len(values)) for _, values in axes)):
        run_data = copy.deepcopy(data)
        chosen = [(key, values[index], index) for (key, values), index in zip(axes, combination)]
        renames: dict[str, str] = {}
        for key, value, index in chosen:
            if key == ARMS:
                renames.update({path: f"matrix.{ARMS}.{value[0]}.{path}" for path in value[1]})
            else:
                renames[key] = f"matrix.{key}[{index}]"
        try:
            with _error_source(source, origins, renames):
                for key, value, _ in chosen:
                    for path, setting in value[1].items() if key == ARMS else [(key, value)]:
                        set_path(run_data, path, setting)
                labels = [
                    value[0] if key == ARMS else _value_label(key, value)
                    for key, value, _ in chosen
                ]
                name = _safe_name("-".join(labels)) if axes else ""
                run_data["output"] = str(Path(base_output) / name) if name else base_output
                recipe = parse_section(Recipe, run_data, "")
                assert isinstance(recipe, Recipe)
                validate(recipe)
        except ConfigError as error:
            if problems is None:
                raise
            if str(error) not in {str(known) for known in problems}:
                problems.append(error)
            continue
        runs.append(Run(name, recipe))
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            "matrix", f"two runs would share the directory name {duplicates[0]!r}", source
        )
    return runs


def _arms(arms: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """``matrix.arms`` checked: (name, {key path: value}) per arm, in the order written."""
    if not isinstance(arms, Mapping) or not arms:
        raise ConfigError(
            f"matrix.{ARMS}",
            f"expected a mapping of named arms, each {{key.path: value, ...}}, got {quote(arms)}",
            source,
        )
    checked = []
    for name, settings in arms.items():
        where = f"matrix.{ARMS}.{name}"
        if not isinstance(name, str) or _safe_name(name) != name:
            raise ConfigError(
                where,
                "an arm's name is its runs' directory label: use letters, digits and _.=+-",
                source,
            )
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(
                where, f"expected a mapping key.path -> value, got {quote(settings)}", source
            )
        for path in settings:
            if not isinstance(path, str) or not re.fullmatch(_KEY_PATH, path):
                raise ConfigError(f"{where}.{path}", "expected a dotted key path", source)
        checked.append((name, dict(settings)))
    return checked


def _check_override(key: str, axis: str, values: list[Any]) -> str | None:
    """Why the override of ``key`` would be lost under the matrix ``axis``, or None. A
    plain axis sets its key in every run; an arm sets its keys in its own runs, so an
    override is lost only when every arm sets its key or a section above it (an arm's
    setting replaces what the recipe, overrides included, has there)."""
    if axis != ARMS:
        if _under(key, axis):
            return f"is set by matrix.{axis}; override matrix.{axis}=[...] instead"
        return None
    setters = [
        (name, path)
        for name, settings in values
        for path in settings
        if key == path or key.startswith(path + ".")
    ]
    if len({name for name, _ in setters}) < len(values):
        return None
    name, path = setters[0]
    return (
        f"is set by every arm of matrix.{ARMS}; override matrix.{ARMS}.{name}.{path}=... "
        "(each arm's own) instead"
    )


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
