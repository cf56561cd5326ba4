"""The run directory: the one module that knows its files and how they are written.

A run directory holds (names below are the constants of this module):

- ``recipe.yaml`` (``RECIPE``): the resolved recipe, every key, defaults filled in;
- ``metrics.jsonl`` / ``metrics.csv`` (``METRICS_JSONL`` / ``METRICS_CSV``): one row per
  finished epoch;
- ``deltas.jsonl`` (``DELTAS``): δ of every active round site each time it changes;
- ``mechanism.jsonl`` (``MECHANISM``): with the ``mechanism`` callback, what the backward
  rule does to the latent weights, per layer and epoch;
- ``checkpoint_last.pt`` / ``checkpoint_best.pt`` (``CHECKPOINT_LAST`` /
  ``CHECKPOINT_BEST``): everything a resume needs, in the format ``CHECKPOINT_FORMAT``;
- ``environment.json`` (``ENVIRONMENT``): what produced the run (command line, code
  version and git commit, library versions, devices, plugins; ``provenance``), written
  at every start;
- ``tensorboard/`` (``TENSORBOARD``): the event files of the ``tensorboard`` callback;
- files of the run's callbacks (PROFIT's ``profit.json``), written through
  ``write_atomic`` like everything else.

A folder of runs (``ewgs compare``) also holds ``report.md`` (``REPORT``), its numbers in
``summary.json`` (``SUMMARY``) and its plots.

Every file is replaced atomically (``write_atomic`` / ``save_atomic``: a temporary file
beside it, then ``os.replace``), so a reader never sees a half-written file. Under
torchrun only rank 0 writes (every process holds the same run).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from . import distributed
from .recipe.yaml_text import dump_yaml

RECIPE = "recipe.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
DELTAS = "deltas.jsonl"
#: written by the ``mechanism`` callback (``ewgs_plugins.mechanism``)
MECHANISM = "mechanism.jsonl"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
REPORT = "report.md"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"
ENVIRONMENT = "environment.json"
#: the ``format`` entry of a checkpoint
CHECKPOINT_FORMAT = "ewgs-checkpoint-1"
#: the header of a run's ``recipe.yaml``
RECIPE_HEADER = "# resolved recipe (every key, defaults filled in)\n"


# ------------------------------------------------------------------------- writing


def _replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then move it over ``path``; on rank 0
    only under torchrun."""
    if not distributed.is_main():
        return
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def write_atomic(path: Path, text: str) -> None:
    """Replace the text file ``path`` by ``text`` atomically."""
    _replace_atomic(path, lambda temporary: temporary.write_text(text))


def save_atomic(obj: Any, path: Path) -> None:
    """Replace ``path`` by ``torch.save(obj)`` atomically."""
    _replace_atomic(path, lambda temporary: torch.save(obj, temporary))


def copy_atomic(source: Path, path: Path) -> None:
    """Replace ``path`` by a copy of ``source`` atomically."""
    _replace_atomic(path, lambda temporary: shutil.copyfile(source, temporary))


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_recipe(run_dir: Path, recipe: Mapping[str, Any]) -> None:
    """``recipe.yaml``: the resolved recipe (plain data), under its header."""
    write_atomic(run_dir / RECIPE, RECIPE_HEADER + dump_yaml(recipe))


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (its columns: every key, first seen first)."""
    write_jsonl(run_dir / METRICS_JSONL, rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(run_dir / METRICS_CSV, text.getvalue())


def write_environment(run_dir: Path, environment: Mapping[str, Any]) -> None:
    """``environment.json`` (see ``provenance``)."""
    write_atomic(run_dir / ENVIRONMENT, json.dumps(environment, indent=2) + "\n")


def save_checkpoint(run_dir: Path, state: Mapping[str, Any], *, best: bool) -> None:
    """``checkpoint_last.pt``, and a copy as ``checkpoint_best.pt`` if ``best``."""
    last = run_dir / CHECKPOINT_LAST
    save_atomic(dict(state), last)
    if best:
        copy_atomic(last, run_dir / CHECKPOINT_BEST)


# ------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] if there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / METRICS_JSONL)


def read_deltas(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / DELTAS)


def read_environment(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``environment.json``, or None if it has none."""
    path = run_dir / ENVIRONMENT
    return json.loads(path.read_text()) if path.is_file() else None


def read_mechanism(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / MECHANISM)


def read_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The resolved recipe of ``run_dir`` as plain data, or None if it has none."""
    path = run_dir / RECIPE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state (tensors on the CPU; ``weights_only``: nothing but tensors
    and plain Python values is built)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def is_checkpoint(state: Any) -> bool:
    """Whether loaded ``state`` is a checkpoint of this trainer (not a bare state_dict)."""
    return isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT
