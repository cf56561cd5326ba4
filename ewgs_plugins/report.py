"""Reports from run directories: STE against every other backward rule, paired by seed.

``report.md`` holds the table (per method × bits × other varying settings: test top-1
per rule, mean ± std over seeds, and the paired difference EWGS − STE with its 95 %
Student-t interval, wins/ties/losses and a verdict, beside the same for the final
training loss and the EMA model's top-1), the unpaired and unfinished runs, every run,
and the plots. ``summary.json`` holds the same numbers (schema: ``summary``). Which runs
pair is ``pairing``'s job, the statistic ``stats``'s, the plots ``report_plots``'s; the
README's "Reading a comparison" says how to read the result.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import provenance, rundir
from .mechanism_plots import plot_mechanism_runs
from .pairing import BASELINE, Analysis, Comparison, Group, analyse
from .report_plots import write_plots
from .results import RunResult, find_runs
from .stats import CONFIDENCE, PairedDifference

SUMMARY_VERSION = 2  # 2: shared_baseline

# ------------------------------------------------------------------------- tables


def _side_cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _diff_cell(diff: PairedDifference | None, digits: int) -> str:
    if diff is None:
        return "–"
    text = f"{diff.mean:+.{digits}f}"
    if diff.ci is not None:
        text += f" [{diff.ci[0]:+.{digits}f}, {diff.ci[1]:+.{digits}f}]"
    return f"{text} (n={diff.n})"


def _table(analysis: Analysis) -> str:
    keys = any(group.label for group in analysis.groups)
    rules = [r for r in analysis.rules if r != BASELINE] if analysis.paired else []
    ema = analysis.has_ema
    header = ["method", "bits", *(["settings"] if keys else []), *map(str.upper, analysis.rules)]
    level = f"{round(CONFIDENCE * 100)} % CI"
    for rule in rules:
        diff = f"{rule.upper()} − {BASELINE.upper()}"
        header += [f"{diff} ({level})", "W/T/L", "verdict", f"{diff} train loss ({level})"]
        header += [f"{diff} EMA top-1 ({level})"] if ema else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in analysis.groups:
        cells = [group.method, group.bits, *([group.label] if keys else [])]
        for rule in analysis.rules:
            cells.append(_side_cell([r.final_top1 for r in group.runs if r.backward == rule]))
        found = {c.rule: c for c in group.comparisons}
        for rule in rules:
            comparison = found.get(rule)
            top1 = comparison.top1 if comparison else None
            if top1 is None:
                cells += ["–", "–", "no pairs", "–"] + (["–"] if ema else [])
                continue
            cells += [
                _diff_cell(top1, 2),
                f"{top1.wins}/{top1.ties}/{top1.losses}",
                top1.verdict(rule.upper(), BASELINE.upper()),
                _diff_cell(comparison.train_loss, 4),
                *([_diff_cell(comparison.ema_top1, 2)] if ema else []),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(runs: Sequence[RunResult]) -> str:
    """The Markdown table of ``runs`` (see the module's docstring)."""
    return _table(analyse(runs))


def _notes(analysis: Analysis, root: Path) -> list[str]:
    """The runs outside the paired columns, one line each: unpaired and unfinished."""
    lines = []
    if not analysis.paired:
        lines.append(
            f"No paired comparison: it needs {BASELINE.upper()} runs and runs of another "
            f"backward rule (found: {', '.join(analysis.rules) or 'none'})."
        )
    shared = analysis.shared_baseline()
    if shared:
        lines += [
            "",
            f"Shared {BASELINE.upper()} runs ({len(shared)}, each the baseline of several rows: "
            f"δ has no effect under {BASELINE.upper()}, so one run pairs with every run of its "
            "seed whose recipe differs only in the backward rule and δ; those rows' differences "
            "share this side and are not independent):",
        ]
        position = {id(group): i for i, group in enumerate(analysis.groups, start=1)}
        by_rows: dict[str, list[str]] = {}
        for run, groups in shared:
            rows = ", ".join(str(position[id(group)]) for group in groups)
            by_rows.setdefault(rows, []).append(run.name(root))
        for rows, names in by_rows.items():
            lines.append(f"- {', '.join(names)}: the table's rows {rows} (from the top)")
    unpaired = [(run, why) for group in analysis.groups for run, why in group.unpaired]
    if unpaired:
        lines += ["", f"Unpaired runs ({len(unpaired)}, in no pair; in the per-rule columns only):"]
        for run, why in sorted(unpaired, key=lambda item: str(item[0].path)):
            lines.append(f"- {run.name(root)} ({run.backward.upper()}, seed {run.seed}): {why}")
    if analysis.left_out:
        lines += ["", f"Left out ({len(analysis.left_out)} unfinished run(s), in no column):"]
        for run in analysis.left_out:
            done = f"{len(run.metrics)} of {run.epochs} epochs"
            lines.append(
                f"- {run.name(root)}: "
                + ("diverged (non-finite metrics)" if run.diverged else done)
            )
    return lines


def _runs_table(runs: Sequence[RunResult], root: Path) -> str:
    lines = [
        "| run | method | backward | bits | seed | epochs | final top-1 | best top-1 | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: str(r.path)):
        state = " (diverged)" if run.diverged else "" if run.finished else " (unfinished)"
        done = f"{len(run.metrics)}/{run.epochs}{state}"
        seconds = sum(float(row.get("time_s", 0.0)) for row in run.metrics)
        lines.append(
            f"| {run.name(root)} | {run.method} | {run.backward} | {run.bits} | {run.seed} | "
            f"{done} | {run.final_top1:.2f} | {run.best_top1:.2f} | {seconds:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------- summary.json


def _diff_json(diff: PairedDifference | None) -> dict[str, Any] | None:
    if diff is None:
        return None
    return {
        "diff": diff.mean,
        "ci": list(diff.ci) if diff.ci is not None else None,
        "sd": diff.sd,
        "n": diff.n,
        "wins": diff.wins,
        "ties": diff.ties,
        "losses": diff.losses,
        "higher_is_better": diff.higher_is_better,
    }


def _pair_json(rule: str, base: RunResult, other: RunResult, root: Path) -> dict[str, Any]:
    def both(value: Any) -> dict[str, Any]:
        return {BASELINE: value(base), rule: value(other)}

    return {
        "seed": other.seed,
        "runs": both(lambda run: run.name(root)),
        "top1": both(lambda run: run.final_top1),
        "train_loss": both(lambda run: run.final_train_loss),
        "ema_top1": both(lambda run: run.final_ema_top1),
    }


def _comparison_json(comparison: Comparison, root: Path) -> dict[str, Any]:
    rule, top1 = comparison.rule, comparison.top1
    return {
        "rule": rule,
        "baseline": BASELINE,
        "n": len(comparison.pairs),
        "verdict": top1.verdict(rule.upper(), BASELINE.upper()) if top1 else "no pairs",
        "top1": _diff_json(top1),
        "train_loss": _diff_json(comparison.train_loss),
        "ema_top1": _diff_json(comparison.ema_top1),
        "pairs": [_pair_json(rule, base, other, root) for base, other in comparison.pairs],
    }


def _sides_json(group: Group, rules: Sequence[str]) -> dict[str, Any]:
    sides = {}
    for rule in rules:
        values = [run.final_top1 for run in group.runs if run.backward == rule]
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else None
            sides[rule] = {"n": len(values), "top1_mean": statistics.fmean(values), "top1_sd": sd}
    return sides


def _evaluated(runs: Sequence[RunResult]) -> str:
    """What the runs' top-1 was measured on (``RunResult.evaluated``), one phrase, or
    the phrases joined when runs differ."""
    return "; ".join(sorted({run.evaluated for run in runs}))


def summary(analysis: Analysis, root: Path) -> dict[str, Any]:
    """The report's numbers as JSON (``summary.json``); the README documents the schema."""
    index = {id(group): i for i, group in enumerate(analysis.groups)}
    groups = [
        {
            "method": group.method,
            "bits": group.bits,
            "settings": group.settings,
            "evaluated": _evaluated(group.runs),
            "runs": _sides_json(group, analysis.rules),
            "comparisons": [_comparison_json(c, root) for c in group.comparisons],
            "unpaired": [
                {"run": run.name(root), "backward": run.backward, "seed": run.seed, "reason": why}
                for run, why in group.unpaired
            ],
        }
        for group in analysis.groups
    ]
    return {
        "version": SUMMARY_VERSION,
        "confidence": CONFIDENCE,
        "baseline": BASELINE,
        "rules": analysis.rules,
        "evaluated": _evaluated([run for group in analysis.groups for run in group.runs]),
        "groups": groups,
        "shared_baseline": [
            {"run": run.name(root), "seed": run.seed, "groups": [index[id(g)] for g in rows]}
            for run, rows in analysis.shared_baseline()
        ],
        "left_out": [
            {
                "run": run.name(root),
                "epochs_done": len(run.metrics),
                "epochs": run.epochs,
                **({"diverged": True} if run.diverged else {}),
            }
            for run in analysis.left_out
        ],
    }


def _threads_changed(runs: Sequence[RunResult], root: Path) -> list[str]:
    """The runs resumed on the CPU with another thread count than they started with."""
    changed = []
    for run in sorted(runs, key=lambda r: str(r.path)):
        environment = rundir.read_environment(run.path)
        if environment is not None and provenance.threads_changed(environment):
            changed.append(run.name(root))
    return changed


# ------------------------------------------------------------------------ report


@dataclass
class Report:
    """What ``write_report`` wrote, and the table with its notes for the console."""

    markdown: Path
    summary: Path
    text: str


_CAPTION = (
    "Test top-1 (%) after the last epoch. Per rule: mean ± sample std over the finished runs (n)."
)
_PAIRED_CAPTION = (
    " {rule} − {base}: the mean of the paired differences (a pair is the two runs of one "
    "seed whose recipes differ only in the backward rule, and perhaps in δ, which has no "
    "effect under {base}) with its {level} % Student-t interval over the pairs; W/T/L "
    "counts the pairs where {rule} is above / equal to / below {base}; the verdict says "
    "whether the interval excludes 0. The train-loss column is the same statistic for the "
    "last epoch's training loss (lower is better){ema}. See the README's \"Reading a "
    'comparison" for what this can and cannot say.'
)
_EMA_CAPTION = "; EMA top-1: the same for the weight average's top-1, over the pairs that have one"


def _caption(analysis: Analysis) -> str:
    if not analysis.paired:
        return _CAPTION
    return _CAPTION + _PAIRED_CAPTION.format(
        rule=" / ".join(r.upper() for r in analysis.rules if r != BASELINE),
        base=BASELINE.upper(),
        level=round(CONFIDENCE * 100),
        ema=_EMA_CAPTION if analysis.has_ema else "",
    )


def write_report(directory: str | Path) -> Report:
    """Write ``report.md``, ``summary.json`` and the plots into ``directory`` from the
    runs in it (or below it)."""
    directory = Path(directory)
    runs = find_runs(directory)
    for folder in {directory, *(run.path for run in runs)}:  # what killed writers left
        rundir.remove_stale_temporary_files(folder)
    mixed = provenance.mixed_versions_warning(run.path for run in runs)
    if mixed:
        print(f"ewgs: warning: {mixed}", file=sys.stderr)
    analysis = analyse(runs, directory)
    plots = write_plots(runs, directory) + plot_mechanism_runs(runs, directory)
    text = "\n".join([_table(analysis), *_notes(analysis, directory)])
    evaluated = _evaluated(runs)
    text += f"\n\nEvaluated on: {evaluated}." if evaluated else ""
    markdown = [
        f"# EWGS vs STE: {directory.name}",
        "",
        _caption(analysis),
        "",
        text,
        "",
        *([f"**Warning:** {mixed}.", ""] if mixed else []),
        "## Runs",
        "",
        _runs_table(runs, directory),
        "",
        "## Plots",
        "",
        "Curves: the mean over each setting's finished runs (the table's runs); an "
        "unfinished run is left out, so it neither cuts a curve short nor bends it where "
        "it stops (a setting with no finished run shows its unfinished ones, labelled so).",
        "",
        *(f"![{plot.stem}]({plot.name})" for plot in plots),
        "",
    ]
    report = Report(directory / rundir.REPORT, directory / rundir.SUMMARY, text)
    rundir.write_atomic(report.markdown, "\n".join(markdown))
    numbers = summary(analysis, directory)
    numbers["threads_changed"] = _threads_changed(runs, directory)
    numbers = rundir.strict_json(numbers, indent=2)
    rundir.write_atomic(report.summary, numbers + "\n")
    return report
