"""Differential privacy of the per-skill spectrum statistics.

Neighbouring datasets differ by one training sample of one client (add/remove). Each
sample's descriptor is clipped to L2 norm ``C`` and its angular distribution to L1 norm
1; a sample counts toward at most ``m`` skills with weight at most 1. The L2 sensitivity
of each released array is then (see ``docs/security.md``)::

    count: sqrt(m)    sum: sqrt(m) C    sumsq: sqrt(m) C^2    angular_sum: sqrt(m)

A release adds Gaussian noise to all four arrays as one Gaussian mechanism on the arrays
divided by their sensitivities (joint sensitivity ``sqrt(4)``), calibrated exactly to
(epsilon, delta) with the analytic Gaussian mechanism (Balle & Wang, ICML 2018). The
accountant composes releases exactly in Gaussian DP (Dong, Roth & Su, 2019) or, as a
looser cross-check, in zCDP with the RDP-to-DP conversion of Canonne, Kamath & Steinke.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_asr.config import PrivacyConfig

_SQRT2 = math.sqrt(2.0)


# -------------------------------------------------------------------------- clipping
def max_skills_per_sample(tau_skill: float, num_skills: int) -> int:
    """Most skills one sample can count toward when membership is ``p(s|x) > tau``.

    Probabilities sum to 1, so at most ``ceil(1 / tau) - 1`` of them exceed ``tau``.
    """
    if tau_skill <= 0:
        return num_skills
    return max(1, min(num_skills, math.ceil(1.0 / tau_skill) - 1))


def clip_descriptors(descriptor: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each row ``(B, D)`` down to L2 norm at most ``clip``.

    Raises
    ------
    ValueError
        If ``clip`` is not positive or the input is not 2-D.
    """
    if not clip > 0:
        raise ValueError(f"`dp_clip` must be positive, got {clip}.")
    if descriptor.ndim != 2:
        raise ValueError(f"`descriptor` must be (B, D), got {tuple(descriptor.shape)}.")
    norms = descriptor.norm(dim=1, keepdim=True)  # (B, 1)
    return descriptor * (clip / norms.clamp_min(clip))


def clip_angular(angular: torch.Tensor) -> torch.Tensor:
    """Clamp angular distributions ``(B, M)`` at 0 and scale rows to L1 norm <= 1."""
    if angular.ndim != 2:
        raise ValueError(f"`angular` must be (B, M), got {tuple(angular.shape)}.")
    positive = angular.clamp_min(0.0)
    mass = positive.sum(dim=1, keepdim=True)  # (B, 1)
    return positive / mass.clamp_min(1.0)


def stats_sensitivity(clip: float, skills_per_sample: int = 1) -> dict[str, float]:
    """L2 sensitivity of each statistics array to adding or removing one sample.

    Parameters
    ----------
    clip : float
        L2 bound ``C`` on one descriptor.
    skills_per_sample : int
        Most skills one sample counts toward (weight <= 1 each); see
        :func:`max_skills_per_sample`.

    Returns
    -------
    dict[str, float]
        Sensitivity of ``count``, ``sum``, ``sumsq`` (``||x*x||_2 <= ||x||_2^2``) and
        ``angular_sum`` (``||a||_2 <= ||a||_1 <= 1``).
    """
    if not clip > 0:
        raise ValueError(f"`dp_clip` must be positive, got {clip}.")
    if skills_per_sample < 1:
        raise ValueError(f"`skills_per_sample` must be >= 1, got {skills_per_sample}.")
    root_m = math.sqrt(skills_per_sample)
    return {
        "count": root_m,
        "sum": root_m * clip,
        "sumsq": root_m * clip**2,
        "angular_sum": root_m,
    }


# ------------------------------------------------------------------ Gaussian mechanism
def _log_ndtr(x: float) -> float:
    """``log Phi(x)``, accurate in the far left tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    # Asymptotic series of the Mills ratio.
    return (
        -0.5 * x * x
        - math.log(-x)
        - 0.5 * math.log(2 * math.pi)
        + math.log1p(-1.0 / (x * x) + 3.0 / x**4)
    )


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact delta(epsilon) of a Gaussian mechanism with ``mu = sensitivity / sigma``.

    ``delta = Phi(mu/2 - eps/mu) - exp(eps) Phi(-mu/2 - eps/mu)`` (Balle & Wang, 2018,
    Theorem 8).
    """
    if mu <= 0:
        return 0.0
    a = math.exp(_log_ndtr(mu / 2 - epsilon / mu))
    b = math.exp(epsilon + _log_ndtr(-mu / 2 - epsilon / mu))
    return max(0.0, a - b)


def _check_eps_delta(epsilon: float, delta: float) -> None:
    if not epsilon > 0:
        raise ValueError(f"`dp_epsilon` must be positive, got {epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"`dp_delta` must lie in (0, 1), got {delta}.")


def calibrate_gaussian(
    epsilon: float, delta: float, sensitivity: float = 1.0, method: str = "analytic"
) -> float:
    """Noise standard deviation making a Gaussian mechanism (epsilon, delta)-DP.

    Parameters
    ----------
    epsilon, delta : float
        Target guarantee of one release.
    sensitivity : float
        L2 sensitivity of the released vector.
    method : str
        ``"analytic"`` (exact, any epsilon; bisection on :func:`gaussian_delta`) or
        ``"classic"`` (``sqrt(2 ln(1.25/delta)) * sensitivity / epsilon``, valid only
        for epsilon < 1).

    Returns
    -------
    float
        sigma; the analytic value errs on the safe (larger) side by < 1e-9 relative.
    """
    _check_eps_delta(epsilon, delta)
    if not sensitivity > 0:
        raise ValueError(f"`sensitivity` must be positive, got {sensitivity}.")
    if method == "classic":
        if epsilon >= 1:
            raise ValueError(
                f"The classic Gaussian calibration needs `dp_epsilon` < 1, got "
                f"{epsilon}; use method='analytic'."
            )
        return math.sqrt(2 * math.log(1.25 / delta)) * sensitivity / epsilon
    if method != "analytic":
        raise ValueError(f"`method` must be 'analytic' or 'classic', got {method!r}.")
    lo, hi = 1e-6, 1.0  # bracket on mu = sensitivity / sigma; delta grows with mu
    while gaussian_delta(hi, epsilon) < delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if gaussian_delta(mid, epsilon) <= delta:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return sensitivity / lo


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon making a Gaussian mechanism with ``mu`` (eps, delta)-DP."""
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must lie in (0, 1), got {delta}.")
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return hi


# -------------------------------------------------------------- noise on statistics
@dataclass(frozen=True)
class StatsNoise:
    """Calibrated noise of one release of the statistics.

    Attributes
    ----------
    stds : dict[str, float]
        Noise standard deviation per array (same units as the array).
    noise_multiplier : float
        sigma / sensitivity of the joint (normalised) mechanism, for the accountant.
    epsilon, delta : float
        The per-release guarantee it was calibrated to.
    """

    stds: dict[str, float]
    noise_multiplier: float
    epsilon: float
    delta: float


def calibrate_stats_noise(cfg: PrivacyConfig, skills_per_sample: int = 1) -> StatsNoise:
    """Per-array noise for one (``dp_epsilon``, ``dp_delta``)-DP release of the stats.

    The arrays divided by their sensitivities form one vector of L2 sensitivity
    ``sqrt(4)``; it gets analytic-Gaussian noise, i.e. array ``k`` gets standard
    deviation ``sigma_joint * sensitivity_k``.
    """
    sens = stats_sensitivity(cfg.dp_clip, skills_per_sample)
    joint = math.sqrt(len(sens))
    sigma = calibrate_gaussian(cfg.dp_epsilon, cfg.dp_delta, joint)
    return StatsNoise(
        stds={name: sigma * s for name, s in sens.items()},
        noise_multiplier=sigma / joint,
        epsilon=cfg.dp_epsilon,
        delta=cfg.dp_delta,
    )


def add_gaussian_noise(
    arrays: Mapping[str, np.ndarray],
    noise: StatsNoise,
    rng: np.random.Generator,
    num_shares: int = 1,
) -> dict[str, np.ndarray]:
    """Add the calibrated noise (or one of ``num_shares`` shares of it) to the arrays.

    With secure aggregation each of ``n`` clients adds a share (``num_shares=n``,
    variance ``std^2 / n``); the sum then carries the full noise if all ``n`` survive.

    Raises
    ------
    KeyError
        If an array has no calibrated noise.
    """
    if num_shares < 1:
        raise ValueError(f"`num_shares` must be >= 1, got {num_shares}.")
    out = {}
    for name, value in arrays.items():
        if name not in noise.stds:
            raise KeyError(
                f"No calibrated noise for array `{name}`. Known: {sorted(noise.stds)}."
            )
        std = noise.stds[name] / math.sqrt(num_shares)
        value = np.asarray(value, dtype=np.float64)
        out[name] = value + rng.normal(0.0, std, size=value.shape)
    return out


def clamp_noisy_stats(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Post-process noisy statistics: counts, sums of squares and angular sums >= 0."""
    out = {name: np.asarray(v, dtype=np.float64).copy() for name, v in arrays.items()}
    for name in ("count", "sumsq", "angular_sum"):
        if name in out:
            out[name] = np.clip(out[name], 0.0, None)
    return out


# ------------------------------------------------------------------------ accounting
@dataclass
class PrivacyAccountant:
    """Privacy spent by a sequence of Gaussian releases on the same data.

    Parameters
    ----------
    delta : float
        The delta at which epsilon is reported.
    """

    delta: float
    releases: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check ``delta``."""
        if not 0 < self.delta < 1:
            raise ValueError(f"`dp_delta` must lie in (0, 1), got {self.delta}.")

    def record(self, noise_multiplier: float, label: str = "") -> None:
        """Add one release with ``sigma / sensitivity = noise_multiplier``."""
        if not noise_multiplier > 0:
            raise ValueError(
                f"`noise_multiplier` must be positive, got {noise_multiplier}."
            )
        self.releases.append((label, noise_multiplier))

    @property
    def mu(self) -> float:
        """Gaussian-DP parameter of the composition: ``sqrt(sum 1 / z_i^2)``."""
        return math.sqrt(sum(1.0 / z**2 for _, z in self.releases))

    @property
    def rho(self) -> float:
        """Return the zCDP parameter of the composition: ``sum 1 / (2 z_i^2)``."""
        return 0.5 * self.mu**2

    def epsilon(self, delta: float | None = None, method: str = "gdp") -> float:
        """Epsilon spent so far at ``delta`` (default: the accountant's).

        Parameters
        ----------
        delta : float | None
            Target delta.
        method : str
            ``"gdp"``: exact for compositions of Gaussian mechanisms; ``"zcdp"``: zCDP
            composition converted with ``eps = min_a a*rho + log(1 - 1/a)
            - (log a + log delta) / (a - 1)`` (looser, a cross-check).
        """
        delta = self.delta if delta is None else delta
        if not self.releases:
            return 0.0
        if method == "gdp":
            return gaussian_epsilon(self.mu, delta)
        if method != "zcdp":
            raise ValueError(f"`method` must be 'gdp' or 'zcdp', got {method!r}.")
        rho = self.rho
        alphas = np.geomspace(1.0 + 1e-4, 1e6, 20_000)
        eps = (
            alphas * rho
            + np.log1p(-1.0 / alphas)
            - (np.log(alphas) + math.log(delta)) / (alphas - 1.0)
        )
        basic = rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
        return float(max(0.0, min(eps.min(), basic)))

    def summary(self) -> dict[str, float]:
        """Releases, epsilon (both methods) and delta, for logging."""
        return {
            "releases": float(len(self.releases)),
            "epsilon": self.epsilon(),
            "epsilon-zcdp": self.epsilon(method="zcdp"),
            "delta": self.delta,
        }


def noise_generator(cfg: PrivacyConfig, *parts: int) -> np.random.Generator:
    """Generator of one release's noise: OS entropy, or ``dp_seed`` mixed with parts.

    ``parts`` (e.g. stage and partition) make seeded releases differ between clients
    and stages.
    """
    if cfg.dp_seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(cfg.dp_seed), *(int(p) for p in parts)])


def privatize_stats(
    arrays: Mapping[str, np.ndarray],
    cfg: PrivacyConfig,
    skills_per_sample: int,
    rng: np.random.Generator,
    num_shares: int = 1,
) -> dict[str, np.ndarray]:
    """A client's noisy release of its (already clipped) statistics.

    ``num_shares=1``: the client adds the full calibrated noise (its release alone is
    (``dp_epsilon``, ``dp_delta``)-DP, whoever sees it). With secure aggregation,
    ``num_shares`` is the threshold t: any t or more surviving shares sum to at least
    the calibrated variance, and the server only ever sees that sum.
    """
    noise = calibrate_stats_noise(cfg, skills_per_sample)
    noisy = add_gaussian_noise(arrays, noise, rng, num_shares=num_shares)
    return noisy if num_shares > 1 else clamp_noisy_stats(noisy)


def suppress_small_counts(
    arrays: Mapping[str, np.ndarray], min_count: float = 1.0
) -> dict[str, np.ndarray]:
    """Zero every skill whose (noisy) count is below ``min_count`` (post-processing).

    A noisy count near 0 would turn ``sum / count`` into a meaningless prototype; the
    skill is treated as absent instead.
    """
    out = {name: np.asarray(v, dtype=np.float64).copy() for name, v in arrays.items()}
    small = out["count"] < min_count  # (S,)
    for value in out.values():
        value[small] = 0.0
    return out
