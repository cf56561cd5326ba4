"""Which runs compare: the finished runs grouped by everything but backward rule, seed
and output, and paired by seed within a group (an STE run and a run of another rule
whose recipes differ only in the backward rule), with the paired statistics of their
final metrics. The runs in no pair are kept, each with the reason; unfinished runs are
left out."""

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

    @property
    def has_ema(self) -> bool:
        """Whether some pair has an EMA accuracy on both sides."""
        return any(c.ema_top1 for group in self.groups for c in group.comparisons)


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
        if id(run) not in paired:
            twin = by_side[(run.backward, run.seed)][0]
            group.unpaired.append((run, _why_unpaired(run, twin, challengers, runs, root)))


def _why_unpaired(
    run: RunResult, twin: RunResult, challengers: str, runs: Sequence[RunResult], root: Path | None
) -> str:
    """Why ``run`` is in no pair: a repeat of ``twin``, an unfinished other side, or no
    other side (and then the nearest run of the other side, if any)."""
    if twin is not run:
        return f"the same settings and seed as {_name(twin, root)}"
    sides = [r for r in runs if r.backward != run.backward]
    settings = run.settings()
    for other in sides:
        if not other.finished and other.seed == run.seed and other.settings() == settings:
            return f"its {other.backward.upper()} run {_name(other, root)} is unfinished"
    wanted = challengers if run.backward == BASELINE else BASELINE.upper()
    reason = f"no {wanted} run with seed {run.seed} and otherwise the same recipe"
    return reason + _closest(run, [r for r in sides if r.finished], root)


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
