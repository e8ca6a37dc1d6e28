"""Paired comparisons over seeds: the Student t tail and the per-seed differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_asr.paired import (
    correlation_test,
    format_comparison,
    paired_comparison,
    regularized_incomplete_beta,
    sign_test_p,
    t_two_sided_p,
)


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (12.706, 1, 0.05),  # two-sided 5% critical values of Student's t tables
        (2.5706, 5, 0.05),
        (2.2622, 9, 0.05),
        (4.0321, 5, 0.01),
        (-2.5706, 5, 0.05),  # symmetric
        (0.0, 7, 1.0),
    ],
)
def test_t_two_sided_p_matches_the_tables(t: float, df: int, p: float) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-5)


def test_regularized_incomplete_beta_closed_forms() -> None:
    # I_x(2, 3) = sum_{j=2}^{4} C(4, j) x^j (1-x)^(4-j); I_x(1, 1) = x; I_.5(a, a) = .5
    x = 0.4
    expected = 6 * x**2 * (1 - x) ** 2 + 4 * x**3 * (1 - x) + x**4
    assert regularized_incomplete_beta(2, 3, x) == pytest.approx(expected, rel=1e-12)
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, rel=1e-12)
    assert regularized_incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5, rel=1e-12)
    assert regularized_incomplete_beta(7.5, 0.5, 0.999) == pytest.approx(
        1 - regularized_incomplete_beta(0.5, 7.5, 0.001), rel=1e-12
    )
    with pytest.raises(ValueError, match="x must be in"):
        regularized_incomplete_beta(1, 1, 1.5)


def test_paired_comparison_on_hand_made_seeds() -> None:
    # Prepare: seed 9 has no baseline and seed 4 no value: both are left out
    variant = {0: 0.30, 1: 0.32, 2: 0.26, 3: 0.25, 4: None, 9: 0.0}
    baseline = {0: 0.49, 1: 0.45, 2: 0.47, 3: 0.32, 4: 0.5}
    # Execute
    c = paired_comparison(variant, baseline)
    # Assert: differences -0.19, -0.13, -0.21, -0.07
    assert c is not None and c.seeds == (0, 1, 2, 3) and c.df == 3
    diffs = [-0.19, -0.13, -0.21, -0.07]
    mean = sum(diffs) / 4
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert c.diff_mean == pytest.approx(mean) and c.diff_std == pytest.approx(std)
    assert c.t == pytest.approx(mean / (std / 2))
    assert c.ratio == pytest.approx((1.13 / 4) / (1.73 / 4))
    assert c.n_lower == 4
    assert 0.01 < c.p < 0.05  # t = -4.8 on 3 df: p ~ 0.017
    assert format_comparison(c).startswith("0.65x, -0.150 ± 0.063, t = -4.")


def test_paired_comparison_edge_cases() -> None:
    assert paired_comparison({0: 0.1}, {0: 0.2}) is None  # one shared seed: no spread
    assert paired_comparison({0: 0.1, 1: 0.2}, {2: 0.2, 3: 0.3}) is None
    same = paired_comparison({0: 0.1, 1: 0.2}, {0: 0.1, 1: 0.2})
    assert same is not None and same.t == 0.0 and same.p == 1.0 and same.n_lower == 0
    shifted = paired_comparison({0: 0.1, 1: 0.2}, {0: 0.2, 1: 0.3})
    assert shifted is not None and shifted.t == -math.inf and shifted.p == 0.0
    zero_base = paired_comparison({0: 0.1, 1: 0.2}, {0: 0.0, 1: 0.0})
    assert zero_base is not None and math.isnan(zero_base.ratio)


@pytest.mark.parametrize(
    ("lower", "higher", "p"),
    [
        (4, 0, 2 / 16),  # 2 P(X = 0), X ~ Binomial(4, 1/2)
        (0, 8, 2 / 256),  # symmetric
        (5, 3, 2 * (1 + 8 + 28 + 56) / 256),  # 2 P(X <= 3), X ~ Binomial(8, 1/2)
        (2, 2, 1.0),  # an even split: capped at 1
        (0, 0, 1.0),  # nothing to count
    ],
)
def test_sign_test_p_is_the_exact_binomial_tail(
    lower: int, higher: int, p: float
) -> None:
    assert sign_test_p(lower, higher) == pytest.approx(p, rel=1e-12)


def test_sign_test_p_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts must be >= 0"):
        sign_test_p(-1, 3)


def test_correlation_test_matches_numpy_and_the_two_df_closed_form() -> None:
    x, y = [1.0, 2.0, 3.0, 5.0], [2.0, 4.5, 5.0, 9.0]

    r, p = correlation_test(x, y)

    # r as numpy computes it; with 2 df Student's two-sided p is 1 - |t|/sqrt(2 + t^2)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    t = r * math.sqrt(2 / (1 - r * r))
    assert p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)
    assert correlation_test(x, [-v for v in y]) == pytest.approx((-r, p))
    assert correlation_test([1, 2, 3], [2, 4, 6]) == (1.0, 0.0)  # a perfect line


def test_correlation_test_refuses_what_has_no_correlation() -> None:
    with pytest.raises(ValueError, match=">= 3"):
        correlation_test([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="without spread"):
        correlation_test([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
