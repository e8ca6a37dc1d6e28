"""Tests of the easy-VQA question parser and soft skill probabilities."""

from __future__ import annotations

import pytest
import torch

from fed_asr.data import (
    EASYVQA_SKILLS,
    VQASample,
    parse_question,
    skill_distribution,
    skill_probabilities,
)
from fed_asr.data.skills import QUESTION_TEMPLATES

# Every template of the task brief, with the word filled in and its expected type.
ALL_TEMPLATES = [
    ("what shape is in the image?", "shape"),
    ("what shape does the image contain?", "shape"),
    ("what shape is present?", "shape"),
    ("what is the red shape?", "shape"),
    ("what color is the shape?", "color"),
    ("what color is the circle?", "color"),
    ("what is the color of the triangle?", "color"),
    ("what is the color of the shape?", "color"),
    ("is a blue shape present?", "existence"),
    ("is there a teal shape?", "existence"),
    ("does the image contain a gray shape?", "existence"),
    ("is there a black shape in the image?", "existence"),
    ("is a rectangle present?", "existence"),
    ("is there a circle?", "existence"),
    ("does the image contain a triangle?", "existence"),
    ("is there a rectangle in the image?", "existence"),
    ("does the image not contain a yellow shape?", "negated_existence"),
    ("is there not a brown shape?", "negated_existence"),
    ("is there not a green shape in the image?", "negated_existence"),
    ("is no red shape present?", "negated_existence"),
    ("is no circle present?", "negated_existence"),
    ("is there not a triangle?", "negated_existence"),
    ("does the image not contain a rectangle?", "negated_existence"),
    ("is there not a circle in the image?", "negated_existence"),
]


def _sample(question: str, skill: str | None = None) -> VQASample:
    return VQASample(image="x.png", question=question, answer="yes", skill=skill)


def test_all_templates_listed_once() -> None:
    # Prepare
    n_templates = sum(len(t) for t in QUESTION_TEMPLATES.values())

    # Execute
    skills = [skill for _, skill in ALL_TEMPLATES]

    # Assert
    assert n_templates == len(ALL_TEMPLATES) == 24
    assert set(skills) == set(EASYVQA_SKILLS)


@pytest.mark.parametrize(("question", "expected"), ALL_TEMPLATES)
def test_parse_question_on_template_gives_primary_type(
    question: str, expected: str
) -> None:
    # Execute
    parsed = parse_question(question)

    # Assert
    assert parsed.skill == expected


def test_parse_question_ignores_case_and_spacing() -> None:
    # Execute
    parsed = parse_question("  Is there NOT a Red shape ? ")

    # Assert
    assert parsed.skill == "negated_existence"
    assert parsed.colors == ("red",)
    assert parsed.shapes == ()


def test_parse_question_unknown_raises_naming_question() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="how many circles are there"):
        parse_question("how many circles are there?")


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("is there a red shape?", {"existence": 0.7, "color": 0.3}),
        ("what color is the circle?", {"color": 0.7, "shape": 0.3}),
        ("what color is the shape?", {"color": 1.0}),
        ("what is the teal shape?", {"shape": 0.7, "color": 0.3}),
        ("is no triangle present?", {"negated_existence": 0.7, "shape": 0.3}),
        ("what shape is present?", {"shape": 1.0}),
    ],
)
def test_skill_distribution_gives_primary_and_named_aspects(
    question: str, expected: dict[str, float]
) -> None:
    # Execute
    dist = skill_distribution(question)

    # Assert
    assert dist.keys() == expected.keys()
    for skill, p in expected.items():
        assert dist[skill] == pytest.approx(p)


def test_skill_distribution_primary_mass_is_configurable() -> None:
    # Execute
    dist = skill_distribution("is there a red shape?", primary_mass=0.9)

    # Assert
    assert dist == pytest.approx({"existence": 0.9, "color": 0.1})


def test_skill_distribution_bad_primary_mass_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`primary_mass` must be in"):
        skill_distribution("is there a red shape?", primary_mass=0.0)


def test_skill_probabilities_on_all_templates_rows_sum_to_one_primary_dominates() -> (
    None
):
    # Prepare
    samples = [_sample(q) for q, _ in ALL_TEMPLATES]
    skills = list(EASYVQA_SKILLS)

    # Execute
    probs = skill_probabilities(samples, skills)

    # Assert
    assert probs.shape == (24, 4)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(24), atol=1e-6, rtol=0)
    expected = torch.tensor([skills.index(s) for _, s in ALL_TEMPLATES])
    assert torch.equal(probs.argmax(dim=1), expected)
    assert bool((probs.max(dim=1).values >= 0.7 - 1e-6).all())


def test_skill_probabilities_explicit_skill_wins_one_hot() -> None:
    # Prepare
    samples = [_sample("is there a red shape?", skill="color")]

    # Execute
    probs = skill_probabilities(samples, EASYVQA_SKILLS)

    # Assert
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_skill_probabilities_drops_aspects_outside_skills_and_renormalises() -> None:
    # Prepare
    samples = [_sample("is there a red shape?")]

    # Execute
    probs = skill_probabilities(samples, ["existence", "shape"])

    # Assert
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0]]))


def test_skill_probabilities_primary_outside_skills_raises() -> None:
    # Prepare
    samples = [_sample("what shape is present?")]

    # Execute / Assert
    with pytest.raises(ValueError, match="'shape'.*not one of `skills`"):
        skill_probabilities(samples, ["color", "existence"])


def test_skill_probabilities_unknown_question_uses_fallback() -> None:
    # Prepare
    samples = [_sample("how many shapes?"), _sample("is there a circle?")]

    # Execute
    probs = skill_probabilities(samples, EASYVQA_SKILLS, fallback="existence")

    # Assert
    torch.testing.assert_close(
        probs, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.3, 0.0, 0.7, 0.0]])
    )


def test_skill_probabilities_unknown_question_without_fallback_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="how many shapes"):
        skill_probabilities([_sample("how many shapes?")], EASYVQA_SKILLS)


def test_skill_probabilities_empty_batch_gives_empty_tensor() -> None:
    # Execute
    probs = skill_probabilities([], EASYVQA_SKILLS)

    # Assert
    assert probs.shape == (0, 4)
