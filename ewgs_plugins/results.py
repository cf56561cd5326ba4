"""Finished and unfinished runs read back from their run directories: the resolved
recipe, the metrics rows and the δ history, for the report and its plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import rundir
from .data import evaluated_split
from .errors import ConfigError, RunDirError
from .recipe import flatten, with_defaults

#: keys that make the table's rows and columns (or are expected to differ)
AXES = ("method.name", "backward", "bits.weights", "bits.activations", "seed", "output")
#: keys in which the two runs of a pair may differ: the rule compared, and where it ran
PAIR_FREE_KEYS = ("backward", "output")
#: the recipe section that has no effect under the STE rule (nothing is estimated: the
#: gradient is g_q whatever δ is), so an STE run pairs across its settings
DELTA_SECTION = "delta"


@dataclass
class RunResult:
    """What a run directory holds: its resolved recipe, metrics rows and δ history."""

    path: Path
    recipe: dict[str, Any]
    metrics: list[dict[str, Any]]
    deltas: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return str(self.recipe["method"]["name"])

    @property
    def backward(self) -> str:
        return str(self.recipe["backward"])

    @property
    def bits(self) -> str:
        bits = self.recipe["bits"]
        return f"W{bits['weights']}A{bits['activations']}"

    @property
    def seed(self) -> int:
        return int(self.recipe["seed"])

    @property
    def evaluated(self) -> str:
        """What the run's top-1 was measured on: ``official test set`` or ``validation
        from train[a:b]`` (``data.val``)."""
        return evaluated_split(str(self.recipe.get("data", {}).get("val", "test")))

    @property
    def epochs(self) -> int:
        """The epochs the recipe asks for."""
        return int(self.recipe["epochs"])

    @property
    def diverged(self) -> bool:
        """A non-finite number (NaN, ±inf) in its metrics: the run is not a result."""
        return any(
            isinstance(value, float) and not math.isfinite(value)
            for row in self.metrics
            for value in row.values()
        )

    @property
    def finished(self) -> bool:
        """Every epoch done, and not diverged."""
        return len(self.metrics) >= self.epochs and not self.diverged

    @property
    def final_top1(self) -> float:
        return float(self.metrics[-1]["test_top1"])

    @property
    def best_top1(self) -> float:
        return max(float(row["test_top1"]) for row in self.metrics)

    @property
    def final_train_loss(self) -> float:
        return float(self.metrics[-1]["train_loss"])

    @property
    def final_ema_top1(self) -> float | None:
        """Test top-1 of the weight average (the ``ema`` callback), if the run has one."""
        value = self.metrics[-1].get("ema_test_top1")
        return None if value is None else float(value)

    def settings(self) -> dict[str, Any]:
        """The flattened recipe without the keys a pair may differ in, nor the seed:
        runs with equal settings are one group of the comparison."""
        flat = flatten(self.recipe)
        return {k: v for k, v in flat.items() if k not in (*PAIR_FREE_KEYS, "seed")}

    def settings_but_delta(self) -> dict[str, Any]:
        """``settings`` without the δ section: what an STE run must share with a run it
        pairs with, δ having no effect under STE."""
        prefix = DELTA_SECTION + "."
        return {
            k: v
            for k, v in self.settings().items()
            if k != DELTA_SECTION and not k.startswith(prefix)
        }

    def name(self, root: Path) -> str:
        """The run's directory, relative to ``root`` where it lies below it."""
        if self.path == root:
            return self.path.name
        try:
            return str(self.path.relative_to(root))
        except ValueError:
            return str(self.path)


def read_run(path: Path) -> RunResult | None:
    """The run in ``path``, or None if it holds no run with at least one epoch."""
    recipe, metrics = rundir.read_recipe(path), rundir.read_metrics(path)
    if recipe is None or not metrics:
        return None
    run = RunResult(path, with_defaults(recipe), metrics, rundir.read_deltas(path))
    try:  # what the report reads of every run
        _ = (
            run.method,
            run.backward,
            run.bits,
            run.seed,
            run.epochs,
            run.final_top1,
            run.best_top1,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RunDirError(
            f"{path}: {rundir.RECIPE} or {rundir.METRICS_JSONL} is damaged "
            f"({type(error).__name__}: {str(error)[:100]}); they are not a run's"
        ) from None
    return run


def find_runs(directory: str | Path) -> list[RunResult]:
    """Every run in ``directory`` (itself, or any folder below it), sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError("", f"{directory}: no such directory")
    folders = sorted({p.parent for p in directory.rglob(rundir.METRICS_JSONL)})
    runs = [run for run in map(read_run, folders) if run is not None]
    if not runs:
        raise ConfigError(
            "",
            f"{directory}: no run found (a run directory holds {rundir.RECIPE} and "
            f"{rundir.METRICS_JSONL})",
        )
    return runs


def varying_keys(runs: Sequence[RunResult]) -> list[str]:
    """Recipe keys, other than method, backward, bits and seed, whose values differ
    between runs of one method: they split the table's rows."""
    keys: set[str] = set()
    for method in {run.method for run in runs}:
        flats = [flatten(run.recipe) for run in runs if run.method == method]
        for key in set().union(*flats):
            if any(key == a or key.startswith(a + ".") for a in AXES):
                continue
            if len({json.dumps(flat.get(key), sort_keys=True) for flat in flats}) > 1:
                keys.add(key)
    return sorted(keys)


def row_key(run: RunResult, keys: Sequence[str]) -> tuple[str, str, str]:
    """(method, bits, the other varying keys as ``key=value, ...``): a row of the tables.
    A key the run's recipe does not set (``None``: a δ option of another estimator, say)
    is left out."""
    flat = flatten(run.recipe)
    others = ", ".join(f"{k}={flat[k]}" for k in keys if flat.get(k) is not None)
    return run.method, run.bits, others


def backward_order(runs: Sequence[RunResult]) -> list[str]:
    """The backward rules of ``runs``: STE first, then EWGS, then any other by name."""
    found = {run.backward for run in runs}
    return [b for b in ("ste", "ewgs") if b in found] + sorted(found - {"ste", "ewgs"})
