"""``metrics.json`` and the other outputs of a federated run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig
from fed_asr.learned import unlearned_skills, warn_unlearned
from fed_asr.metrics import AccuracyMatrix, SkillAccuracyMatrices
from fed_asr.models.scoring import EVAL_PROTOCOLS, stream_skill_answers
from fed_asr.outputs import write_run_outputs
from fed_asr.schedule import ContinualState, stage_outcome
from fed_asr.security.dp import max_skills_per_sample
from fed_asr.security.dp_budget import privacy_budget_report

if TYPE_CHECKING:
    from server.run import FederatedRun


def privacy_report(
    cfg: ExperimentConfig,
    releases: list[int],
    num_skills: int,
    adapter_releases: int = 0,
) -> dict[str, Any]:
    """DP summary for ``metrics.json``: one epsilon over every release of a client.

    ``epsilon_spent`` composes the stage-end statistics releases (``releases``: their
    stages) and the ``adapter_releases`` noisy adapter updates as if on the same data
    (``fed_asr.security.dp_budget``).
    """
    m = max_skills_per_sample(cfg.regularizer.tau_skill, num_skills)
    return privacy_budget_report(cfg.privacy, m, releases, adapter_releases)


def write_federated_outputs(run: FederatedRun, state: ContinualState) -> Path:
    """Accuracy matrices (pooled and per client), round logs, totals; the files."""
    cfg, names = run.cfg, run.stage_names
    T = len(names)
    rounds = run.ledger.rounds
    # The last round of each stage is the row of the accuracy matrices
    ends = {t: run.ledger.of_stage(t)[-1] for t in range(T) if run.ledger.of_stage(t)}
    matrix, typed = AccuracyMatrix(T), AccuracyMatrix(T)
    per_skill = {p: SkillAccuracyMatrices(T) for p in EVAL_PROTOCOLS}
    partitions = sorted({int(p) for r in rounds for p in r.per_client})
    per_client = {str(p): AccuracyMatrix(T) for p in partitions}
    for t, end in sorted(ends.items()):
        matrix.set_row(t, [end.accuracy.get(str(i), np.nan) for i in range(t + 1)])
        typed.set_row(
            t,
            [
                _ratio(end.counts, P.correct_key(i, "type"), P.total_key(i))
                for i in range(t + 1)
            ],
        )
        for i in range(t + 1):
            for protocol, skills in _skill_counts(end.counts, i).items():
                per_skill[protocol].add(t, i, skills)
        for p, row in end.per_client.items():
            per_client[str(p)].set_row(
                t, [row.get(str(i), np.nan) for i in range(t + 1)]
            )
    curves = {
        name: [(r.round, r.accuracy[str(i)]) for r in rounds if str(i) in r.accuracy]
        for i, name in enumerate(names)
    }
    stages = []
    for t in range(T):
        own = run.ledger.of_stage(t)
        losses = run.ledger.task_losses(t)
        outcome = stage_outcome(losses, cfg.federation)
        stages.append(
            {
                "stage": names[t],
                "rounds": len(own),
                "underfit": outcome.underfit,
                "task_loss": losses,
            }
        )
    logs = run.ledger.to_list()
    unlearned = unlearned_skills(
        per_skill["type"],
        stream_skill_answers(run.stream),
        names[: matrix.completed_rows],
    )
    warn_unlearned(unlearned)
    extra = {
        "engine": run.engine,
        "method": cfg.method.name,
        "stream": run.stream.name,
        "seed": cfg.seed,
        "num_clients": cfg.federation.num_clients,
        "round_schedule": cfg.federation.schedule,
        "stage_rounds": stages,
        "underfit_stages": [s["stage"] for s in stages if s["underfit"]],
        "unlearned_skills": unlearned,
        "accuracy_matrix_type": typed.to_list(),
        "metrics_type": typed.summary().as_dict() if typed.completed_rows else {},
        "per_skill": {
            p: m.to_json(matrix.completed_rows)
            for p, m in per_skill.items()
            if m.skills
        },
        # clients' drift sums pooled (server/drift_round.py); [] when off or private
        "drift": run.drift_round.rows if run.drift_round is not None else [],
        "adapter_strategy": cfg.federation.strategy,
        "spectrum_strategy": cfg.spectrum.strategy,
        "lora_aggregation": cfg.lora.aggregation,
        "per_client": {p: m.to_list() for p, m in per_client.items()},
        "rounds": logs,
        "communication_bytes": run.ledger.totals(),
        "dropped_replies": sum(len(r["dropped"]) for r in logs),
        "failed_replies": sum(r["failures"] for r in logs),
        "dropped": [{"round": r["round"], **d} for r in logs for d in r["dropped"]],
        "clipped_replies": [
            {"round": r["round"], **c} for r in logs for c in r["clipped"]
        ],
        "flagged_clients": [
            {"round": r["round"], **f} for r in logs for f in r["flagged"]
        ],
        "security": {
            "secure_spectrum": cfg.privacy.secure_spectrum,
            "signed": run.signing_key is not None,
            "hashed_checkpoints": cfg.security.hash_checkpoints,
        },
        "privacy": privacy_report(
            cfg,
            run.stage_end_round.releases,
            len(run.stream.skills),
            adapter_releases=run.done_rounds,
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
        stage_boundaries=[ends[t].round + 0.5 for t in sorted(ends)[:-1]],
    )


def _ratio(counts: dict[str, int], correct: str, total: str) -> float:
    n = counts.get(total, 0)
    return counts.get(correct, 0) / n if n else float("nan")


def _skill_counts(
    counts: dict[str, int], stage: int
) -> dict[str, dict[str, tuple[int, int]]]:
    """Protocol -> skill -> (correct, total) of ``stage`` from pooled counts."""
    out: dict[str, dict[str, tuple[int, int]]] = {p: {} for p in EVAL_PROTOCOLS}
    prefix = P.total_key(stage) + "-"
    for key, total in counts.items():
        if not key.startswith(prefix) or not total:
            continue
        skill = key[len(prefix) :]
        for protocol in EVAL_PROTOCOLS:
            correct = counts.get(P.correct_key(stage, protocol, skill), 0)
            out[protocol][skill] = (correct, total)
    return out
