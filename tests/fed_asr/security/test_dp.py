"""Tests of clipping, Gaussian calibration, noise and accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fed_asr.config import PrivacyConfig
from fed_asr.security.dp import (
    PrivacyAccountant,
    add_gaussian_noise,
    calibrate_gaussian,
    calibrate_stats_noise,
    clamp_noisy_stats,
    clip_angular,
    clip_descriptors,
    gaussian_delta,
    gaussian_epsilon,
    max_skills_per_sample,
    stats_sensitivity,
)
from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum import SkillStats


def numeric_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Delta(eps) = int max(0, p - e^eps q); p = N(Delta, s^2), q = N(0, s^2)."""
    x = np.linspace(-12 * sigma, sensitivity + 12 * sigma, 400_001)
    p = np.exp(-((x - sensitivity) ** 2) / (2 * sigma**2))
    q = np.exp(-(x**2) / (2 * sigma**2))
    density = np.clip(p - math.exp(epsilon) * q, 0, None) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return float(np.sum(density) * (x[1] - x[0]))


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_calibrate_gaussian_analytic_meets_delta_exactly(epsilon: float) -> None:
    # Prepare
    delta = 1e-5

    # Execute
    sigma = calibrate_gaussian(epsilon, delta, sensitivity=2.0)

    # Assert: the formula agrees with numeric integration, and sigma is tight
    assert gaussian_delta(2.0 / sigma, epsilon) <= delta
    assert numeric_delta(sigma, epsilon, 2.0) == pytest.approx(delta, rel=1e-3)
    assert gaussian_delta(2.0 / (0.99 * sigma), epsilon) > delta


def test_calibrate_gaussian_classic_is_looser_than_analytic() -> None:
    # Execute
    classic = calibrate_gaussian(0.5, 1e-5, method="classic")
    analytic = calibrate_gaussian(0.5, 1e-5)

    # Assert
    assert classic == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert analytic < classic


def test_calibrate_gaussian_classic_with_large_epsilon_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="needs `dp_epsilon` < 1, got 8"):
        calibrate_gaussian(8.0, 1e-5, method="classic")
    with pytest.raises(ValueError, match="`dp_delta` must lie in"):
        calibrate_gaussian(1.0, 0.0)


def test_gaussian_epsilon_inverts_calibration() -> None:
    # Prepare
    sigma = calibrate_gaussian(3.0, 1e-6)

    # Execute
    epsilon = gaussian_epsilon(1.0 / sigma, 1e-6)

    # Assert
    assert epsilon == pytest.approx(3.0, rel=1e-6)


def test_add_gaussian_noise_std_matches_calibrated_sigma() -> None:
    # Prepare
    cfg = PrivacyConfig(dp_epsilon=2.0, dp_delta=1e-5, dp_clip=3.0)
    noise = calibrate_stats_noise(cfg)
    zeros = {
        "count": np.zeros(20_000),
        "sum": np.zeros((400, 54)),
        "sumsq": np.zeros((400, 54)),
        "angular_sum": np.zeros((2500, 8)),
    }

    # Execute
    noisy = add_gaussian_noise(zeros, noise, np.random.default_rng(0))

    # Assert
    sigma = calibrate_gaussian(2.0, 1e-5, sensitivity=2.0)  # joint sensitivity sqrt(4)
    expected = {
        "count": sigma,
        "sum": 3 * sigma,
        "sumsq": 9 * sigma,
        "angular_sum": sigma,
    }
    for name, std in expected.items():
        assert noise.stds[name] == pytest.approx(std)
        assert noisy[name].std() == pytest.approx(std, rel=0.03)
        assert abs(noisy[name].mean()) < 0.05 * std


def test_add_gaussian_noise_shares_sum_to_full_noise() -> None:
    # Prepare
    noise = calibrate_stats_noise(PrivacyConfig(dp_epsilon=1.0, dp_clip=1.0))
    rng = np.random.default_rng(3)
    zeros = {"count": np.zeros(20_000)}

    # Execute: four clients each add a share
    total = sum(
        add_gaussian_noise(zeros, noise, rng, num_shares=4)["count"] for _ in range(4)
    )

    # Assert
    assert total.std() == pytest.approx(noise.stds["count"], rel=0.03)


def test_add_gaussian_noise_same_seed_same_noise_and_unknown_array_raises() -> None:
    # Prepare
    noise = calibrate_stats_noise(PrivacyConfig())
    arrays = {"count": np.ones(4)}

    # Execute
    a = add_gaussian_noise(arrays, noise, np.random.default_rng(7))
    b = add_gaussian_noise(arrays, noise, np.random.default_rng(7))

    # Assert
    np.testing.assert_array_equal(a["count"], b["count"])
    with pytest.raises(KeyError, match="No calibrated noise for array `weights`"):
        add_gaussian_noise({"weights": np.ones(2)}, noise, np.random.default_rng(0))


@pytest.mark.parametrize("method", ["gdp", "zcdp"])
def test_accountant_composition_grows_sublinearly(method: str) -> None:
    # Prepare
    epsilon, delta, k = 1.0, 1e-5, 10
    z = calibrate_gaussian(epsilon, delta)
    one, many = PrivacyAccountant(delta), PrivacyAccountant(delta)
    one.record(z, "stage-0")
    for stage in range(k):
        many.record(z, f"stage-{stage}")

    # Execute
    eps_one, eps_many = one.epsilon(method=method), many.epsilon(method=method)

    # Assert
    assert eps_one < eps_many < k * epsilon
    if method == "gdp":
        assert eps_one == pytest.approx(epsilon, rel=1e-6)  # exact for one release
        assert eps_many == pytest.approx(gaussian_epsilon(math.sqrt(k) / z, delta))


def test_accountant_zcdp_is_no_tighter_than_gdp() -> None:
    # Prepare
    accountant = PrivacyAccountant(1e-5)
    for z in (2.0, 3.0, 5.0):
        accountant.record(z)

    # Execute
    summary = accountant.summary()

    # Assert
    assert summary["releases"] == 3
    assert accountant.rho == pytest.approx(0.5 * (1 / 4 + 1 / 9 + 1 / 25))
    assert summary["epsilon"] <= summary["epsilon-zcdp"]
    assert PrivacyAccountant(1e-5).epsilon() == 0.0


def test_clip_descriptors_bounds_row_norms_and_keeps_small_rows() -> None:
    # Prepare
    x = torch.randn(64, 54) * torch.linspace(0.01, 3.0, 64)[:, None]

    # Execute
    clipped = clip_descriptors(x, clip=2.0)

    # Assert
    norms = clipped.norm(dim=1)
    assert torch.all(norms <= 2.0 + 1e-5)
    small = x.norm(dim=1) <= 2.0
    torch.testing.assert_close(clipped[small], x[small])
    torch.testing.assert_close(norms[~small], torch.full_like(norms[~small], 2.0))


def test_clip_angular_nonnegative_with_l1_at_most_one() -> None:
    # Prepare
    a = torch.tensor([[0.5, 0.5, 0.5, -0.2], [0.1, 0.2, 0.3, 0.4]])

    # Execute
    clipped = clip_angular(a)

    # Assert
    assert torch.all(clipped >= 0)
    torch.testing.assert_close(clipped.sum(dim=1), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(clipped[1], a[1])


def test_stats_sensitivity_bounds_one_sample_change_of_skill_stats() -> None:
    # Prepare: 32 clipped samples with up to 4 skills each (tau = 0.2)
    clip, skills, tau = 2.5, ("a", "b", "c", "d"), 0.2
    desc = clip_descriptors(torch.randn(32, 54) * 3, clip)
    angular = clip_angular(torch.rand(32, 8))
    probs = torch.full((32, 4), 0.24)
    probs[::2] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    m = max_skills_per_sample(tau, len(skills))
    sens = stats_sensitivity(clip, m)

    # Execute
    full = SkillStats.from_batch(SpectralDescriptor(desc, angular), probs, skills, tau)
    minus = SkillStats.from_batch(
        SpectralDescriptor(desc[1:], angular[1:]), probs[1:], skills, tau
    )

    # Assert: sample 0 (1 skill) and sample 1 (4 skills) stay within the bounds
    assert m == 4
    diff = {k: full.to_arrays()[k] - minus.to_arrays()[k] for k in sens}
    for name, bound in sens.items():
        assert np.linalg.norm(diff[name]) <= bound + 1e-9
    without_second = SkillStats.from_batch(
        SpectralDescriptor(
            torch.cat([desc[:1], desc[2:]]), torch.cat([angular[:1], angular[2:]])
        ),
        torch.cat([probs[:1], probs[2:]]),
        skills,
        tau,
    )
    count_diff = full.to_arrays()["count"] - without_second.to_arrays()["count"]
    assert np.linalg.norm(count_diff) == pytest.approx(sens["count"])


def test_max_skills_per_sample_follows_threshold() -> None:
    # Execute / Assert
    assert max_skills_per_sample(0.2, 4) == 4
    assert max_skills_per_sample(0.3, 5) == 3
    assert max_skills_per_sample(0.5, 4) == 1
    assert max_skills_per_sample(0.0, 6) == 6


def test_clamp_noisy_stats_clips_negative_counts_only_where_meaningful() -> None:
    # Prepare
    noisy = {"count": np.array([-1.0, 2.0]), "sum": np.array([[-3.0], [1.0]])}

    # Execute
    clamped = clamp_noisy_stats(noisy)

    # Assert
    assert clamped["count"].tolist() == [0.0, 2.0]
    assert clamped["sum"].tolist() == [[-3.0], [1.0]]
