"""Tests of the ``all`` / ``type`` evaluation protocols of candidate scoring."""

from __future__ import annotations

import pytest
import torch

from fed_asr.config import ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import VQACollator, candidate_token_ids, score_candidates
from fed_asr.models.scoring import (
    allowed_answers_mask,
    predict,
    predict_protocols,
    restrict_scores,
    skill_answer_sets,
)
from fed_asr.models.tiny import build_tiny

ANSWERS = ["red", "blue", "circle", "yes", "no"]


def test_skill_answer_sets_uses_explicit_skill_then_parser() -> None:
    # Prepare
    rows = [
        VQASample("a.png", "What color is the shape?", "red"),
        VQASample("b.png", "What color is the shape?", "blue"),
        VQASample("c.png", "Is there a circle?", "no"),
        VQASample("d.png", "anything", "yes", skill="existence"),
    ]

    # Execute
    sets = skill_answer_sets(rows)
    custom = skill_answer_sets(rows, skill_of=lambda s: "one")

    # Assert
    assert sets == {"color": ["blue", "red"], "existence": ["no", "yes"]}
    assert custom == {"one": ["blue", "no", "red", "yes"]}


def test_allowed_answers_mask_marks_skill_answers_and_allows_unknown_skill() -> None:
    # Prepare
    sets = {"color": ["red", "blue", "green"], "existence": ["yes", "no"]}

    # Execute
    mask = allowed_answers_mask(["color", "existence", "count"], ANSWERS, sets)

    # Assert
    expected = torch.tensor(
        [
            [True, True, False, False, False],
            [False, False, False, True, True],
            [True, True, True, True, True],
        ]
    )
    assert torch.equal(mask, expected)


def test_restrict_scores_masks_disallowed_and_keeps_empty_rows() -> None:
    # Prepare
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 2.0, 1.0]])
    allowed = torch.tensor([[True, False, True], [False, False, False]])

    # Execute
    restricted = restrict_scores(scores, allowed)

    # Assert
    assert restricted.argmax(-1).tolist() == [2, 0]
    assert restricted[0, 1] == float("-inf")
    torch.testing.assert_close(restricted[1], scores[1])


def test_restrict_scores_wrong_shape_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"`allowed` must have shape \(1, 3\)"):
        restrict_scores(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool))


def test_predict_protocols_one_pass_equals_masked_argmax(
    cfg: ModelConfig, vocab: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab, seed=3)
    model.eval()
    batch = VQACollator(processor, cfg.prompt_template, ANSWERS)(vqa_samples)
    candidates = candidate_token_ids(processor, ANSWERS)
    allowed = allowed_answers_mask(
        ["color", "existence", "shape", "color"],
        ANSWERS,
        {"color": ["red", "blue"], "existence": ["yes", "no"], "shape": ["circle"]},
    )

    # Execute
    out = predict_protocols(model, batch, candidates, allowed)
    scores = score_candidates(model, batch, candidates)

    # Assert
    assert torch.equal(out["all"], scores.argmax(-1))
    assert torch.equal(out["type"], predict(model, batch, candidates, allowed=allowed))
    assert out["type"][2].item() == ANSWERS.index("circle")
    assert allowed[torch.arange(4), out["type"]].all()
