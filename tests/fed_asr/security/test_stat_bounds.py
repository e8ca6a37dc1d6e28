"""Bounds of the spectral descriptor and the poisoning helpers (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_asr.config import PrivacyConfig, SecurityConfig
from fed_asr.protocol import correct_key, total_key
from fed_asr.security.dp import calibrate_stats_noise
from fed_asr.security.evaluation_checks import (
    accuracy_outliers,
    check_evaluation_counts,
)
from fed_asr.security.robust_weights import cap_shares, norm_clip_scales
from fed_asr.security.stat_bounds import (
    bounds_for_shape,
    check_stats_bounds,
    check_stats_skills,
    descriptor_bounds,
    dp_noise_margins,
)
from fed_asr.security.validation import check_float32_range
from fed_asr.spectral import describe
from fed_asr.spectrum import SkillStats

K, M = 4, 4


def _attention(peaked: bool) -> torch.Tensor:
    """(B, L, H, Tq, P) attention on a 4 x 6 grid, random or one-hot per head."""
    attn = torch.rand(16, 2, 3, 5, 24)
    if peaked:
        attn = torch.nn.functional.one_hot(attn.argmax(-1), 24).float()
    return attn / attn.sum(-1, keepdim=True)


@pytest.mark.parametrize("convention", ["paper", "ours"])
@pytest.mark.parametrize("peaked", [False, True])
def test_descriptor_bounds_hold_for_every_descriptor(
    convention: str, peaked: bool
) -> None:
    # Prepare
    bounds = descriptor_bounds(K, M)
    # Execute
    desc = describe(
        _attention(peaked), (4, 6), n_radial=K, n_angular=M, convention=convention
    )
    x = desc.descriptor.double().numpy()
    # Assert: within range up to float32 rounding; angular rows are distributions
    assert x.shape[1] == bounds.dim
    assert np.all(x >= bounds.low - 1e-5) and np.all(x <= bounds.high + 1e-5)
    assert np.all(desc.angular.numpy() >= 0)
    np.testing.assert_allclose(desc.angular.sum(-1).numpy(), 1.0, atol=1e-5)


def test_descriptor_bounds_with_dp_clip_are_within_the_clip() -> None:
    # Execute
    bounds = descriptor_bounds(K, M, dp_clip=2.0)
    # Assert: anisotropy (max M = 4) and its variance (M^2 / 4) are clipped to 2
    assert bounds.high.max() == 2.0 and bounds.low.min() >= -2.0
    assert bounds_for_shape(bounds.dim, M).dim == bounds.dim


def test_bounds_for_shape_refuses_an_impossible_size() -> None:
    with pytest.raises(ValueError, match="match no spectral descriptor"):
        bounds_for_shape(7, M)


def _honest_stats() -> dict[str, np.ndarray]:
    desc = describe(_attention(False), (4, 6), n_radial=K, n_angular=M)
    probs = torch.zeros(16, 3)
    probs[:10, 0] = 1.0  # skill a: 10 samples, skill b: 6, skill c: none
    probs[10:, 1] = 1.0
    return SkillStats.from_batch(desc, probs, ("a", "b", "c"), 0.2).to_arrays()


def test_check_stats_bounds_accepts_honest_and_names_the_bad_row() -> None:
    # Prepare
    bounds = descriptor_bounds(K, M)
    stats = _honest_stats()
    bad = {k: v.copy() for k, v in stats.items()}
    bad["sum"][1, 3] = 7.0 * 6  # anisotropy mean 7 > M
    # Execute
    honest = check_stats_bounds(stats, 16, bounds, skills=("a", "b", "c"))
    refused = check_stats_bounds(bad, 16, bounds, skills=("a", "b", "c"))
    # Assert
    assert honest, honest.reason
    assert not refused
    assert "`sum`[1, 3] = 42 of skill 1 ('b')" in refused.reason


def test_check_stats_bounds_dp_margins_follow_the_calibrated_noise() -> None:
    # Prepare: 10 sigma of noise is accepted, 10^3 sigma is not
    privacy = PrivacyConfig(dp=True)
    std = calibrate_stats_noise(privacy, 2).stds["sum"]
    margins = dp_noise_margins(privacy, 2, sigmas=10.0)
    stats = _honest_stats()
    within, beyond = stats["sum"].copy(), stats["sum"].copy()
    within[0, 0] += 9.0 * std
    beyond[0, 0] += 1000.0 * std
    bounds = descriptor_bounds(K, M)
    # Execute
    ok = check_stats_bounds({**stats, "sum": within}, 16, bounds, margins)
    refused = check_stats_bounds({**stats, "sum": beyond}, 16, bounds, margins)
    # Assert
    assert margins.sum == pytest.approx(10.0 * std)
    assert ok and not refused


def test_dp_noise_margins_of_a_secure_sum_grow_with_contributors_over_shares() -> None:
    # Execute
    one = dp_noise_margins(PrivacyConfig(dp=True), 1)
    summed = dp_noise_margins(PrivacyConfig(dp=True), 1, contributors=8, shares=2)
    # Assert
    assert summed.count == pytest.approx(2.0 * one.count)


def test_check_stats_skills_names_missing_and_reordered_skills() -> None:
    # Execute
    reordered = check_stats_skills(["b", "a"], ["a", "b"])
    other = check_stats_skills(["a", "x"], ["a", "b"])
    # Assert
    assert check_stats_skills(["a", "b"], ["a", "b"])
    assert "another order" in reordered.reason
    assert "missing ['b'], unknown ['x']" in other.reason
    assert "without skill names" in check_stats_skills(None, ["a"]).reason


def test_check_float32_range_refuses_a_value_the_cast_makes_infinite() -> None:
    # Execute
    result = check_float32_range({"mean": np.array([[0.0, 1e40]])})
    # Assert
    assert not result and "`mean`" in result.reason and "(0, 1)" in result.reason
    assert check_float32_range({"mean": np.array([3e38])})


def test_norm_clip_scales_bound_each_norm_by_factor_times_lower_median() -> None:
    # Execute
    scales = norm_clip_scales([1.0, 2.0, 999.0], factor=5.0)
    pair = norm_clip_scales([1.0, 999.0], factor=5.0)
    # Assert: the lower median is 2 of three and 1 of two
    assert scales[:2] == [1.0, 1.0]
    assert scales[2] * 999.0 == pytest.approx(10.0)
    assert pair[1] * 999.0 == pytest.approx(5.0)


def test_cap_shares_keeps_every_share_within_the_cap() -> None:
    # Execute
    capped = cap_shares([1e7, 8.0, 10.0, 6.0], max_share=0.4)
    # Assert: the large weight is lowered, the others unchanged
    assert capped[1:] == [8.0, 10.0, 6.0]
    assert capped[0] / sum(capped) == pytest.approx(0.4)
    assert cap_shares([5.0, 3.0], max_share=0.3) == [3.0, 3.0]


def test_accuracy_outliers_flag_only_the_liar() -> None:
    # Prepare: three honest clients near 0.3, one reporting 1.0 on 20 questions
    results = {
        "0": {0: (20, 20)},
        "1": {0: (6, 20)},
        "2": {0: (7, 20)},
        "3": {0: (5, 20)},
    }
    # Execute
    flagged = accuracy_outliers(results, z_max=4.0)
    # Assert
    assert [(f.client, f.stage) for f in flagged] == [("0", 0)]
    assert flagged[0].median_others == pytest.approx(0.3)


def _counts(correct: int, total: int) -> dict[str, object]:
    return {
        total_key(0): total,
        correct_key(0): correct,
        correct_key(0, "type"): correct,
        total_key(0, "shape"): total,
        correct_key(0, "all", "shape"): correct,
        correct_key(0, "type", "shape"): correct,
        "partition-id": 0,
    }


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({**_counts(3, 5), correct_key(0): 6}, "exceeds its total 5"),
        ({**_counts(3, 5), total_key(0): 500}, "test split (20)"),
        ({**_counts(3, 5), total_key(0, "wings"): 1}, "not a count of a known"),
        ({**_counts(3, 5), total_key(1): 1}, "only 1 stages"),
        ({**_counts(3, 5), correct_key(0): -1}, "non-negative integer"),
        ({**_counts(3, 5), correct_key(0): 1.5}, "non-negative integer"),
        ({**_counts(3, 5), total_key(0, "shape"): 6}, "per-skill totals"),
    ],
)
def test_check_evaluation_counts_refuses_counts_no_client_can_report(
    metrics: dict[str, object], reason: str
) -> None:
    # Execute
    result = check_evaluation_counts(metrics, 1, {"shape"}, ("all", "type"), _cap)
    # Assert
    assert check_evaluation_counts(_counts(3, 5), 1, {"shape"}, ("all", "type"), _cap)
    assert not result and reason in result.reason


def _cap(stage: int) -> int:
    return 20


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_num_examples_per_site", 0, "max_num_examples_per_site"),
        ("max_example_share", 1.5, "max_example_share"),
        ("norm_bound_factor", -1.0, "norm_bound_factor"),
        ("stats_noise_sigmas", 0.0, "stats_noise_sigmas"),
        ("eval_outlier_z", 0.0, "eval_outlier_z"),
    ],
)
def test_security_config_refuses_bad_poisoning_bounds(
    field: str, value: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SecurityConfig(**{field: value})  # type: ignore[arg-type]


def test_descriptor_bounds_variance_of_theta_is_pi_squared() -> None:
    # Execute
    bounds = descriptor_bounds(K, M)
    # Assert: theta* in [-pi, pi], its variance across heads at most pi^2
    theta = K + 2 * M + 1
    assert bounds.low[theta] == -math.pi
    assert bounds.high[bounds.dim // 2 + theta] == pytest.approx(math.pi**2)


def test_honest_non_iid_spread_is_not_flagged_but_a_liar_is() -> None:
    # Prepare: stage-1 accuracies of four honest Dirichlet(0.5) clients measured on
    # scenes (round 10 of a vanilla run: z 5.5 for client 3 without the 0.1 floor);
    # then a round where client 1 claims 1.0 while the others are within 0.1
    honest = {
        "0": {1: (31, 79)},
        "1": {1: (37, 95)},
        "2": {1: (30, 61)},
        "3": {1: (55, 79)},
    }
    lying = {
        "0": {1: (31, 79)},
        "1": {1: (95, 95)},
        "2": {1: (30, 61)},
        "3": {1: (36, 79)},
    }
    # Execute / Assert
    assert accuracy_outliers(honest, 4.0) == []
    assert [o.client for o in accuracy_outliers(lying, 4.0)] == ["1"]
