"""Skills a stage did not learn: own accuracy not above chance after its training.

A stage whose loss plateaued is not flagged ``underfit`` by the round schedule, yet
it may have learned nothing: a skill answered at chance right after its own stage
cannot be forgotten, so AF and Last say nothing about it. Under the ``type``
protocol a question is answered among its skill's answers, so uniform guessing
scores ``1/k`` for a skill with ``k`` answers. A skill's diagonal entry (its
questions in stage ``t``'s test set, after training on stage ``t``) is flagged when
it is not significantly above that: accuracy <= ``1/k`` + ``z`` binomial standard
errors of ``n`` questions (one-sided, ``z`` = 2 by default, about 2.3% false alarms
per entry when the model does guess).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fed_asr.metrics import SkillAccuracyMatrices

LOGGER = logging.getLogger(__name__)

SIGNIFICANCE_Z = 2.0


def unlearned_skills(
    per_skill: SkillAccuracyMatrices,
    skill_answers: Mapping[str, Sequence[str]],
    stage_names: Sequence[str],
    z: float = SIGNIFICANCE_Z,
) -> list[dict[str, Any]]:
    """Per (stage, skill) diagonal entry not above chance under the ``type`` protocol.

    Parameters
    ----------
    per_skill : SkillAccuracyMatrices
        The run's ``type``-protocol counts per skill.
    skill_answers : Mapping[str, Sequence[str]]
        Skill -> its answers (the ``type`` protocol's candidates). Skills with
        fewer than two answers, or missing here, cannot be guessed wrong and are
        never flagged.
    stage_names : Sequence[str]
        Names of the stages, in order.
    z : float
        Standard errors above chance an accuracy must reach to count as learned.

    Returns
    -------
    list[dict[str, Any]]
        ``{"stage", "skill", "accuracy", "chance", "questions"}``, in stage order.
    """
    flagged: list[dict[str, Any]] = []
    for t, name in enumerate(stage_names):
        for skill in per_skill.skills:
            k = len(skill_answers.get(skill, ()))
            hits, total = per_skill.counts(skill, t, t)
            if k < 2 or total == 0:
                continue
            chance = 1.0 / k
            accuracy = hits / total
            margin = z * math.sqrt(chance * (1.0 - chance) / total)
            if accuracy <= chance + margin:
                flagged.append(
                    {
                        "stage": name,
                        "skill": skill,
                        "accuracy": accuracy,
                        "chance": chance,
                        "questions": total,
                    }
                )
    return flagged


def warn_unlearned(flagged: Sequence[Mapping[str, Any]]) -> None:
    """One warning line per flagged (stage, skill)."""
    for row in flagged:
        LOGGER.warning(
            "[fed-asr] stage %s did NOT LEARN skill %s: %.3f right after its own "
            "training, chance %.3f over %d questions (type protocol); its forgetting "
            "cannot be measured (train longer: `train.epochs`, "
            "`federation.max_rounds_per_stage`; or a base that perceives it)",
            row["stage"],
            row["skill"],
            row["accuracy"],
            row["chance"],
            row["questions"],
        )
