"""Evaluation protocols, per-skill counts, drift and grounding on the tiny model."""

from __future__ import annotations

import pytest
import torch

from fed_asr.config import ModelConfig, RegularizerConfig
from fed_asr.data import VQASample
from fed_asr.evaluation import (
    AttentionProbe,
    DriftMonitor,
    _stacked_maps,
    probe_attention,
    score_stage,
)
from fed_asr.models import VQACollator, candidate_token_ids, score_candidates
from fed_asr.models.tiny import build_tiny

ANSWERS = ["red", "green", "blue", "circle", "rectangle", "triangle", "yes", "no"]
SKILL_ANSWERS = {
    "color": ["blue", "green", "red"],
    "shape": ["circle", "rectangle", "triangle"],
    "existence": ["no", "yes"],
}


@pytest.fixture
def labelled(image_files: dict[str, str]) -> list[VQASample]:
    """Questions with explicit skills; two carry a region (the object's box)."""
    return [
        VQASample(
            image_files["red circle"], "what color is the shape?", "red", "color"
        ),
        VQASample(
            image_files["blue triangle"], "is there a circle?", "no", "existence"
        ),
        VQASample(
            image_files["green rectangle"],
            "what shape is it?",
            "rectangle",
            "shape",
            (0.0, 0.0, 0.5, 0.5),
        ),
        VQASample(
            image_files["red triangle"],
            "what shape is it?",
            "triangle",
            "shape",
            (0.5, 0.5, 1.0, 1.0),
        ),
    ]


@pytest.fixture
def tiny(cfg: ModelConfig, vocab: list[str]):  # noqa: ANN201
    model, processor = build_tiny(cfg, vocab, seed=3)
    return model.eval(), VQACollator(processor, cfg.prompt_template, ANSWERS)


def test_score_stage_all_protocol_equals_argmax_over_every_answer(
    tiny,
    labelled: list[VQASample],  # noqa: ANN001
) -> None:
    # Prepare
    model, collator = tiny
    batch = collator(labelled)
    candidates = candidate_token_ids(collator.processor, ANSWERS)
    with torch.no_grad():
        expected = score_candidates(model, batch, candidates).argmax(-1)
    hits = int((expected == batch["answer_index"]).sum())

    # Execute
    scores = score_stage(model, collator, labelled, 3, SKILL_ANSWERS)

    # Assert
    assert scores.total == 4
    assert scores.correct["all"] == hits
    assert sum(n for _, n in scores.per_skill["all"].values()) == 4
    assert scores.per_skill["all"]["shape"][1] == 2


def test_score_stage_type_protocol_is_at_least_as_accurate_per_skill(
    tiny,
    labelled: list[VQASample],  # noqa: ANN001
) -> None:
    # Prepare
    model, collator = tiny

    # Execute
    scores = score_stage(model, collator, labelled, 4, SKILL_ANSWERS)

    # Assert: restricting candidates to the right skill can only help
    for skill, (correct, total) in scores.per_skill["type"].items():
        assert correct >= scores.per_skill["all"][skill][0]
        assert total == scores.per_skill["all"][skill][1]


def test_score_stage_confusion_counts_gold_and_type_predictions_per_skill(
    tiny,
    labelled: list[VQASample],  # noqa: ANN001
) -> None:
    # Prepare
    model, collator = tiny

    # Execute
    scores = score_stage(model, collator, labelled, 2, SKILL_ANSWERS)

    # Assert: one count per sample, gold rows of its skill, hits on the diagonal
    confusion = scores.confusion
    assert set(confusion["shape"]) == {"rectangle", "triangle"}
    for skill, (correct, total) in scores.per_skill["type"].items():
        rows = confusion[skill]
        assert sum(n for row in rows.values() for n in row.values()) == total
        assert sum(row.get(gold, 0) for gold, row in rows.items()) == correct
        predicted = {p for row in rows.values() for p in row}
        assert predicted <= set(SKILL_ANSWERS[skill])


def test_probe_attention_grounding_only_for_samples_with_region(
    tiny,
    labelled: list[VQASample],  # noqa: ANN001
) -> None:
    # Prepare
    model, collator = tiny
    reg = RegularizerConfig(l_sel=2)

    # Execute
    probe = probe_attention(model, collator, labelled, reg, 2)

    # Assert: descriptors for all, shares for the 2 boxed samples, in [0, 1]
    assert probe.descriptors.shape[0] == 4
    assert probe.skills == ["color", "existence", "shape", "shape"]
    assert probe.grounding.shape == (2,)
    assert bool(((probe.grounding >= 0) & (probe.grounding <= 1)).all())
    torch.testing.assert_close(probe.uniform, torch.tensor([0.25, 0.25]))


def test_probe_attention_keeps_the_descriptors_maps_only_when_asked(
    tiny,
    labelled: list[VQASample],  # noqa: ANN001
) -> None:
    # Prepare
    model, collator = tiny
    reg = RegularizerConfig(l_sel=2)

    # Execute
    without = probe_attention(model, collator, labelled, reg, 3)
    probe = probe_attention(model, collator, labelled, reg, 3, keep_maps=True)

    # Assert: none by default; else (N, layers * heads, P) maps that sum to 1
    assert without.maps.numel() == 0
    heads = model.config.text_config.num_attention_heads
    assert probe.maps.shape[:2] == (4, 2 * heads)
    torch.testing.assert_close(
        probe.maps.float().sum(-1), torch.ones(4, 2 * heads), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(probe.descriptors, without.descriptors)


def test_maps_of_batches_on_different_grids_are_not_kept() -> None:
    same = _stacked_maps([torch.ones(2, 3, 4) / 4, torch.ones(1, 3, 4) / 4])
    assert same.shape == (3, 3, 4)
    assert _stacked_maps([torch.ones(2, 3, 4), torch.ones(1, 3, 9)]).numel() == 0
    assert _stacked_maps([]).numel() == 0


def test_drift_monitor_floor_is_small_and_shift_is_large() -> None:
    # Prepare: stage-0 prototypes from N(0, 1); the same distribution, then shifted
    gen = torch.Generator().manual_seed(0)
    skills = ["a"] * 400
    train = AttentionProbe(
        torch.randn(400, 6, generator=gen), skills, *[torch.zeros(0)] * 2
    )
    same = AttentionProbe(
        torch.randn(400, 6, generator=gen), skills, *[torch.zeros(0)] * 2
    )
    moved = AttentionProbe(same.descriptors + 2.0, skills, *[torch.zeros(0)] * 2)
    monitor = DriftMonitor(("a", "b"), 1e-4)

    # Execute
    monitor.record(0, train)
    floor = monitor.measure(0, 0, same)
    drift = monitor.measure(1, 0, moved)

    # Assert: d2 / D is ~1 in distribution, ~1 + 4 after a 2-sigma shift
    assert floor["drift"]["a"] == pytest.approx(1.0, abs=0.2)
    assert drift["drift"]["a"] == pytest.approx(5.0, abs=0.5)
    assert set(floor["drift"]) == {"a"}  # no prototype of b: not measured
    assert len(monitor.rows) == 2
