"""Reports from run directories: a Markdown table of test top-1 per method × backward ×
bits (mean ± std over seeds, EWGS − STE) and PNG plots (loss and accuracy curves, STE
vs EWGS, per method; δ per round site over training, as the paper's Fig. 3)."""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import provenance, rundir
from .errors import ConfigError
from .recipe import flatten

#: keys that make the table's rows and columns (or are expected to differ)
_AXES = ("method.name", "backward", "bits.weights", "bits.activations", "seed", "output")


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
    def finished(self) -> bool:
        return len(self.metrics) >= int(self.recipe["epochs"])

    @property
    def final_top1(self) -> float:
        return float(self.metrics[-1]["test_top1"])

    @property
    def best_top1(self) -> float:
        return max(float(row["test_top1"]) for row in self.metrics)


def read_run(path: Path) -> RunResult | None:
    """The run in ``path``, or None if it holds no run with at least one epoch."""
    recipe, metrics = rundir.read_recipe(path), rundir.read_metrics(path)
    if recipe is None or not metrics:
        return None
    return RunResult(path, recipe, metrics, rundir.read_deltas(path))


def find_runs(directory: str | Path) -> list[RunResult]:
    """Every run in ``directory`` (itself, or any folder below it)."""
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
            if any(key == a or key.startswith(a + ".") for a in _AXES):
                continue
            if len({json.dumps(flat.get(key), sort_keys=True) for flat in flats}) > 1:
                keys.add(key)
    return sorted(keys)


def _row_key(run: RunResult, keys: Sequence[str]) -> tuple[str, str, str]:
    flat = flatten(run.recipe)
    others = ", ".join(f"{k}={flat.get(k)}" for k in keys)
    return run.method, run.bits, others


def _backward_order(runs: Sequence[RunResult]) -> list[str]:
    found = {run.backward for run in runs}
    return [b for b in ("ste", "ewgs") if b in found] + sorted(found - {"ste", "ewgs"})


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def table(runs: Sequence[RunResult]) -> str:
    """The Markdown table: final test top-1 per method × bits (× other varying keys)
    and backward rule, mean ± sample std over seeds, and EWGS − STE of the means."""
    keys = varying_keys(runs)
    backwards = _backward_order(runs)
    both = "ste" in backwards and "ewgs" in backwards
    header = ["method", "bits", *(["settings"] if keys else []), *(b.upper() for b in backwards)]
    if both:
        header.append("EWGS − STE")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    finished = [run for run in runs if run.finished]
    rows = sorted({_row_key(run, keys) for run in finished})
    for method, bits, others in rows:
        values = {
            b: [
                run.final_top1
                for run in finished
                if _row_key(run, keys) == (method, bits, others) and run.backward == b
            ]
            for b in backwards
        }
        cells = [method, bits, *([others] if keys else []), *(_cell(values[b]) for b in backwards)]
        if both:
            ok = values["ste"] and values["ewgs"]
            diff = (
                statistics.fmean(values["ewgs"]) - statistics.fmean(values["ste"]) if ok else None
            )
            cells.append(f"{diff:+.2f}" if diff is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _runs_table(runs: Sequence[RunResult], root: Path) -> str:
    lines = [
        "| run | method | backward | bits | seed | epochs | final top-1 | best top-1 | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: str(r.path)):
        name = str(run.path.relative_to(root)) if run.path != root else run.path.name
        done = f"{len(run.metrics)}/{run.recipe['epochs']}"
        if not run.finished:
            done += " (unfinished)"
        seconds = sum(float(row.get("time_s", 0.0)) for row in run.metrics)
        lines.append(
            f"| {name} | {run.method} | {run.backward} | {run.bits} | {run.seed} | {done} | "
            f"{run.final_top1:.2f} | {run.best_top1:.2f} | {seconds:.1f} |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------- plots


def _figure(width: float, height: float, columns: int) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot, no display

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


_STYLES = {"ste": "--", "ewgs": "-"}


def _mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[int], list[float]]:
    length = min(len(run.metrics) for run in runs)
    epochs = [int(runs[0].metrics[i]["epoch"]) + 1 for i in range(length)]
    values = [statistics.fmean(float(run.metrics[i][key]) for run in runs) for i in range(length)]
    return epochs, values


def plot_curves(runs: Sequence[RunResult], method: str, path: Path) -> Path:
    """Training loss and test top-1 per epoch, one line per backward × bits (× other
    settings), averaged over seeds: STE dashed, EWGS solid."""
    from matplotlib.ticker import MaxNLocator

    keys = varying_keys(runs)
    chosen = [run for run in runs if run.method == method]
    figure, (loss_axis, top1_axis) = _figure(11, 4, 2)
    settings = sorted({_row_key(run, keys)[1:] for run in chosen})
    colors = [f"C{i % 10}" for i in range(len(settings))]
    for setting, color in zip(settings, colors):
        for backward in _backward_order(chosen):
            group = [
                r for r in chosen if _row_key(r, keys)[1:] == setting and r.backward == backward
            ]
            if not group:
                continue
            label = " ".join(filter(None, [backward.upper(), *setting])) + f" (n={len(group)})"
            style = _STYLES.get(backward, ":")
            for axis, key in ((loss_axis, "train_loss"), (top1_axis, "test_top1")):
                axis.plot(*_mean_curve(group, key), style, color=color, label=label)
    loss_axis.set(title=f"{method}: training loss", xlabel="epoch", ylabel="loss")
    top1_axis.set(title=f"{method}: test top-1", xlabel="epoch", ylabel="top-1 (%)")
    top1_axis.legend(fontsize="small")
    for axis in (loss_axis, top1_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=110)
    return path


def plot_deltas(run: RunResult, path: Path) -> Path:
    """δ of every round site over training (weights and activations apart), as the
    paper's Fig. 3: a step function of the epoch, from the run's deltas.jsonl."""
    steps_per_epoch = max(1, int(run.metrics[0]["step"]))
    end = len(run.metrics)
    figure, axes = _figure(11, 4, 2)
    sites = list(run.deltas[-1]["deltas"])
    for axis, kind in zip(axes, ("weight", "input")):
        chosen = [s for s in sites if s.endswith("." + kind)]
        for index, site in enumerate(chosen):
            x = [row["step"] / steps_per_epoch for row in run.deltas] + [end]
            y = [row["deltas"].get(site, 0.0) for row in run.deltas]
            y.append(y[-1])
            label = site.removesuffix("." + kind)
            axis.step(x, y, where="post", color=f"C{index % 10}", label=label)
        title = "weights" if kind == "weight" else "activations"
        axis.set(title=f"δ per layer ({title})", xlabel="epoch", ylabel="δ")
        axis.grid(alpha=0.3)
        if 0 < len(chosen) <= 12:
            axis.legend(fontsize="x-small")
    figure.suptitle(f"{run.method} {run.backward.upper()} {run.bits} seed {run.seed}")
    figure.savefig(path, dpi=110)
    return path


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "_".join(p for p in parts if p)) + ".png"


def write_report(directory: str | Path) -> Path:
    """Write ``report.md`` and the plots into ``directory`` from the runs in it."""
    directory = Path(directory)
    runs = find_runs(directory)
    mixed = provenance.mixed_versions_warning(run.path for run in runs)
    if mixed:
        print(f"ewgs: warning: {mixed}", file=sys.stderr)
    keys = varying_keys(runs)
    plots: list[Path] = []
    for method in sorted({run.method for run in runs}):
        plots.append(plot_curves(runs, method, directory / _file_name("curves", method)))
    shown: set[tuple[str, str, str]] = set()
    for run in sorted(runs, key=lambda r: (r.seed, str(r.path))):
        key = _row_key(run, keys)
        if run.backward == "ste" or len(run.deltas) < 2 or key in shown:
            continue
        shown.add(key)
        name = _file_name("deltas", run.method, run.backward, run.bits, str(len(shown)))
        plots.append(plot_deltas(run, directory / name))
    unfinished = sum(not run.finished for run in runs)
    text = [
        f"# EWGS vs STE: {directory.name}",
        "",
        "Test top-1 (%) after the last epoch, mean ± sample std over seeds "
        "(n = number of runs); EWGS − STE is the difference of the means."
        + (f" {unfinished} unfinished run(s) are left out of this table." if unfinished else ""),
        "",
        table(runs),
        "",
        *([f"**Warning:** {mixed}.", ""] if mixed else []),
        "## Runs",
        "",
        _runs_table(runs, directory),
        "",
        "## Plots",
        "",
        *(f"![{plot.stem}]({plot.name})" for plot in plots),
        "",
    ]
    path = directory / rundir.REPORT
    path.write_text("\n".join(text))
    return path
