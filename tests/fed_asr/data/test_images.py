"""Tests of the foreground box (the object of a plain-background image)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from fed_asr.data.images import clear_image_cache, foreground_box


def _save(tmp_path: Path, name: str, draw_box: tuple[int, int, int, int] | None) -> str:
    image = Image.new("RGB", (64, 32), (240, 245, 250))
    if draw_box is not None:
        ImageDraw.Draw(image).rectangle(draw_box, fill=(200, 30, 30))
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_foreground_box_is_the_drawn_object_normalised_half_open(
    tmp_path: Path,
) -> None:
    # Setup: PIL's rectangle includes both corners, so it covers columns 10..19
    path = _save(tmp_path, "object.png", (10, 4, 19, 11))

    # Execute
    box = foreground_box(path)

    # Assert
    assert box == pytest.approx((10 / 64, 4 / 32, 20 / 64, 12 / 32))


def test_foreground_box_of_a_blank_image_is_none(tmp_path: Path) -> None:
    assert foreground_box(_save(tmp_path, "blank.png", None)) is None


def test_foreground_box_ignores_differences_within_tolerance(tmp_path: Path) -> None:
    # Setup: a faint mark (summed difference 15) beside a real object
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.point((0, 31), fill=(235, 235, 235))
    draw.rectangle((8, 8, 11, 11), fill=(0, 0, 255))
    path = tmp_path / "faint.png"
    image.save(path)
    clear_image_cache()

    # Execute / Assert
    assert foreground_box(str(path)) == pytest.approx((0.25, 0.25, 0.375, 0.375))
    assert foreground_box(str(path), tolerance=10) == pytest.approx(
        (0.0, 0.25, 0.375, 1.0)
    )
