"""Tests of client-reply validation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fed_asr.config import SecurityConfig
from fed_asr.security.validation import (
    ReplyLimits,
    check_spectrum_stats,
    spec_from_arrays,
    validate_reply,
)

LIMITS = ReplyLimits(max_num_examples=1000, max_update_norm=5.0)


def make_global() -> dict[str, np.ndarray]:
    return {
        "lora_A": np.zeros((4, 8), np.float32),
        "lora_B": np.zeros((8, 4), np.float32),
    }


def make_stats(num_examples: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    count = np.array([10.0, 0.0, 25.0, 3.0])
    x = [rng.normal(size=(int(c), 6)) for c in count]
    a = [rng.dirichlet(np.ones(8), size=int(c)) for c in count]
    return {
        "count": count,
        "sum": np.stack([v.sum(0) for v in x]),
        "sumsq": np.stack([(v**2).sum(0) for v in x]),
        "angular_sum": np.stack([v.sum(0) for v in a]),
    }


def make_reply(**changes):
    """A valid reply (arrays, metrics, stats) with some entries replaced."""
    arrays = {k: v + 0.1 for k, v in make_global().items()}
    metrics = {"num-examples": 50, "loss": 0.7}
    stats = make_stats()
    for key, value in changes.items():
        group, name = key.split("__")
        target = {"arrays": arrays, "metrics": metrics, "stats": stats}[group]
        if value is None:
            del target[name]
        else:
            target[name] = value
    return arrays, metrics, stats


def run(arrays, metrics, stats, **kwargs):
    spec = spec_from_arrays(make_global())
    return validate_reply(arrays, metrics, spec, LIMITS, make_global(), stats, **kwargs)


def test_validate_reply_valid_reply_ok() -> None:
    # Execute
    result = run(*make_reply())

    # Assert
    assert result.ok and bool(result) and result.reason == ""


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"arrays__lora_B": None}, r"lacks expected arrays \['lora_B'\]"),
        ({"arrays__extra": np.zeros(2, np.float32)}, r"unexpected arrays \['extra'\]"),
        (
            {"arrays__lora_A": np.zeros((8, 4), np.float32)},
            r"`lora_A` has shape \(8, 4\), expected \(4, 8\)",
        ),
        (
            {"arrays__lora_A": np.zeros((4, 8), np.float64)},
            "`lora_A` has dtype float64, expected float32",
        ),
        (
            {"arrays__lora_A": np.full((4, 8), np.inf, np.float32)},
            r"`lora_A` holds a non-finite value inf at \(0, 0\)",
        ),
        ({"metrics__num-examples": None}, "Metrics lack `num-examples`"),
        ({"metrics__num-examples": 0}, "`num-examples` = 0 must be positive"),
        ({"metrics__num-examples": -3}, "`num-examples` = -3 must be positive"),
        ({"metrics__num-examples": 12.5}, "`num-examples` = 12.5 is not an integer"),
        ({"metrics__num-examples": True}, "`num-examples` = True is not a number"),
        ({"metrics__num-examples": 5000}, "= 5000 exceeds the maximum 1000"),
        ({"metrics__loss": float("nan")}, "Metric `loss` = nan is not finite"),
        (
            {"arrays__lora_A": np.full((4, 8), 3.0, np.float32)},
            r"Update norm \|\|new - global\|\| = 16.9\d* exceeds 5",
        ),
    ],
)
def test_validate_reply_bad_arrays_or_metrics_rejected(changes, reason: str) -> None:
    # Execute
    result = run(*make_reply(**changes))

    # Assert
    assert not result.ok
    assert re.search(reason, result.reason), result


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"stats__count": np.array([60.0, 0, 25, 3])}, r"`count`\[0\] = 60.0 exceeds"),
        (
            {"stats__count": np.array([10.0, -1, 25, 3])},
            r"`count`\[1\] = -1.0 is negat",
        ),
        (
            {"stats__count": np.array([10.5, 0, 25, 3])},
            r"`count`\[0\] = 10.5 is not an",
        ),
        ({"stats__sumsq": None}, "Spectrum stats have arrays"),
        ({"stats__sum": np.zeros((3, 6))}, "Stats shapes disagree"),
        ({"stats__sum": np.full((4, 6), np.nan)}, "`sum` holds a non-finite value nan"),
        ({"stats__sumsq": -np.ones((4, 6))}, r"`sumsq`\[0, 0\] = -1.0 is negative"),
        ({"stats__sum": np.full((4, 6), 100.0)}, "skill 0, feature 0 are impossible"),
        ({"stats__angular_sum": np.ones((4, 8)) * 4}, r"`angular_sum`\[0\] sums to 32"),
    ],
)
def test_validate_reply_bad_spectrum_stats_rejected(changes, reason: str) -> None:
    # Execute
    result = run(*make_reply(**changes))

    # Assert
    assert not result.ok
    assert re.search(reason, result.reason), result


def test_check_spectrum_stats_noisy_stats_pass_without_moment_checks() -> None:
    # Prepare: DP noise breaks integrality and moment consistency
    stats = make_stats()
    rng = np.random.default_rng(1)
    noisy = {k: np.abs(v + rng.normal(0, 2.0, v.shape)) for k, v in stats.items()}
    noisy["count"] = np.minimum(noisy["count"], 50)

    # Execute
    strict = check_spectrum_stats(noisy, 50)
    relaxed = check_spectrum_stats(noisy, 50, integer_counts=False, check_moments=False)

    # Assert
    assert not strict.ok
    assert relaxed.ok


def test_reply_limits_from_config_uses_security_settings() -> None:
    # Execute
    limits = ReplyLimits.from_config(
        SecurityConfig(max_update_norm=2.0, max_num_examples=9)
    )

    # Assert
    assert limits == ReplyLimits(max_num_examples=9, max_update_norm=2.0)
