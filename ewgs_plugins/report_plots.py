"""The report's PNG plots: loss and accuracy curves per method (STE vs EWGS, averaged
over seeds) and per-run plots (δ per round site over training, as the paper's Fig. 3).

A plot of one run is a ``RunPlot`` in ``RUN_PLOTS``: add one there and every report
draws it, for the first seed of every setting it applies to."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import rundir
from .results import RunResult, backward_order, row_key, varying_keys

_STYLES = {"ste": "--", "ewgs": "-"}


def _figure(width: float, height: float, columns: int) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot, no display

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "_".join(p for p in parts if p)) + ".png"


def mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[int], list[float]]:
    """``key`` per epoch (1-based), averaged at each epoch over the runs that reached it."""
    values: dict[int, list[float]] = {}
    for run in runs:
        for row in run.metrics:
            values.setdefault(int(row["epoch"]) + 1, []).append(float(row[key]))
    epochs = sorted(values)
    return epochs, [statistics.fmean(values[epoch]) for epoch in epochs]


def curve_runs(group: Sequence[RunResult]) -> tuple[list[RunResult], str]:
    """The runs a group's mean curve averages, and what its legend says about them: the
    finished runs (the table's runs), so that an unfinished run neither cuts the curve
    short nor bends it where it stops; a group with no finished run shows its
    unfinished ones."""
    finished = [run for run in group if run.finished]
    left_out = len(group) - len(finished)
    if not finished:
        return list(group), f"{len(group)} unfinished"
    note = f"; {left_out} unfinished left out" if left_out else ""
    return finished, f"n={len(finished)}{note}"


@dataclass(frozen=True)
class CurveLine:
    """One line pair of a method's curves: a backward rule × setting, averaged."""

    label: str
    backward: str
    color: str
    epochs: list[int]
    train_loss: list[float]
    test_top1: list[float]


def curve_lines(runs: Sequence[RunResult], method: str) -> list[CurveLine]:
    """The lines of ``method``'s curves: one per backward × bits (× other settings),
    averaged over the finished runs' seeds (``curve_runs``)."""
    keys = varying_keys(runs)
    chosen = [run for run in runs if run.method == method]
    settings = sorted({row_key(run, keys)[1:] for run in chosen})
    lines = []
    for index, setting in enumerate(settings):
        for backward in backward_order(chosen):
            group = [
                r for r in chosen if row_key(r, keys)[1:] == setting and r.backward == backward
            ]
            if not group:
                continue
            averaged, count = curve_runs(group)
            epochs, loss = mean_curve(averaged, "train_loss")
            label = " ".join(filter(None, [backward.upper(), *setting])) + f" ({count})"
            color = f"C{index % 10}"
            lines.append(
                CurveLine(
                    label, backward, color, epochs, loss, mean_curve(averaged, "test_top1")[1]
                )
            )
    return lines


def plot_curves(runs: Sequence[RunResult], method: str, path: Path) -> Path:
    """Training loss and test top-1 per epoch (``curve_lines``): STE dashed, EWGS solid."""
    from matplotlib.ticker import MaxNLocator

    lines = curve_lines(runs, method)
    # the legend goes below both axes: a study's settings labels are long
    figure, (loss_axis, top1_axis) = _figure(11, 4 + 0.22 * len(lines), 2)
    for line in lines:
        style = _STYLES.get(line.backward, ":")
        for axis, values in ((loss_axis, line.train_loss), (top1_axis, line.test_top1)):
            axis.plot(line.epochs, values, style, color=line.color, label=line.label)
    loss_axis.set(title=f"{method}: training loss", xlabel="epoch", ylabel="loss")
    top1_axis.set(title=f"{method}: test top-1", xlabel="epoch", ylabel="top-1 (%)")
    figure.legend(
        *loss_axis.get_legend_handles_labels(), loc="outside lower center", fontsize="small"
    )
    for axis in (loss_axis, top1_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    rundir.save_figure(figure, path, dpi=110)
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
    rundir.save_figure(figure, path, dpi=110)
    return path


@dataclass(frozen=True)
class RunPlot:
    """A plot of one run: ``draw(run, path)`` for the first seed of every setting and
    backward rule where ``applies(run)``; files ``<name>_<method>_<rule>_<bits>_<i>.png``."""

    name: str
    applies: Callable[[RunResult], bool]
    draw: Callable[[RunResult, Path], Path]


#: every per-run plot of the report
RUN_PLOTS: tuple[RunPlot, ...] = (
    RunPlot("deltas", lambda run: run.backward != "ste" and len(run.deltas) >= 2, plot_deltas),
)


def write_plots(runs: Sequence[RunResult], directory: Path) -> list[Path]:
    """Every plot of the report, written into ``directory``: the curves of each method,
    then each ``RUN_PLOTS`` entry."""
    plots = [
        plot_curves(runs, method, directory / file_name("curves", method))
        for method in sorted({run.method for run in runs})
    ]
    keys = varying_keys(runs)
    ordered = sorted(runs, key=lambda r: (not r.finished, r.seed, str(r.path)))
    for plot in RUN_PLOTS:
        shown: set[tuple[str, str, str, str]] = set()
        for run in ordered:
            key = (*row_key(run, keys), run.backward)
            if key in shown or not plot.applies(run):
                continue
            shown.add(key)
            name = file_name(plot.name, run.method, run.backward, run.bits, str(len(shown)))
            plots.append(plot.draw(run, directory / name))
    return plots
