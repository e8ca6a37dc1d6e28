"""``metrics.json`` and the other outputs of a federated run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fed_asr.config import ExperimentConfig
from fed_asr.metrics import AccuracyMatrix
from fed_asr.outputs import write_run_outputs
from fed_asr.schedule import ContinualState
from fed_asr.security.dp import (
    PrivacyAccountant,
    calibrate_stats_noise,
    max_skills_per_sample,
)

if TYPE_CHECKING:
    from server.run import FederatedRun


def privacy_report(
    cfg: ExperimentConfig, releases: list[int], num_skills: int
) -> dict[str, Any]:
    """DP summary for ``metrics.json``: epsilon spent over the stage-end releases.

    ``epsilon_spent`` composes every release as if on the same data (the
    conservative figure); each stage's data being disjoint, a sample is in one
    release and ``epsilon_per_release`` bounds it alone.
    """
    if not cfg.privacy.dp:
        return {"dp": False}
    m = max_skills_per_sample(cfg.regularizer.tau_skill, num_skills)
    noise = calibrate_stats_noise(cfg.privacy, m)
    accountant = PrivacyAccountant(cfg.privacy.dp_delta)
    for stage in releases:
        accountant.record(noise.noise_multiplier, f"stage {stage}")
    return {
        "dp": True,
        "mode": "distributed (secure aggregation)"
        if cfg.privacy.secure_spectrum
        else "local (each client's release)",
        "releases": len(releases),
        "epsilon_per_release": cfg.privacy.dp_epsilon,
        "delta": cfg.privacy.dp_delta,
        "epsilon_spent": accountant.epsilon() if releases else 0.0,
        "noise_multiplier": noise.noise_multiplier,
        "clip": cfg.privacy.dp_clip,
        "skills_per_sample": m,
    }


def write_federated_outputs(run: FederatedRun, state: ContinualState) -> Path:
    """Accuracy matrices (pooled and per client), round logs, totals; the files."""
    cfg, names = run.cfg, run.stage_names
    T, R = len(names), cfg.federation.rounds_per_stage
    rounds = run.ledger.rounds
    by_round = {r.round: r for r in rounds}
    matrix = AccuracyMatrix(T)
    partitions = sorted({int(p) for r in rounds for p in r.per_client})
    per_client = {str(p): AccuracyMatrix(T) for p in partitions}
    for t in range(T):
        end = by_round.get((t + 1) * R)
        if end is None:
            continue
        matrix.set_row(t, [end.accuracy.get(str(i), np.nan) for i in range(t + 1)])
        for p, row in end.per_client.items():
            per_client[str(p)].set_row(
                t, [row.get(str(i), np.nan) for i in range(t + 1)]
            )
    curves = {
        name: [(r.round, r.accuracy[str(i)]) for r in rounds if str(i) in r.accuracy]
        for i, name in enumerate(names)
    }
    logs = run.ledger.to_list()
    extra = {
        "engine": run.engine,
        "method": cfg.method.name,
        "stream": run.stream.name,
        "seed": cfg.seed,
        "num_clients": cfg.federation.num_clients,
        "rounds_per_stage": R,
        "adapter_strategy": cfg.federation.strategy,
        "spectrum_strategy": cfg.spectrum.strategy,
        "lora_aggregation": cfg.lora.aggregation,
        "per_client": {p: m.to_list() for p, m in per_client.items()},
        "rounds": logs,
        "communication_bytes": run.ledger.totals(),
        "dropped_replies": sum(len(r["dropped"]) for r in logs),
        "failed_replies": sum(r["failures"] for r in logs),
        "dropped": [{"round": r["round"], **d} for r in logs for d in r["dropped"]],
        "security": {
            "secure_spectrum": cfg.privacy.secure_spectrum,
            "signed": run.signing_key is not None,
            "hashed_checkpoints": cfg.security.hash_checkpoints,
        },
        "privacy": privacy_report(
            cfg, run.stage_end_round.releases, len(run.stream.skills)
        ),
        "wall_time_s": run.elapsed(),
    }
    return write_run_outputs(
        run.out,
        cfg,
        names,
        matrix,
        run.model,
        state.spectrum,
        extra,
        curves=curves,
        curve_xlabel="round",
        stage_boundaries=[(t + 1) * R + 0.5 for t in range(T - 1)],
    )
