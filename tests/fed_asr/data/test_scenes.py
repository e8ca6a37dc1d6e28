"""Tests of the generated multi-object ``scenes`` stream and its preparation set."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from fed_asr.config import DataConfig
from fed_asr.data import (
    SCENE_SKILLS,
    ContinualStream,
    VQASample,
    build_stream,
    sample_mask,
    scenes_preparation,
    scenes_stream,
)
from fed_asr.data.scene_render import CANVAS
from fed_asr.data.scenes import SKILL_ANSWERS, STAGES

N_TRAIN, N_TEST = 90, 45


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One image cache for the module (images are rendered once)."""
    return str(tmp_path_factory.mktemp("scenes_cache"))


@pytest.fixture(scope="module")
def stream(cache: str) -> ContinualStream:
    """The scenes stream at test size, built through the registry."""
    cfg = DataConfig(
        stream="scenes",
        max_train_per_stage=N_TRAIN,
        max_test_per_stage=N_TEST,
        cache_dir=cache,
    )
    return build_stream(cfg, seed=0)


def _digests(samples: list[VQASample]) -> set[str]:
    """SHA-256 of every image file's bytes."""
    return {hashlib.sha256(Path(s.image).read_bytes()).hexdigest() for s in samples}


def test_scenes_stream_has_three_named_stages_of_requested_size(
    stream: ContinualStream,
) -> None:
    # Assert
    assert stream.name == "scenes"
    assert [s.name for s in stream.stages] == list(STAGES)
    assert all(len(s.train) == N_TRAIN and len(s.test) == N_TEST for s in stream.stages)
    assert stream.skills == list(SCENE_SKILLS)


def test_scenes_stream_every_stage_holds_every_skill_and_answer(
    stream: ContinualStream,
) -> None:
    # Prepare
    expected = {(k, a) for k, answers in SKILL_ANSWERS.items() for a in answers}

    # Assert
    assert stream.answers == sorted({a for _, a in expected})
    for stage in stream.stages:
        for split in (stage.train, stage.test):
            assert {(s.skill, s.answer) for s in split} == expected


def test_scenes_stream_answers_are_balanced_within_each_skill_and_stage(
    stream: ContinualStream,
) -> None:
    # Assert: every answer of a skill has the same count, up to one
    for stage in stream.stages:
        for split in (stage.train, stage.test):
            skills = Counter(s.skill for s in split)
            assert max(skills.values()) - min(skills.values()) <= 1
            for skill, answers in SKILL_ANSWERS.items():
                counts = Counter(s.answer for s in split if s.skill == skill)
                assert max(counts.values()) - min(counts.values()) <= 1, skill
                share = max(counts.values()) / skills[skill]
                assert share <= 1 / len(answers) + 1 / skills[skill]


def test_scenes_stream_is_deterministic_in_the_seed(
    stream: ContinualStream, cache: str, tmp_path: Path
) -> None:
    # Execute: same seed in another cache folder, and another seed
    again = scenes_stream(
        max_train_per_stage=N_TRAIN,
        max_test_per_stage=N_TEST,
        seed=0,
        cache_dir=tmp_path,
        stage_order=["clutter"],
    )
    other = scenes_stream(
        max_train_per_stage=N_TRAIN, max_test_per_stage=N_TEST, seed=1, cache_dir=cache
    )

    # Assert: same questions, answers, regions and image bytes; a stage does not
    # depend on the other stages
    first, second = stream.stages[1], again.stages[0]
    strip = [(s.question, s.answer, s.skill, s.region) for s in first.train]
    assert strip == [(s.question, s.answer, s.skill, s.region) for s in second.train]
    assert _digests(first.train) == _digests(second.train)
    assert _digests(stream.stages[0].train).isdisjoint(_digests(other.stages[0].train))


def test_scenes_stream_train_and_test_images_are_disjoint(
    stream: ContinualStream,
) -> None:
    # Prepare
    train = [s for stage in stream.stages for s in stage.train]
    test = [s for stage in stream.stages for s in stage.test]

    # Assert
    assert len(_digests(train)) == len(train)
    assert _digests(train).isdisjoint(_digests(test))


def test_scenes_stream_regions_match_questions(stream: ContinualStream) -> None:
    # Assert
    for stage in stream.stages:
        for s in stage.train:
            no_object = s.skill == "count" or (
                s.skill == "existence" and s.answer == "no"
            )
            assert (s.region is None) == no_object, s
            if s.region is None:
                continue
            x0, y0, x1, y1 = s.region
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            side = {"left": cx < 0.5, "right": cx > 0.5, "top": cy < 0.5}
            side["bottom"] = cy > 0.5
            if s.skill == "position":
                assert side[s.answer], s


def test_scenes_stream_region_mask_covers_the_object(stream: ContinualStream) -> None:
    # Prepare
    sample = next(s for s in stream.stages[0].train if s.region is not None)

    # Execute
    mask = sample_mask(sample, 16)

    # Assert: a 15..20 px object on a 64 px canvas spans 4..6 patches of 4 px a side
    assert mask is not None
    rows, cols = mask.any(1).sum().item(), mask.any(0).sum().item()
    assert 4 <= rows <= 7 and 4 <= cols <= 7
    assert CANVAS == 64


def test_scenes_stream_skill_subset_and_unknown_skill(cache: str) -> None:
    # Execute
    sub = scenes_stream(
        max_train_per_stage=12, max_test_per_stage=6, skills=["count"], cache_dir=cache
    )

    # Assert
    assert sub.answers == ["four", "three", "two"]
    with pytest.raises(ValueError, match="Unknown skill 'size'"):
        scenes_stream(skills=["size"], cache_dir=cache)


def test_scenes_preparation_covers_every_skill_and_captions(
    stream: ContinualStream, cache: str
) -> None:
    # Execute
    samples = scenes_preparation(120, seed=0, cache_dir=cache)

    # Assert
    captions = [s for s in samples if s.question == "caption"]
    assert len(captions) == 40
    assert all(" shapes : " in s.answer and s.skill is None for s in captions)
    qa = {(s.skill, s.answer) for s in samples if s.question != "caption"}
    assert qa == {(k, a) for k, answers in SKILL_ANSWERS.items() for a in answers}
    words = set(stream.vocabulary())
    assert all(set(s.answer.split()) <= words for s in samples)


def test_scenes_preparation_images_are_disjoint_from_test_images(
    stream: ContinualStream, cache: str
) -> None:
    # Execute
    samples = scenes_preparation(150, seed=0, cache_dir=cache)

    # Assert
    test = [s for stage in stream.stages for s in stage.test]
    assert _digests(samples).isdisjoint(_digests(test))
    assert not {s.image for s in samples} & {s.image for s in test}
