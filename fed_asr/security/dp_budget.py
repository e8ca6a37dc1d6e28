"""One privacy budget per client over every release it makes (``metrics.json``).

With ``privacy.dp`` a client releases, on the same training data, one noisy adapter
update per global round (``fed_asr.security.adapter_dp``) and one noisy copy of its
spectrum statistics per stage end (``fed_asr.security.dp``). Both are Gaussian
mechanisms, so one :class:`~fed_asr.security.dp.PrivacyAccountant` composes them
exactly (Gaussian DP) into the single epsilon reported as ``epsilon_spent``.

Every client is counted in every round: a client sends at most one update per round,
so the figure bounds every client's spend (it is exact for a client that took part in
all rounds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fed_asr.config import PrivacyConfig
from fed_asr.security.adapter_dp import adapter_sensitivity, calibrate_adapter_noise
from fed_asr.security.dp import PrivacyAccountant, calibrate_stats_noise


def client_accountant(
    cfg: PrivacyConfig,
    skills_per_sample: int,
    statistics_releases: Sequence[int],
    adapter_releases: int,
) -> PrivacyAccountant:
    """The accountant of one client after the given releases.

    Parameters
    ----------
    cfg : PrivacyConfig
        Calibration of both kinds of release.
    skills_per_sample : int
        Most skills one sample counts toward (``max_skills_per_sample``).
    statistics_releases : Sequence[int]
        Stage of each released set of statistics.
    adapter_releases : int
        Number of adapter updates sent (global rounds).
    """
    if adapter_releases < 0:
        raise ValueError(f"`adapter_releases` must be >= 0, got {adapter_releases}.")
    accountant = PrivacyAccountant(cfg.dp_delta)
    stats = calibrate_stats_noise(cfg, skills_per_sample)
    for stage in statistics_releases:
        accountant.record(stats.noise_multiplier, f"statistics, stage {stage}")
    adapter = calibrate_adapter_noise(cfg)
    for round_ in range(1, adapter_releases + 1):
        accountant.record(adapter.noise_multiplier, f"adapter, round {round_}")
    return accountant


def privacy_budget_report(
    cfg: PrivacyConfig,
    skills_per_sample: int,
    statistics_releases: Sequence[int],
    adapter_releases: int,
) -> dict[str, Any]:
    """The ``privacy`` entry of ``metrics.json``.

    ``epsilon_spent`` composes every release (both kinds) at ``delta``; each kind's
    calibration is listed under ``statistics`` and ``adapter``.
    """
    if not cfg.dp:
        return {"dp": False}
    accountant = client_accountant(
        cfg, skills_per_sample, statistics_releases, adapter_releases
    )
    stats = calibrate_stats_noise(cfg, skills_per_sample)
    adapter = calibrate_adapter_noise(cfg)
    return {
        "dp": True,
        "mode": "distributed statistics (secure aggregation), local adapters"
        if cfg.secure_spectrum
        else "local (each client's release)",
        "delta": cfg.dp_delta,
        "epsilon_spent": accountant.epsilon(),
        "epsilon_spent_zcdp": accountant.epsilon(method="zcdp"),
        "releases": len(accountant.releases),
        "statistics": {
            "releases": len(statistics_releases),
            "epsilon_per_release": cfg.dp_epsilon,
            "noise_multiplier": stats.noise_multiplier,
            "clip": cfg.dp_clip,
            "skills_per_sample": skills_per_sample,
        },
        "adapter": {
            "releases": adapter_releases,
            "epsilon_per_release": cfg.adapter_epsilon,
            "noise_multiplier": adapter.noise_multiplier,
            "noise_std": adapter.std,
            "clip": cfg.adapter_clip,
            "sensitivity": adapter_sensitivity(cfg.adapter_clip),
        },
        "num_examples_granularity": cfg.num_examples_granularity,
    }
