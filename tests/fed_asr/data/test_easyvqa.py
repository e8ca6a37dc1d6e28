"""Tests of the easy-VQA streams, derived image labels and caption samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from fed_asr.config import DataConfig
from fed_asr.data import (
    EASYVQA_SKILLS,
    build_stream,
    caption_samples,
    easyvqa_stream,
    image_labels,
    parse_question,
    tokenize,
)
from fed_asr.data.easyvqa import ImageLabel


def _image_id(path: str) -> int:
    return int(Path(path).stem)


def _oracle_answer(question: str, label: ImageLabel) -> str:
    """Answer a question from an image's colour and shape labels."""
    parsed = parse_question(question)
    if parsed.skill == "shape":
        return str(label.shape)
    if parsed.skill == "color":
        return str(label.color)
    holds = all(c == label.color for c in parsed.colors) and all(
        s == label.shape for s in parsed.shapes
    )
    return "yes" if holds != (parsed.skill == "negated_existence") else "no"


def test_easyvqa_stream_ability_stages_hold_only_their_type() -> None:
    # Execute
    stream = easyvqa_stream(
        "ability", max_train_per_stage=200, max_test_per_stage=50, seed=0
    )

    # Assert
    assert [s.name for s in stream.stages] == ["shape", "color", "existence"]
    for stage in stream.stages:
        assert len(stage.train) == 200
        assert len(stage.test) == 50
        types = {parse_question(s.question).skill for s in stage.train + stage.test}
        assert types == {stage.name}


def test_easyvqa_stream_has_sorted_answers_and_four_skills() -> None:
    # Execute
    stream = easyvqa_stream("ability", max_train_per_stage=10, max_test_per_stage=10)

    # Assert
    assert stream.answers == sorted(easy_vqa.get_answers())
    assert len(stream.answers) == 13
    assert stream.skills == list(EASYVQA_SKILLS)
    assert all(s.skill is None for st in stream.stages for s in st.train)


def test_easyvqa_stream_domain_stages_hold_one_shape_and_many_types() -> None:
    # Prepare
    train_labels, test_labels = image_labels("train"), image_labels("test")

    # Execute
    stream = easyvqa_stream(
        "domain", max_train_per_stage=300, max_test_per_stage=100, seed=1
    )

    # Assert
    assert [s.name for s in stream.stages] == ["circle", "rectangle", "triangle"]
    for stage in stream.stages:
        shapes = {train_labels[_image_id(s.image)].shape for s in stage.train}
        shapes |= {test_labels[_image_id(s.image)].shape for s in stage.test}
        assert shapes == {stage.name}
        types = {parse_question(s.question).skill for s in stage.train}
        assert types == set(EASYVQA_SKILLS)


def test_easyvqa_stream_same_seed_same_samples_other_seed_differs() -> None:
    # Prepare
    kwargs = {"max_train_per_stage": 100, "max_test_per_stage": 20}

    # Execute
    first = easyvqa_stream("ability", seed=3, **kwargs)
    again = easyvqa_stream("ability", seed=3, **kwargs)
    other = easyvqa_stream("ability", seed=4, **kwargs)

    # Assert
    assert first.stages == again.stages
    assert first.stages[0].train != other.stages[0].train


def test_easyvqa_stream_subsample_is_stratified_by_answer() -> None:
    # Prepare
    full = easyvqa_stream("ability", stage_order=["color"], max_train_per_stage=None)
    n_full = len(full.stages[0].train)
    full_counts = Counter(s.answer for s in full.stages[0].train)

    # Execute
    sub = easyvqa_stream("ability", stage_order=["color"], max_train_per_stage=400)

    # Assert
    counts = Counter(s.answer for s in sub.stages[0].train)
    assert sum(counts.values()) == 400
    for answer, n in full_counts.items():
        assert abs(counts[answer] - 400 * n / n_full) < 1.0


def test_easyvqa_stream_stage_order_selects_and_reorders() -> None:
    # Execute
    stream = easyvqa_stream(
        "ability",
        stage_order=["negated_existence", "shape"],
        max_train_per_stage=20,
        max_test_per_stage=5,
    )

    # Assert
    assert [s.name for s in stream.stages] == ["negated_existence", "shape"]
    assert {parse_question(s.question).skill for s in stream.stages[0].train} == {
        "negated_existence"
    }


def test_easyvqa_stream_unknown_stage_raises_listing_choices() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="'square'.*Available.*'circle'"):
        easyvqa_stream("domain", stage_order=["circle", "square"])


def test_easyvqa_stream_skills_missing_a_type_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="misses question types \\['existence'\\]"):
        easyvqa_stream(
            "ability",
            stage_order=["existence"],
            max_train_per_stage=10,
            skills=["shape", "color"],
        )


def test_easyvqa_stream_vocabulary_does_not_depend_on_seed_or_stages() -> None:
    # Execute
    a = easyvqa_stream("ability", max_train_per_stage=5, max_test_per_stage=5, seed=0)
    b = easyvqa_stream("domain", stage_order=["triangle"], max_train_per_stage=3)

    # Assert
    vocab = a.vocabulary()
    assert vocab == b.vocabulary()
    assert vocab == sorted(vocab)
    assert {"caption", "?", "not", "teal", "triangle", "yes"} <= set(vocab)
    for stage in a.stages:
        for sample in stage.train:
            assert set(tokenize(sample.question)) <= set(vocab)


def test_image_labels_answer_every_question_of_fully_labelled_images() -> None:
    # Prepare
    texts, answers, ids = easy_vqa.get_train_questions()
    labels = image_labels("train")

    # Execute
    checked = mismatches = 0
    for text, answer, image_id in zip(texts, answers, ids, strict=True):
        label = labels[image_id]
        if label.color is None or label.shape is None:
            continue
        checked += 1
        mismatches += _oracle_answer(text, label) != answer

    # Assert
    assert mismatches == 0
    assert checked > 0.85 * len(texts)
    assert sum(lab.shape is not None for lab in labels.values()) > 0.95 * len(labels)


def test_caption_samples_come_from_train_images_only() -> None:
    # Prepare
    train_paths = {str(p) for p in easy_vqa.get_train_image_paths().values()}
    test_paths = {str(p) for p in easy_vqa.get_test_image_paths().values()}
    labels = image_labels("train")

    # Execute
    samples = caption_samples(500, seed=0)

    # Assert
    assert len(samples) == 500
    assert len({s.image for s in samples}) == 500
    for sample in samples:
        assert sample.image in train_paths
        assert sample.image not in test_paths
        assert sample.question == "caption"
        label = labels[_image_id(sample.image)]
        assert sample.answer == f"{label.color} {label.shape}"


def test_caption_samples_deterministic_and_capped() -> None:
    # Execute
    first = caption_samples(50, seed=7)
    again = caption_samples(50, seed=7)
    everything = caption_samples(10**6, seed=7)

    # Assert
    assert first == again
    assert 3000 < len(everything) <= 4000


def test_build_stream_dispatches_easyvqa_config() -> None:
    # Prepare
    cfg = DataConfig(
        name="easyvqa", stream="domain", max_train_per_stage=30, max_test_per_stage=10
    )

    # Execute
    stream = build_stream(cfg, seed=0)

    # Assert
    assert stream.name == "easyvqa/domain"
    assert [len(s.train) for s in stream.stages] == [30, 30, 30]
    assert (
        stream.stages
        == easyvqa_stream(
            "domain", max_train_per_stage=30, max_test_per_stage=10, seed=0
        ).stages
    )


def test_easyvqa_samples_carry_the_box_of_their_images_shape() -> None:
    # Setup
    import numpy as np

    from fed_asr.data import load_image

    stream = easyvqa_stream(
        "ability", max_train_per_stage=20, max_test_per_stage=20, seed=0
    )
    samples = [s for stage in stream.stages for s in stage.train + stage.test]

    # Assert: everything outside the box is background, and the box is small
    for sample in samples:
        assert sample.region is not None
        x0, y0, x1, y1 = sample.region
        assert 0.0 < (x1 - x0) * (y1 - y0) < 0.5
        pixels = np.asarray(load_image(sample.image), dtype=np.int32)
        h, w = pixels.shape[:2]
        outside = np.ones((h, w), dtype=bool)
        outside[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = False
        differs = np.abs(pixels - pixels[0, 0]).sum(-1) > 30
        assert not differs[outside].any()
        assert differs[~outside].any()
