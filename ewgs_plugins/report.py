"""Reports from run directories: STE against every other backward rule, paired by seed.

``report.md`` holds the table (per method × bits × other varying settings: test top-1
per rule, mean ± std over seeds, and the paired difference EWGS − STE with its 95 %
Student-t interval, wins/ties/losses and a verdict, beside the same for the final
training loss and the EMA model's top-1), the unpaired and unfinished runs, every run,
and the plots. ``summary.json`` holds the same numbers (schema: ``summary``). The
statistic is in ``stats``; the README's "Reading a comparison" says how to read it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import rundir
from .recipe import flatten
from .report_plots import write_plots
from .results import RunResult, backward_order, find_runs, row_key, varying_keys
from .stats import CONFIDENCE, PairedDifference, paired_difference

SUMMARY_VERSION = 1
#: the rule every other backward rule is compared against
BASELINE = "ste"


@dataclass
class Comparison:
    """``rule`` against the baseline in one group: the pairs (baseline run, rule run)
    of equal seed, and the paired differences of the final metrics."""

    rule: str
    pairs: list[tuple[RunResult, RunResult]]
    top1: PairedDifference | None = None
    train_loss: PairedDifference | None = None
    ema_top1: PairedDifference | None = None

    def __post_init__(self) -> None:
        if not self.pairs:
            return
        base, rule = zip(*self.pairs)
        self.top1 = paired_difference([r.final_top1 for r in rule], [b.final_top1 for b in base])
        self.train_loss = paired_difference(
            [r.final_train_loss for r in rule],
            [b.final_train_loss for b in base],
            higher_is_better=False,
        )
        ema = [(b, r) for b, r in self.pairs if None not in (b.final_ema_top1, r.final_ema_top1)]
        if ema:
            self.ema_top1 = paired_difference(
                [r.final_ema_top1 for _, r in ema], [b.final_ema_top1 for b, _ in ema]
            )


@dataclass
class Group:
    """Finished runs whose recipes differ only in backward rule, seed and output: one
    row of the table."""

    method: str
    bits: str
    label: str  # the other varying settings, "key=value, ..."
    settings: dict[str, Any]
    runs: list[RunResult]
    comparisons: list[Comparison] = field(default_factory=list)
    unpaired: list[tuple[RunResult, str]] = field(default_factory=list)


@dataclass
class Analysis:
    groups: list[Group]
    rules: list[str]  # every backward rule of the finished runs, baseline first
    left_out: list[RunResult]  # unfinished runs

    @property
    def paired(self) -> bool:
        """Whether the baseline and another rule both have runs: there is a comparison."""
        return BASELINE in self.rules and len(self.rules) > 1


def _closest(run: RunResult, others: Sequence[RunResult], root: Path | None) -> str:
    """Why no run of ``others`` pairs with ``run``: the nearest one (same method, bits
    and seed) and the settings it differs in."""
    mine = run.settings()
    where = (run.method, run.bits, run.seed)
    candidates = [o for o in others if (o.method, o.bits, o.seed) == where]
    if not candidates:
        return ""
    theirs = [o.settings() for o in candidates]
    differing = [
        sorted(k for k in mine.keys() | t.keys() if mine.get(k) != t.get(k)) for t in theirs
    ]
    keys = min(differing, key=len)
    nearest = candidates[differing.index(keys)]
    return f"; the nearest, {_name(nearest, root)}, differs in {', '.join(keys)}"


def _name(run: RunResult, root: Path | None) -> str:
    return run.name(root) if root is not None else str(run.path)


def _pair(group: Group, rules: Sequence[str], runs: Sequence[RunResult], root: Path | None) -> None:
    """Fill ``group.comparisons`` (one per rule other than the baseline) and
    ``group.unpaired`` (the group's runs in no pair, each with the reason; ``runs``:
    every run, for the reasons)."""
    by_side: dict[tuple[str, int], list[RunResult]] = {}
    for run in group.runs:
        by_side.setdefault((run.backward, run.seed), []).append(run)
    paired: set[int] = set()
    own = {run.backward for run in group.runs} - {BASELINE}
    # the rules this group has; a group of baseline runs only is compared with every rule
    for rule in [r for r in rules if r in own] or [r for r in rules if r != BASELINE]:
        pairs = []
        for seed in sorted({s for b, s in by_side if b == rule}):
            if by_side.get((BASELINE, seed)):
                pairs.append((by_side[(BASELINE, seed)][0], by_side[(rule, seed)][0]))
        paired.update(id(run) for pair in pairs for run in pair)
        group.comparisons.append(Comparison(rule, pairs))
    challengers = " or ".join(c.rule.upper() for c in group.comparisons)
    for run in group.runs:
        if id(run) in paired:
            continue
        twin = by_side[(run.backward, run.seed)][0]
        if twin is not run:
            group.unpaired.append((run, f"the same settings and seed as {_name(twin, root)}"))
            continue
        sides = [r for r in runs if r.backward != run.backward]
        settings = run.settings()
        unfinished = [
            r for r in sides if not r.finished and r.seed == run.seed and r.settings() == settings
        ]
        if unfinished:
            reason = f"its {unfinished[0].backward.upper()} run {_name(unfinished[0], root)}"
            group.unpaired.append((run, reason + " is unfinished"))
            continue
        other = challengers if run.backward == BASELINE else BASELINE.upper()
        reason = f"no {other} run with seed {run.seed} and otherwise the same recipe"
        finished = [r for r in sides if r.finished]
        group.unpaired.append((run, reason + _closest(run, finished, root)))


def _natural(text: str) -> list[Any]:
    """A sort key that puts numbers in their order (W2A2 before W16A16, 3 before 10)."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)
    ]


def analyse(runs: Sequence[RunResult], root: Path | None = None) -> Analysis:
    """Group the finished runs, pair them by seed, and compute the paired statistics;
    unfinished runs are left out. Reasons name runs relative to ``root``."""
    finished = [run for run in runs if run.finished]
    keys = varying_keys(finished)  # a left-out run does not split the rows
    by_settings: dict[str, list[RunResult]] = {}
    for run in finished:
        by_settings.setdefault(json.dumps(run.settings(), sort_keys=True, default=str), []).append(
            run
        )
    groups = []
    for members in by_settings.values():
        method, bits, label = row_key(members[0], keys)
        flat = flatten(members[0].recipe)
        groups.append(Group(method, bits, label, {k: flat.get(k) for k in keys}, members))
    groups.sort(key=lambda g: (_natural(g.method), _natural(g.bits), _natural(g.label)))
    rules = backward_order(finished)
    analysis = Analysis(groups, rules, [run for run in runs if not run.finished])
    if analysis.paired:
        for group in groups:
            _pair(group, rules, runs, root)
    return analysis


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
    ema = any(c.ema_top1 for g in analysis.groups for c in g.comparisons)
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
    unpaired = [(run, why) for group in analysis.groups for run, why in group.unpaired]
    if unpaired:
        lines += ["", f"Unpaired runs ({len(unpaired)}, in no pair; in the per-rule columns only):"]
        for run, why in sorted(unpaired, key=lambda item: str(item[0].path)):
            lines.append(f"- {run.name(root)} ({run.backward.upper()}, seed {run.seed}): {why}")
    if analysis.left_out:
        lines += ["", f"Left out ({len(analysis.left_out)} unfinished run(s), in no column):"]
        for run in analysis.left_out:
            lines.append(f"- {run.name(root)}: {len(run.metrics)} of {run.epochs} epochs")
    return lines


def _runs_table(runs: Sequence[RunResult], root: Path) -> str:
    lines = [
        "| run | method | backward | bits | seed | epochs | final top-1 | best top-1 | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: str(r.path)):
        done = f"{len(run.metrics)}/{run.epochs}" + ("" if run.finished else " (unfinished)")
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


def summary(analysis: Analysis, root: Path) -> dict[str, Any]:
    """The report's numbers as JSON (``summary.json``); the README documents the schema."""
    groups = [
        {
            "method": group.method,
            "bits": group.bits,
            "settings": group.settings,
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
        "groups": groups,
        "left_out": [
            {"run": run.name(root), "epochs_done": len(run.metrics), "epochs": run.epochs}
            for run in analysis.left_out
        ],
    }


# ------------------------------------------------------------------------ report


@dataclass
class Report:
    """What ``write_report`` wrote, and the table with its notes for the console."""

    markdown: Path
    summary: Path
    text: str


_CAPTION = (
    "Test top-1 (%) after the last epoch. Per rule: mean ± sample std over the finished "
    "runs (n). {rule} − {base}: the mean of the paired differences (a pair is the two runs "
    "of one seed whose recipes differ only in the backward rule) with its {level} % "
    "Student-t interval over the pairs; W/T/L counts the pairs where {rule} is above / "
    "equal to / below {base}; the verdict says whether the interval excludes 0. The "
    "train-loss column is the same statistic for the last epoch's training loss (lower is "
    'better){ema}. See the README\'s "Reading a comparison" for what this can and cannot say.'
)


def write_report(directory: str | Path) -> Report:
    """Write ``report.md``, ``summary.json`` and the plots into ``directory`` from the
    runs in it (or below it)."""
    directory = Path(directory)
    runs = find_runs(directory)
    analysis = analyse(runs, directory)
    plots = write_plots(runs, directory)
    text = "\n".join([_table(analysis), *_notes(analysis, directory)])
    others = [r.upper() for r in analysis.rules if r != BASELINE]
    has_ema = any(c.ema_top1 for g in analysis.groups for c in g.comparisons)
    caption = _CAPTION.format(
        rule=" / ".join(others) or "rule",
        base=BASELINE.upper(),
        level=round(CONFIDENCE * 100),
        ema="; EMA top-1: the same for the weight average's top-1, over the pairs that have one"
        if has_ema
        else "",
    )
    markdown = [
        f"# EWGS vs STE: {directory.name}",
        "",
        caption,
        "",
        text,
        "",
        "## Runs",
        "",
        _runs_table(runs, directory),
        "",
        "## Plots",
        "",
        "Curves: the mean over each setting's finished runs (the table's runs); an "
        "unfinished run is left out, so it neither cuts a curve short nor bends it where "
        "it stops.",
        "",
        *(f"![{plot.stem}]({plot.name})" for plot in plots),
        "",
    ]
    report = Report(directory / rundir.REPORT, directory / rundir.SUMMARY, text)
    rundir.write_atomic(report.markdown, "\n".join(markdown))
    numbers = json.dumps(summary(analysis, directory), indent=2, default=str)
    rundir.write_atomic(report.summary, numbers + "\n")
    return report
