"""Seed statistics: mean ± standard deviation over repeated runs, and the rule that decides whether a difference
between two configurations is shown (Welch's t-test, two-sided, at 95 %). Pure functions, no scipy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05  # two-sided significance level of the finding rule
RULE = "Welch's t-test over seeds, two-sided, 95 %"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1); the std is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Comparison:
    """Configuration A against B on one metric, over seeds."""

    mean_a: float
    mean_b: float
    std_a: float | None
    std_b: float | None
    n_a: int
    n_b: int
    t: float | None
    df: float | None
    p: float | None

    @property
    def resolved(self) -> bool:
        """The difference is larger than the seeds' spread: Welch's t-test rejects equal means at 95 %."""
        return self.p is not None and self.p < ALPHA

    def describe(self, better: str, worse: str, lower_is_better: bool = True) -> str:
        """``better`` / ``worse`` name A's side when A wins; the text says which side the numbers resolve."""
        if self.p is None:
            return "not resolved at this budget (needs at least 2 seeds on each side)"
        if not self.resolved:
            return f"not resolved at this budget (Welch p = {self.p:.2f})"
        a_wins = (self.mean_a < self.mean_b) == lower_is_better
        return f"{better if a_wins else worse} (Welch p = {self.p:.3f})"


def welch(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) = mean(b); no test (p None) with fewer than 2 values a side."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    if sa is None or sb is None:
        return Comparison(ma, mb, sa, sb, len(a), len(b), None, None, None)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0.0:  # no spread at all: any difference is resolved, none is not
        p = 0.0 if ma != mb else 1.0
        return Comparison(ma, mb, sa, sb, len(a), len(b), math.inf if ma != mb else 0.0, math.inf, p)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return Comparison(ma, mb, sa, sb, len(a), len(b), t, df, t_two_sided_p(t, df))


def format_mean_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
