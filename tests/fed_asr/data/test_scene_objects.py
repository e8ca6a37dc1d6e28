"""Tests of the labelled-object images of the streams (vision tower preparation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fed_asr.config import DataConfig
from fed_asr.data import (
    LabelledObject,
    ObjectImage,
    scenes_objects,
    scenes_stream,
    stream_objects,
)
from fed_asr.data.easyvqa import caption_samples
from fed_asr.data.images import foreground_box
from fed_asr.data.objects import attribute_values, objects_fingerprint
from fed_asr.data.scene_render import COLOR_NAMES, PLAIN_BACKGROUND, SHAPES


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One image cache for the module."""
    return str(tmp_path_factory.mktemp("objects_cache"))


def test_scenes_objects_label_every_drawn_object(cache: str) -> None:
    # Execute
    items = scenes_objects(24, 0, cache_dir=cache)

    # Assert: 2-4 objects per image, each with a box inside the canvas and both labels
    assert len(items) == 24
    for item in items:
        assert Path(item.image).is_file()
        assert 2 <= len(item.objects) <= 4
        for obj in item.objects:
            x0, y0, x1, y1 = obj.region
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            labels = dict(obj.attributes)
            assert labels["color"] in COLOR_NAMES and labels["shape"] in SHAPES
            left = (x0 + x1) / 2 < 0.5
            assert labels["horizontal"] == ("left" if left else "right")
            top = (y0 + y1) / 2 < 0.5
            assert labels["vertical"] == ("top" if top else "bottom")
    values = attribute_values(items)
    assert set(values) == {"color", "shape", "horizontal", "vertical"}
    assert values["horizontal"] == ["left", "right"]


def test_scenes_objects_boxes_hold_their_colour(cache: str) -> None:
    # Prepare: the centre pixel of a square lies inside the drawn square
    from fed_asr.data.scene_render import COLORS

    items = scenes_objects(40, 0, cache_dir=cache, styles=["plain"])
    squares = [
        (item.image, obj)
        for item in items
        for obj in item.objects
        if dict(obj.attributes)["shape"] == "square"
    ]

    # Assert
    assert squares
    for path, obj in squares:
        x0, y0, x1, y1 = obj.region
        centre = (int((x0 + x1) / 2 * 64), int((y0 + y1) / 2 * 64))
        pixel = Image.open(path).convert("RGB").getpixel(centre)
        assert pixel == COLORS[dict(obj.attributes)["color"]]


def test_scenes_objects_cycle_styles_and_are_deterministic(cache: str) -> None:
    # Execute
    first = scenes_objects(8, 3, cache_dir=cache)
    again = scenes_objects(8, 3, cache_dir=cache)
    other = scenes_objects(8, 4, cache_dir=cache)

    # Assert
    assert first == again
    assert objects_fingerprint(first) == objects_fingerprint(again)
    assert objects_fingerprint(first) != objects_fingerprint(other)
    # styles are used in turn: plain background, then stripes or checks
    plain, textured = scenes_objects(2, 0, cache_dir=cache, styles=["plain", "texture"])
    assert Image.open(plain.image).convert("RGB").getpixel((0, 0)) == PLAIN_BACKGROUND
    assert Image.open(textured.image).convert("RGB").getpixel((0, 0)) != (
        PLAIN_BACKGROUND
    )


def test_scenes_objects_are_not_the_stream_test_images(cache: str) -> None:
    # Prepare
    stream = scenes_stream(
        cache_dir=cache, max_train_per_stage=30, max_test_per_stage=30
    )
    items = scenes_objects(60, 0, cache_dir=cache)

    # Assert
    test_images = {s.image for stage in stream.stages for s in stage.test}
    assert not test_images & {item.image for item in items}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": 0}, "`n`"), ({"n": 4, "styles": ["fog"]}, "fog")],
)
def test_scenes_objects_rejects_bad_arguments(
    cache: str, kwargs: dict, match: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        scenes_objects(cache_dir=cache, **kwargs)


def test_stream_objects_names_the_field_for_streams_without_objects(
    cache: str,
) -> None:
    # Execute / Assert
    manifest = DataConfig(stream="manifest", root="any")
    with pytest.raises(ValueError, match=r"model\.pretrain_vision_steps.*'manifest'"):
        stream_objects(manifest, 4, 0)
    items = stream_objects(DataConfig(stream="scenes", cache_dir=cache), 4, 0)
    assert len(items) == 4 and all(isinstance(i, ObjectImage) for i in items)


def test_stream_objects_easyvqa_label_its_one_shape_from_training_images() -> None:
    # Execute
    items = stream_objects(DataConfig(stream="ability"), 30, 0)
    captions = {s.image: s.answer for s in caption_samples(30, 0)}

    # Assert: one object per training image, named as its caption, boxed by its pixels
    assert len(items) == 30
    for item in items:
        (obj,) = item.objects
        labels = dict(obj.attributes)
        assert f"{labels['color']} {labels['shape']}" == captions[item.image]
        assert obj.region == foreground_box(item.image)
        assert "/train/" in item.image.replace("\\", "/")
    assert stream_objects(DataConfig(stream="domain"), 30, 0, "base") == items


def test_stream_objects_base_styles_stay_in_the_preparation_conditions(
    cache: str,
) -> None:
    # Prepare
    data = DataConfig(stream="scenes", cache_dir=cache)

    # Execute
    every = stream_objects(data, 8, 0, "all")
    base = stream_objects(data, 8, 0, "base")

    # Assert: the base style is a plain background; "all" also draws textures
    def corners(items: list[ObjectImage]) -> list[tuple[int, int, int]]:
        return [Image.open(i.image).convert("RGB").getpixel((0, 0)) for i in items]

    assert set(corners(base)) == {PLAIN_BACKGROUND}
    assert set(corners(every)) != {PLAIN_BACKGROUND}


def test_attribute_values_rejects_unlabelled_sets() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no labelled object"):
        attribute_values([ObjectImage("a.png", ())])
    unlabelled = LabelledObject((0.0, 0.0, 0.5, 0.5), ())
    with pytest.raises(ValueError, match="no labelled object"):
        attribute_values([ObjectImage("a.png", (unlabelled,))])
