"""Paired comparison of two methods over the seeds they share.

Runs of the same seed share the data split, the client partition and the base, so a
method's effect is the per-seed difference, not the difference of two means whose
spreads are dominated by the seed. ``paired_comparison`` reports, on the shared
seeds, the ratio of the means (how the issue targets are stated, e.g. "AF <= 0.5x
FedAvg-LoRA's"), the mean and sample standard deviation of the differences, the
paired t statistic with n - 1 degrees of freedom and its two-sided p-value (Student
1908; e.g. Wasserman, *All of Statistics*, 2004, section 10.1), and on how many seeds
the method came out lower.

Pure Python: the Student t tail comes from the regularised incomplete beta function,
evaluated by its continued fraction (modified Lentz; Abramowitz and Stegun 26.5.8).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

_TINY = 1e-300
_MAX_TERMS = 500


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (converges fast for x < (a+1)/(a+b+2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    result = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}.")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
        + a * math.log(x)
        + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}.")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def sign_test_p(n_lower: int, n_higher: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven | no effect).

    Ties are left out before counting (Conover, *Practical Nonparametric Statistics*,
    3rd ed., 1999, section 3.4): under no effect the lower count is Binomial(n, 1/2)
    with n = ``n_lower + n_higher``, and the two-sided p doubles the smaller tail
    (capped at 1). 1.0 when there is nothing to count.
    """
    if n_lower < 0 or n_higher < 0:
        raise ValueError(f"counts must be >= 0, got {n_lower} and {n_higher}.")
    n = n_lower + n_higher
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n_lower, n_higher) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


def correlation_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson's r of ``x`` and ``y`` and its two-sided p under no correlation.

    The p-value is the standard test of no correlation: Student's t with n - 2
    degrees of freedom of ``t = r sqrt((n - 2) / (1 - r^2))``, exact for bivariate
    normal data (Fisher 1915). Needs three points or more and some spread in each.
    """
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(
            f"need two equal-length samples of >= 3, got {len(x)}, {len(y)}."
        )
    mean_x, mean_y = statistics.mean(x), statistics.mean(y)
    dx = [a - mean_x for a in x]
    dy = [b - mean_y for b in y]
    sxx, syy = sum(a * a for a in dx), sum(b * b for b in dy)
    if sxx == 0.0 or syy == 0.0:
        raise ValueError("a sample without spread has no correlation.")
    r = sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    r = max(-1.0, min(1.0, r))
    df = len(x) - 2
    if abs(r) == 1.0:
        return r, 0.0
    return r, t_two_sided_p(r * math.sqrt(df / (1.0 - r * r)), df)


@dataclass(frozen=True)
class PairedComparison:
    """``variant`` against ``baseline`` on the seeds both have (see the module)."""

    seeds: tuple[int, ...]
    variant_mean: float
    baseline_mean: float
    ratio: float  # variant_mean / baseline_mean (NaN when the baseline mean is 0)
    diff_mean: float  # mean of (variant - baseline) per seed
    diff_std: float  # sample standard deviation of the differences (ddof=1)
    t: float  # diff_mean / (diff_std / sqrt(n)); +-inf when every difference is equal
    df: int
    p: float  # two-sided
    n_lower: int  # seeds where the variant is strictly lower

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (seeds as a list)."""
        out = asdict(self)
        out["seeds"] = list(self.seeds)
        return out


def paired_comparison(
    variant: Mapping[int, float | None], baseline: Mapping[int, float | None]
) -> PairedComparison | None:
    """Compare two seed -> value maps on their shared seeds with values.

    Returns ``None`` with fewer than two shared seeds (no spread to test against).
    """
    seeds = tuple(
        sorted(
            s
            for s in set(variant) & set(baseline)
            if variant[s] is not None and baseline[s] is not None
        )
    )
    if len(seeds) < 2:
        return None
    v = [float(variant[s]) for s in seeds]  # type: ignore[arg-type]
    b = [float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    diffs = [x - y for x, y in zip(v, b, strict=True)]
    n = len(seeds)
    diff_mean, diff_std = statistics.mean(diffs), statistics.stdev(diffs)
    scale = max(abs(d) for d in diffs)
    if diff_std > 1e-12 * scale:  # below that, the differences are equal up to rounding
        t = diff_mean / (diff_std / math.sqrt(n))
    else:
        t = math.copysign(math.inf, diff_mean) if diff_mean else 0.0
    p = 1.0 if t == 0.0 else t_two_sided_p(t, n - 1)
    variant_mean, base_mean = statistics.mean(v), statistics.mean(b)
    return PairedComparison(
        seeds=seeds,
        variant_mean=variant_mean,
        baseline_mean=base_mean,
        ratio=variant_mean / base_mean if base_mean else math.nan,
        diff_mean=diff_mean,
        diff_std=diff_std,
        t=t,
        df=n - 1,
        p=p,
        n_lower=sum(d < 0 for d in diffs),
    )


def format_comparison(c: PairedComparison) -> str:
    """'0.60x, -0.172 ± 0.05, t = -8.4 (5 df), p = 0.0004, lower on 6/6'."""
    return (
        f"{c.ratio:.2f}x, {c.diff_mean:+.3f} ± {c.diff_std:.3f}, "
        f"t = {c.t:.2f} ({c.df} df), p = {c.p:.2g}, lower on {c.n_lower}/{len(c.seeds)}"
    )
