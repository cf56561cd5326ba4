"""Paired statistics for a comparison of two backward rules.

Runs of one seed share their initialisation and their data order, so an STE run and an
EWGS run of the same seed (and otherwise the same recipe) are a *pair*. The statistic is
the mean of the paired differences d_i = rule_i − baseline_i with a Student-t interval:

    mean(d) ± t_{(1+c)/2, n−1} · sd(d) / √n

(sd: the sample standard deviation, n − 1 in the denominator; c: the confidence). Pure
functions, no torch; the t quantile is scipy's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

#: the interval's confidence level
CONFIDENCE = 0.95

#: two differences closer than this to 0 are a tie (the metrics are floats computed the
#: same way on both sides, so equal results are equal to the last bit)
TIE_TOLERANCE = 1e-9


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The ``probability`` quantile of Student's t distribution."""
    if degrees_of_freedom < 1:
        raise ValueError(f"Student's t needs a degree of freedom or more: {degrees_of_freedom}")
    from scipy.stats import t  # heavy (half a second): imported when a report needs it

    return float(t.ppf(probability, degrees_of_freedom))


@dataclass(frozen=True)
class PairedDifference:
    """The mean paired difference rule − baseline of one metric over ``n`` pairs.

    ``ci`` is None for a single pair (no interval exists: n − 1 = 0 degrees of freedom).
    ``wins`` counts the pairs where the rule did better (higher, or lower when
    ``higher_is_better`` is false), ``losses`` where it did worse."""

    n: int
    mean: float
    sd: float | None
    ci: tuple[float, float] | None
    wins: int
    ties: int
    losses: int
    higher_is_better: bool
    confidence: float = CONFIDENCE

    @property
    def resolved(self) -> int:
        """+1: the interval lies on the rule's better side of 0; −1: on the baseline's;
        0: it holds 0, or there is no interval."""
        if self.ci is None or self.ci[0] <= 0.0 <= self.ci[1]:
            return 0
        above = self.ci[0] > 0.0
        return 1 if above == self.higher_is_better else -1

    def verdict(self, rule: str, baseline: str) -> str:
        """In words: "EWGS better", "STE better", "no difference resolved", or that one
        pair gives no interval."""
        if self.ci is None:
            return "one pair: no interval"
        return {1: f"{rule} better", -1: f"{baseline} better", 0: "no difference resolved"}[
            self.resolved
        ]


def paired_difference(
    rule: Sequence[float],
    baseline: Sequence[float],
    *,
    higher_is_better: bool = True,
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """The mean of ``rule[i] − baseline[i]`` with its Student-t interval."""
    if len(rule) != len(baseline) or not rule:
        raise ValueError(f"need pairs: got {len(rule)} and {len(baseline)} values")
    differences = [float(a) - float(b) for a, b in zip(rule, baseline)]
    n = len(differences)
    mean = statistics.fmean(differences)
    sd, ci = None, None
    if n > 1:
        sd = statistics.stdev(differences)
        half_width = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
        ci = (mean - half_width, mean + half_width)
    better = [d if higher_is_better else -d for d in differences]
    return PairedDifference(
        n=n,
        mean=mean,
        sd=sd,
        ci=ci,
        wins=sum(d > TIE_TOLERANCE for d in better),
        ties=sum(abs(d) <= TIE_TOLERANCE for d in better),
        losses=sum(d < -TIE_TOLERANCE for d in better),
        higher_is_better=higher_is_better,
        confidence=confidence,
    )
