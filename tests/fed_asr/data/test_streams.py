"""Tests of the stream registry and its use by ``DataConfig``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fed_asr.config import DataConfig
from fed_asr.data import (
    STREAMS,
    ContinualStream,
    Stage,
    VQASample,
    build_stream,
    easyvqa_stream,
    get_stream,
    register_stream,
    stream_preparation,
)


def _toy_stream(cfg: DataConfig, seed: int) -> ContinualStream:
    """A one-stage stream whose sample records the config and seed it was built with."""
    sample = VQASample("img.png", "what?", str(cfg.max_train_per_stage), "toy")
    return ContinualStream(
        name=f"toy:{seed}",
        stages=[Stage("only", [sample], [sample])],
        answers=[sample.answer],
        skills=["toy"],
    )


@pytest.fixture
def toy() -> Iterator[str]:
    """Register ``toy_stream`` for one test."""
    register_stream("toy_stream", _toy_stream)
    yield "toy_stream"
    del STREAMS["toy_stream"]


def test_register_stream_builtin_names_are_registered() -> None:
    # Assert
    assert {"ability", "domain", "manifest", "scenes"} <= set(STREAMS)
    assert get_stream("ability").source == "easyvqa"
    assert get_stream("manifest").needs_root


def test_register_stream_duplicate_raises_key_error(toy: str) -> None:
    # Execute / Assert
    with pytest.raises(KeyError, match="already registered"):
        register_stream(toy, _toy_stream)


@pytest.mark.parametrize("name", ["Toy", "toy-stream", "2toy", ""])
def test_register_stream_rejects_non_snake_case(name: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="snake_case"):
        register_stream(name, _toy_stream)
    assert name not in STREAMS


def test_get_stream_unknown_lists_choices() -> None:
    # Execute / Assert
    with pytest.raises(
        KeyError, match=r"Unknown stream 'scene'\. Available: .*'scenes'"
    ):
        get_stream("scene")


def test_custom_stream_is_built_through_data_config(toy: str) -> None:
    # Prepare
    cfg = DataConfig(stream=toy, max_train_per_stage=7)

    # Execute
    stream = build_stream(cfg, seed=3)

    # Assert
    assert cfg.name == toy  # the source defaults to the stream's name
    assert stream.name == "toy:3"
    assert stream.stages[0].train[0].answer == "7"


def test_data_config_unknown_stream_lists_registered_streams() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"`data.stream`.*'time'.*'scenes'"):
        DataConfig(stream="time")


def test_data_config_fills_name_from_stream_source() -> None:
    # Execute
    cfgs = [DataConfig(stream=s) for s in ("ability", "domain", "scenes")]

    # Assert
    assert [c.name for c in cfgs] == ["easyvqa", "easyvqa", "scenes"]


def test_data_config_name_follows_stream_of_multi_stream_source() -> None:
    # Execute: the schema default name (easyvqa) with another stream
    cfg = DataConfig(name="easyvqa", stream="scenes")

    # Assert
    assert (cfg.name, cfg.stream) == ("scenes", "scenes")


def test_data_config_name_manifest_selects_manifest_stream() -> None:
    # Execute
    cfg = DataConfig(name="manifest", root="/data", stream="ability")

    # Assert
    assert cfg.stream == "manifest"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "coco"}, "data.name"),
        ({"stream": "manifest"}, "data.root"),
        ({"name": "manifest"}, "data.root"),
    ],
)
def test_data_config_rejects_inconsistent_source(
    kwargs: dict[str, str], match: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)  # type: ignore[arg-type]


def test_build_stream_easyvqa_unchanged_and_named() -> None:
    # Prepare
    cfg = DataConfig(stream="ability", max_train_per_stage=20, max_test_per_stage=8)

    # Execute
    stream = build_stream(cfg, seed=2)

    # Assert
    assert stream.name == "easyvqa/ability"
    reference = easyvqa_stream(
        "ability", max_train_per_stage=20, max_test_per_stage=8, seed=2
    )
    assert stream.stages == reference.stages


def test_stream_preparation_without_set_raises() -> None:
    # Prepare
    cfg = DataConfig(stream="manifest", root="/nowhere")

    # Execute / Assert
    with pytest.raises(ValueError, match="no preparation set"):
        stream_preparation(cfg, 10, seed=0)
