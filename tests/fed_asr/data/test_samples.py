"""Tests of tokenization, stream vocabulary and image loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fed_asr.data import ContinualStream, Stage, VQASample, load_image, tokenize
from fed_asr.data.images import clear_image_cache


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    # Execute
    tokens = tokenize("What color, is it: Red.Circle?  answer :")

    # Assert
    assert tokens == [
        "what", "color", ",", "is", "it", ":", "red", ".", "circle", "?",
        "answer", ":",
    ]  # fmt: skip


def test_vocabulary_holds_questions_answers_and_caption_words() -> None:
    # Prepare
    stage = Stage(
        "s",
        [VQASample("a.png", "How MANY dogs?", "Two")],
        [VQASample("b.png", "is it wet?", "yes")],
    )
    stream = ContinualStream("toy", [stage], ["two", "three cats"], ["count"])

    # Execute
    vocab = stream.vocabulary()

    # Assert
    assert vocab == sorted(set(vocab))
    expected = {"how", "many", "dogs", "?", "two", "is", "it", "wet", "yes", "three"}
    assert expected | {"cats", "caption", "red", "circle"} <= set(vocab)
    assert "How" not in vocab


def test_num_samples_counts_split_and_rejects_bad_split() -> None:
    # Prepare
    sample = VQASample("a.png", "q", "a")
    stream = ContinualStream("toy", [Stage("s", [sample] * 3, [sample])], ["a"], [])

    # Execute / Assert
    assert stream.num_samples("train") == 3
    assert stream.num_samples("test") == 1
    with pytest.raises(ValueError, match="`split` must be"):
        stream.num_samples("val")


def test_load_image_returns_rgb_and_caches(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 128).save(path)
    clear_image_cache()

    # Execute
    image = load_image(str(path))
    again = load_image(str(path))

    # Assert
    assert image.mode == "RGB"
    assert image.size == (5, 4)
    assert image.getpixel((0, 0)) == (128, 128, 128)
    assert again is image


def test_load_image_missing_file_raises_naming_path(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "nope.png"

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(path))


def test_load_image_unreadable_file_raises_naming_path(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")

    # Execute / Assert
    with pytest.raises(ValueError, match="Cannot read image .*broken.png"):
        load_image(str(path))
