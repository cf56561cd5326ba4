"""Which runs compare: the finished runs grouped by everything but backward rule, seed
and output, and paired by seed within a group (an STE run and a run of another rule
whose recipes differ only in the backward rule), with the paired statistics of their
final metrics. The runs in no pair are kept, each with the reason; unfinished runs are
left out.

δ has no effect under STE (nothing is estimated: the gradient is g_q whatever δ is), so
an STE run's identity leaves out the ``delta`` section: each group of another rule (its
own δ settings label its row) takes the STE runs that match it apart from δ, preferring,
per seed, one whose δ section is the group's too. One STE run may so be the baseline of
several rows (a study's EWGS δ arms against one STE run per seed). Runs of other rules
never pair across δ settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import flatten
from .results import RunResult, backward_order, row_key, varying_keys
from .stats import PairedDifference, paired_difference

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
    """Finished runs of the other rules whose recipes differ only in backward rule, seed
    and output, with the STE runs that pair with them (or, in a row of STE runs only,
    STE runs that match no other rule's runs): one row of the table."""

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

    @property
    def has_ema(self) -> bool:
        """Whether some pair has an EMA accuracy on both sides."""
        return any(c.ema_top1 for group in self.groups for c in group.comparisons)

    def shared_baseline(self) -> list[tuple[RunResult, list[Group]]]:
        """The baseline runs paired in more than one row, each with those rows."""
        rows: dict[int, tuple[RunResult, list[Group]]] = {}
        for group in self.groups:
            used = {id(b): b for c in group.comparisons for b, _ in c.pairs}
            for key, run in used.items():
                rows.setdefault(key, (run, []))[1].append(group)
        shared = [(run, groups) for run, groups in rows.values() if len(groups) > 1]
        return sorted(shared, key=lambda item: str(item[0].path))


def _key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _pairs_with(a: RunResult, b: RunResult) -> bool:
    """Whether ``a`` and ``b`` (one of them STE) have the seed and settings of a pair."""
    return a.seed == b.seed and a.settings_but_delta() == b.settings_but_delta()


def _closest(run: RunResult, others: Sequence[RunResult], root: Path | None) -> str:
    """Why no run of ``others`` (the other side) pairs with ``run``: the nearest one
    (same method, bits and seed) and the settings it differs in, δ aside."""
    mine = run.settings_but_delta()
    where = (run.method, run.bits, run.seed)
    candidates = [o for o in others if (o.method, o.bits, o.seed) == where]
    if not candidates:
        return ""
    theirs = [o.settings_but_delta() for o in candidates]
    differing = [
        sorted(k for k in mine.keys() | t.keys() if mine.get(k) != t.get(k)) for t in theirs
    ]
    keys = min(differing, key=len)
    nearest = candidates[differing.index(keys)]
    return f"; the nearest, {_name(nearest, root)}, differs in {', '.join(keys)}"


def _name(run: RunResult, root: Path | None) -> str:
    return run.name(root) if root is not None else str(run.path)


def _row_settings(group: Group) -> dict[str, Any]:
    """The settings that make ``group`` a row: its runs of the other rules' (its STE
    runs' in a row of STE runs only)."""
    return next((r for r in group.runs if r.backward != BASELINE), group.runs[0]).settings()


def _baseline_for(
    settings: dict[str, Any], seed: int, pool: Sequence[RunResult]
) -> RunResult | None:
    """The STE run of ``pool`` (runs matching apart from δ, by path) that pairs with a
    run of ``settings`` and ``seed``: one with the same δ section first."""
    same_seed = [b for b in pool if b.seed == seed]
    exact = [b for b in same_seed if b.settings() == settings]
    return (exact or same_seed or [None])[0]


def _pair(group: Group, rules: Sequence[str], pool: Sequence[RunResult]) -> None:
    """Fill ``group.comparisons``: one per rule of the group, its runs each paired with
    the STE run of ``pool`` (the STE runs matching the group apart from δ) of their seed;
    the STE runs paired join ``group.runs``."""
    settings = _row_settings(group)
    used: dict[int, RunResult] = {}
    for rule in [r for r in rules if r in {run.backward for run in group.runs}]:
        pairs = []
        for seed in sorted({run.seed for run in group.runs if run.backward == rule}):
            base = _baseline_for(settings, seed, pool)
            if base is not None:
                first = next(r for r in group.runs if (r.backward, r.seed) == (rule, seed))
                pairs.append((base, first))
                used[id(base)] = base
        group.comparisons.append(Comparison(rule, pairs))
    group.runs += used.values()


def _explain(
    group: Group, pool: Sequence[RunResult], runs: Sequence[RunResult], root: Path | None
) -> None:
    """Fill ``group.unpaired``: the group's runs in no pair of any row (``pool``: the STE
    runs the group draws on; ``runs``: every run, for the reasons)."""
    paired = {id(run) for c in group.comparisons for pair in c.pairs for run in pair}
    challengers = " or ".join(c.rule.upper() for c in group.comparisons)
    settings = _row_settings(group)
    for run in group.runs:
        if id(run) in paired:
            continue
        if run.backward == BASELINE:
            twin = _baseline_for(settings, run.seed, pool) or run
        else:
            twin = next(r for r in group.runs if (r.backward, r.seed) == (run.backward, run.seed))
        group.unpaired.append((run, _why_unpaired(run, twin, challengers, runs, root)))


def _why_unpaired(
    run: RunResult, twin: RunResult, challengers: str, runs: Sequence[RunResult], root: Path | None
) -> str:
    """Why ``run`` is in no pair: a repeat of ``twin``, an unfinished other side, or no
    other side (and then the nearest run of the other side, if any)."""
    if twin is not run:
        apart = "" if twin.settings() == run.settings() else " apart from δ (no effect under STE)"
        return f"the same settings{apart} and seed as {_name(twin, root)}"
    mine = run.backward == BASELINE
    sides = [r for r in runs if (r.backward == BASELINE) != mine]
    for other in sides:
        if not other.finished and _pairs_with(run, other):
            return f"its {other.backward.upper()} run {_name(other, root)} is unfinished"
    wanted = challengers if mine else BASELINE.upper()
    reason = f"no {wanted} run with seed {run.seed} and otherwise the same recipe"
    return reason + _closest(run, [r for r in sides if r.finished], root)


def _natural(text: str) -> list[Any]:
    """A sort key that puts numbers in their order (W2A2 before W16A16, 3 before 10)."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)
    ]


def _row_order(group: Group) -> tuple[list[Any], ...]:
    return _natural(group.method), _natural(group.bits), _natural(group.label)


def _by(runs: Sequence[RunResult], settings: Any) -> dict[str, list[RunResult]]:
    """``runs`` grouped by ``settings(run)``, in their order."""
    grouped: dict[str, list[RunResult]] = {}
    for run in runs:
        grouped.setdefault(_key(settings(run)), []).append(run)
    return grouped


def _rows(runs: Sequence[RunResult], keys: Sequence[str]) -> list[Group]:
    """``runs`` grouped by their settings, in the table's order (rows split by ``keys``)."""
    groups = []
    for members in _by(runs, RunResult.settings).values():
        method, bits, label = row_key(members[0], keys)
        flat = flatten(members[0].recipe)
        groups.append(Group(method, bits, label, {k: flat.get(k) for k in keys}, members))
    return sorted(groups, key=_row_order)


def analyse(runs: Sequence[RunResult], root: Path | None = None) -> Analysis:
    """Group the finished runs, pair them by seed, and compute the paired statistics;
    unfinished runs are left out. Reasons name runs relative to ``root``."""
    finished = sorted((run for run in runs if run.finished), key=lambda run: str(run.path))
    keys = varying_keys(finished)  # a left-out run does not split the rows
    analysis = Analysis([], backward_order(finished), [run for run in runs if not run.finished])
    if not analysis.paired:
        analysis.groups = _rows(finished, keys)
        return analysis
    baseline = [run for run in finished if run.backward == BASELINE]
    pools = _by(baseline, RunResult.settings_but_delta)
    rows = _rows([run for run in finished if run.backward != BASELINE], keys)
    pool_of = {id(row): pools.get(_key(row.runs[0].settings_but_delta()), []) for row in rows}
    for row in rows:
        _pair(row, analysis.rules, pool_of[id(row)])
    # an STE run in no pair is listed once: in the row that has its δ settings, else in
    # the first that draws on it, else in a row of STE runs only
    paired = {id(b) for row in rows for c in row.comparisons for b, _ in c.pairs}
    homeless = []
    for run in (run for run in baseline if id(run) not in paired):
        drawing = [row for row in rows if any(b is run for b in pool_of[id(row)])]
        exact = [row for row in drawing if _row_settings(row) == run.settings()]
        if drawing:
            (exact or drawing)[0].runs.append(run)
        else:
            homeless.append(run)
    alone = _rows(homeless, keys)
    for row in alone:
        row.comparisons = [Comparison(rule, []) for rule in analysis.rules if rule != BASELINE]
        pool_of[id(row)] = row.runs
    for row in rows + alone:
        row.runs.sort(key=lambda run: str(run.path))
        _explain(row, pool_of[id(row)], runs, root)
    analysis.groups = sorted(rows + alone, key=_row_order)
    return analysis
