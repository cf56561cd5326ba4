"""The plots of the ``mechanism`` callback's file (``ewgs_plugins.mechanism``): per
quantized layer over the epochs, the clip fraction, |x_n − x_q|, the flips and δ of the
weights, every arm of a comparison side by side (``ewgs report`` draws them for the runs
that have the file)."""

from __future__ import annotations

import re
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import rundir
from .report_plots import file_name
from .results import RunResult, row_key, varying_keys

#: what the plots show, row by row: (key in a layer's row, axis label)
PLOTTED = (
    ("clip_fraction", "latents at/beyond clip"),
    ("error", "mean |x_n − x_q|"),
    ("flips_per_weight", "flips per weight"),
    ("delta_weight", "δ (weights)"),
)


def arm_label(name: str) -> str:
    """A run directory's name without its seed label: ``ewgs-paper`` for
    ``ewgs-paper-seed0`` and for ``seed0-ewgs-paper``."""
    return "-".join(part for part in name.split("-") if not re.fullmatch(r"seed\d+", part))


def mean_curves(run_dirs: Sequence[Path], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per layer: (epochs counted from 1, ``key`` averaged over the runs) for the epochs
    every run has; layers or epochs where ``key`` is null are left out."""
    histories = [rundir.read_mechanism(path) for path in run_dirs]
    length = min(len(rows) for rows in histories)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for index in range(length):
        epoch = int(histories[0][index]["epoch"]) + 1
        for layer in histories[0][index]["layers"]:
            values = [rows[index]["layers"].get(layer, {}).get(key) for rows in histories]
            if any(value is None for value in values):
                continue
            epochs, means = curves.setdefault(layer, ([], []))
            epochs.append(epoch)
            means.append(statistics.fmean(values))
    return curves


def plot_mechanism(columns: Mapping[str, Sequence[Path]], path: Path, title: str = "") -> Path:
    """One figure: a column per label (STE, EWGS, ...; each the mean over its runs, the
    seeds), a row per quantity of ``PLOTTED``, one line per layer coloured by depth
    (first layer dark, last light). Rows share their y axis, so columns compare."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot, no display
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(3.6 * len(columns) + 1.5, 2.6 * len(PLOTTED)), layout="constrained")
    grid = figure.subplots(len(PLOTTED), len(columns), squeeze=False, sharex=True, sharey="row")
    shades = colormaps["viridis"]
    for column, (label, run_dirs) in enumerate(columns.items()):
        for row, (key, axis_label) in enumerate(PLOTTED):
            axis = grid[row][column]
            curves = mean_curves(run_dirs, key)
            for index, (layer, (epochs, values)) in enumerate(curves.items()):
                shade = index / max(1, len(curves) - 1)
                axis.plot(epochs, values, color=shades(0.9 * shade), lw=1, label=layer)
            if not curves:
                axis.text(
                    0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes
                )
            if row == 0:
                heading = textwrap.fill(f"{label} (n={len(run_dirs)})", 48)
                axis.set_title(heading, fontsize="small")
            if column == 0:
                axis.set_ylabel(axis_label)
            if row == len(PLOTTED) - 1:
                axis.set_xlabel("epoch")
            if key == "delta_weight":  # δ spans decades (the paper's fixed 1e-3 to ~0.1)
                axis.set_yscale("symlog", linthresh=1e-4)
            axis.grid(alpha=0.3)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = grid[0][-1].get_legend_handles_labels()
    if handles:
        figure.legend(
            handles,
            labels,
            loc="outside right center",
            fontsize="x-small",
            title="layer",
            title_fontsize="small",
        )
    if title:
        figure.suptitle(title)
    rundir.save_figure(figure, path, dpi=100)
    return path


def plot_mechanism_runs(runs: Sequence[RunResult], directory: Path) -> list[Path]:
    """``plot_mechanism`` for every method × bits among ``runs`` that has mechanism data:
    a column per backward rule and setting (the other recipe keys that vary, say the δ
    protocol), the runs of a column being its seeds; STE columns first. A
    column is labelled by its runs' directory name without the seed (``ewgs-paper`` for
    ``ewgs-paper-seed0``, ``-seed1``, ...) when they share one, else by its settings.
    Returns the figures written into ``directory``."""
    measured = [run for run in runs if rundir.read_mechanism(run.path)]
    keys = varying_keys(measured)

    def setting(run: RunResult) -> str:
        return row_key(run, keys)[2]

    order = {"ste": 0, "ewgs": 1}
    written: list[Path] = []
    for method, bits in sorted({(run.method, run.bits) for run in measured}):
        groups: dict[tuple[str, str], list[RunResult]] = {}
        chosen = [run for run in measured if (run.method, run.bits) == (method, bits)]
        for run in sorted(chosen, key=lambda r: (order.get(r.backward, 2), setting(r))):
            groups.setdefault((run.backward, setting(run)), []).append(run)
        columns: dict[str, list[Path]] = {}
        for (backward, setting), group in groups.items():
            names = {arm_label(run.path.name) for run in group}
            label = names.pop() if len(names) == 1 else ""
            if not label or label in columns:
                label = " ".join(filter(None, [backward.upper(), setting]))
            columns[label] = [run.path for run in group]
        path = directory / file_name("mechanism", method, bits)
        written.append(plot_mechanism(columns, path, title=f"{method} {bits}: per layer"))
    return written
