"""Skills not learned by their own stage: flagged against the type protocol's chance."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flower_helpers import loopback_grid, set_task_identity

from fed_asr.central import run_central
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.learned import unlearned_skills, warn_unlearned
from fed_asr.metrics import SkillAccuracyMatrices
from fed_asr.models import load_run_base_model
from fed_asr.models.fingerprint import base_fingerprint
from fed_asr.models.scoring import stream_skill_answers
from server.run import FederatedRun

ANSWERS = {"color": ["blue", "green", "red", "yellow"], "existence": ["no", "yes"]}


def _diagonal(counts: dict[str, list[tuple[int, int]]]) -> SkillAccuracyMatrices:
    """Per skill, (correct, total) on each stage's own test data after that stage."""
    matrices = SkillAccuracyMatrices(2)
    for skill, per_stage in counts.items():
        for t, pair in enumerate(per_stage):
            matrices.add(t, t, {skill: pair})
    return matrices


def test_skill_at_chance_is_flagged_and_a_learned_one_is_not() -> None:
    # Prepare: colour guessed (25 of 100, chance 1/4) in stage 0, learned in stage 1
    matrices = _diagonal({"color": [(25, 100), (90, 100)]})
    matrices.add(1, 0, {"color": (30, 100)})  # off the diagonal: forgetting, not this

    # Execute
    flagged = unlearned_skills(matrices, ANSWERS, ["a", "b"])

    # Assert
    assert flagged == [
        {
            "stage": "a",
            "skill": "color",
            "accuracy": 0.25,
            "chance": 0.25,
            "questions": 100,
        }
    ]


@pytest.mark.parametrize(
    ("correct", "total", "flagged"),
    [
        (3, 4, True),  # 0.75 on 4 yes/no questions: within 2 SE (0.5) of chance
        (60, 80, False),  # 0.75 on 80: 0.5 + 2 * 0.056 = 0.61 < 0.75
        (30, 50, True),  # 0.60 on 50: 0.5 + 2 * 0.071 = 0.64 > 0.60
        (20, 80, True),  # below chance (a wrong constant answer)
    ],
)
def test_flag_needs_accuracy_significantly_above_chance(
    correct: int, total: int, flagged: bool
) -> None:
    matrices = _diagonal({"existence": [(correct, total)]})
    assert bool(unlearned_skills(matrices, ANSWERS, ["a"])) is flagged


def test_single_answer_and_unknown_skills_are_never_flagged() -> None:
    # A skill with one answer cannot be guessed wrong; one without answers is unknown
    matrices = _diagonal({"size": [(0, 10)], "mystery": [(0, 10)]})
    answers: dict[str, Any] = {"size": ["large"]}
    assert unlearned_skills(matrices, answers, ["a"]) == []


def test_only_completed_stages_are_checked() -> None:
    matrices = _diagonal({"color": [(90, 100), (0, 100)]})
    assert unlearned_skills(matrices, ANSWERS, ["a"]) == []
    both = unlearned_skills(matrices, ANSWERS, ["a", "b"])
    assert [row["stage"] for row in both] == ["b"]


def test_warning_names_stage_skill_and_chance(caplog: pytest.LogCaptureFixture) -> None:
    flagged = unlearned_skills(_diagonal({"color": [(2, 40)]}), ANSWERS, ["shapes"])
    with caplog.at_level(logging.WARNING, logger="fed_asr.learned"):
        warn_unlearned(flagged)
    assert "stage shapes did NOT LEARN skill color: 0.050" in caplog.text
    assert "chance 0.250 over 40 questions" in caplog.text


@pytest.mark.parametrize("engine", ["central", "simulation"])
def test_runs_report_unlearned_skills_from_their_own_counts(
    run_overrides, engine: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two barely trained stages (2 steps), so skills sit near chance
    overrides = run_overrides(
        f"unlearned-{engine}",
        engine=engine,
        method="vanilla",
        **{"train.max_steps_per_stage": 2, "data.max_train_per_stage": 16},
    )
    cfg = compose_config("config", overrides)
    set_task_identity(7)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fed_asr.learned"):
        if engine == "central":
            path = run_central(cfg)
        else:
            path = FederatedRun(cfg, loopback_grid(overrides)).run()
    metrics = json.loads(Path(path).read_text())

    # Assert: the report is the one the run's own type-protocol counts give
    stream = build_stream(cfg.data, cfg.seed)
    answers = stream_skill_answers(stream)
    per_skill = SkillAccuracyMatrices.from_json(metrics["per_skill"]["type"])
    names = [st.name for st in stream.stages]
    assert metrics["unlearned_skills"] == unlearned_skills(per_skill, answers, names)
    # and the run records which base it started from
    base, _ = load_run_base_model(cfg.model, cfg.data, stream.vocabulary(), "cpu")
    assert metrics["base_fingerprint"] == base_fingerprint(base)
    assert metrics["unlearned_skills"]  # two steps do not lift a skill off chance
    for row in metrics["unlearned_skills"]:
        assert f"stage {row['stage']} did NOT LEARN skill {row['skill']}" in caplog.text
