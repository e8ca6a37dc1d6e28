"""Tests of JSONL manifest streams and their error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from fed_asr.config import DataConfig
from fed_asr.data import VQASample, build_stream, manifest_stream, read_manifest


def _write_rows(path: Path, rows: list[object]) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )


def _make_folder(root: Path, num_stages: int = 2) -> Path:
    """A manifest folder: 3 tiny PNGs, `num_stages` stages, 4 train / 2 test rows."""
    (root / "img").mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (8, 8), color).save(root / "img" / f"{i}.png")
    for k in range(num_stages):
        train = [
            {
                "image": f"img/{i % 3}.png",
                "question": f"q{k} {i}?",
                "answer": a,
                "skill": "count",
            }
            for i, a in enumerate(["yes", "no", "cat", "dog"])
        ]
        test = [
            {"image": "img/0.png", "question": "what?", "answer": "cat", "skill": "id"},
            {"image": "img/1.png", "question": "why?", "answer": "no", "skill": "id"},
        ]
        _write_rows(root / f"stage_{k}_train.jsonl", train)
        _write_rows(root / f"stage_{k}_test.jsonl", test)
    return root


def test_manifest_stream_happy_path(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")

    # Execute
    stream = manifest_stream(root, skills=["count", "id"], seed=0)

    # Assert
    assert stream.name == "manifest:data"
    assert [s.name for s in stream.stages] == ["stage_0", "stage_1"]
    assert [len(s.train) for s in stream.stages] == [4, 4]
    assert [len(s.test) for s in stream.stages] == [2, 2]
    assert stream.answers == ["cat", "dog", "no", "yes"]
    assert stream.skills == ["count", "id"]
    sample = next(s for s in stream.stages[0].test if s.question == "what?")
    assert sample == VQASample(str(root / "img" / "0.png"), "what?", "cat", "id")
    assert Path(sample.image).is_file()
    assert {"q0", "q1", "?", "cat", "caption"} <= set(stream.vocabulary())


def test_manifest_stream_skills_default_to_union_of_skill_fields(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    path = root / "stage_1_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    _write_rows(path, [*rows, {**rows[0], "skill": "attribute"}])

    # Execute
    stream = manifest_stream(root)

    # Assert
    assert stream.skills == ["attribute", "count", "id"]


def test_manifest_stream_row_without_skill_needs_parsable_question(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data", num_stages=1)
    path = root / "stage_0_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    _write_rows(path, [rows[0], {"image": "img/0.png", "question": "q", "answer": "a"}])

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: no `skill` field")):
        manifest_stream(root, skills=["count", "id"])


def test_manifest_stream_parser_skills_when_no_skill_field(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "ev"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "a.png")
    rows = [
        {
            "image": "a.png",
            "question": "is there a circle?",
            "answer": "no",
            "skill": None,
        },
        {"image": "a.png", "question": "what color is the shape?", "answer": "red"},
    ]
    _write_rows(root / "stage_0_train.jsonl", rows)
    _write_rows(root / "stage_0_test.jsonl", rows[:1])

    # Execute
    stream = manifest_stream(root)

    # Assert
    assert stream.skills == ["shape", "color", "existence", "negated_existence"]
    assert stream.answers == ["no", "red"]


def test_manifest_stream_names_from_stages_json_and_stage_order(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    (root / "stages.json").write_text(json.dumps(["animals", "answers"]))

    # Execute
    stream = manifest_stream(root, stage_order=["answers"], skills=["count", "id"])

    # Assert
    assert [s.name for s in stream.stages] == ["answers"]
    assert stream.stages[0].train[0].question.startswith("q1")


def test_manifest_stream_subsample_deterministic(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    kwargs = {"skills": ["count", "id"], "max_train_per_stage": 2, "seed": 5}

    # Execute
    first = manifest_stream(root, **kwargs)
    again = manifest_stream(root, **kwargs)

    # Assert
    assert [len(s.train) for s in first.stages] == [2, 2]
    assert first.stages == again.stages
    assert first.answers == ["cat", "dog", "no", "yes"]  # from all rows


def test_build_stream_dispatches_manifest_config(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    cfg = DataConfig(name="manifest", root=str(root), skills=["count", "id"])

    # Execute
    stream = build_stream(cfg, seed=0)

    # Assert
    assert len(stream.stages) == 2


def test_manifest_stream_missing_test_file_raises_naming_file(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    (root / "stage_1_test.jsonl").unlink()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="stage_1_test.jsonl"):
        manifest_stream(root)


def test_manifest_stream_gap_in_stage_indices_raises(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data", num_stages=3)
    (root / "stage_1_train.jsonl").unlink()
    (root / "stage_1_test.jsonl").unlink()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="stage 1 is missing"):
        manifest_stream(root)


def test_manifest_stream_no_stages_raises_naming_folder(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        manifest_stream(tmp_path)


def test_manifest_stream_unknown_stage_in_order_raises(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")

    # Execute / Assert
    with pytest.raises(ValueError, match="'stage_9'.*Available.*'stage_0'"):
        manifest_stream(root, stage_order=["stage_9"], skills=["count", "id"])


@pytest.mark.parametrize(
    ("row", "error", "message"),
    [
        ('{"image": "img/0.png", "question": "q?"', ValueError, "invalid JSON"),
        ('["img/0.png", "q?", "yes"]', ValueError, "must be a JSON object"),
        (
            {"image": "img/0.png", "answer": "yes"},
            ValueError,
            "missing field `question`",
        ),
        (
            {"image": "img/0.png", "question": 3, "answer": "yes"},
            ValueError,
            "field `question` must be a non-empty string, got 3",
        ),
        (
            {"image": "img/0.png", "question": "q?", "answer": "yes", "skill": 1},
            ValueError,
            "field `skill` must be a non-empty string",
        ),
        (
            {"image": "img/missing.png", "question": "q?", "answer": "yes"},
            FileNotFoundError,
            "image 'img/missing.png' not found",
        ),
    ],
)
def test_read_manifest_bad_row_raises_naming_file_and_line(
    tmp_path: Path, row: object, error: type[Exception], message: str
) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data", num_stages=1)
    path = root / "stage_0_train.jsonl"
    good = {"image": "img/1.png", "question": "q?", "answer": "no"}
    _write_rows(path, [good, "", row])  # the bad row is on line 3

    # Execute / Assert
    with pytest.raises(error, match=re.escape(f"{path}:3: ") + ".*" + message):
        read_manifest(path)
    with pytest.raises(error, match=re.escape(f"{path}:3: ")):
        manifest_stream(root, skills=["count", "id"])


def test_read_manifest_unknown_field_warns(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data", num_stages=1)
    path = root / "stage_0_test.jsonl"
    _write_rows(path, [{"image": "img/1.png", "question": "q", "answer": "a", "x": 1}])

    # Execute / Assert
    with pytest.warns(UserWarning, match=r"\['x'\] specified but will be ignored"):
        samples = read_manifest(path)
    assert len(samples) == 1


def test_manifest_stream_row_skill_outside_configured_skills_raises(
    tmp_path: Path,
) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data", num_stages=1)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"stage_0_train.jsonl:1: skill 'count'"):
        manifest_stream(root, skills=["id"])


def test_manifest_stream_bad_stages_json_raises(tmp_path: Path) -> None:
    # Prepare
    root = _make_folder(tmp_path / "data")
    (root / "stages.json").write_text(json.dumps(["only_one"]))

    # Execute / Assert
    with pytest.raises(ValueError, match="stages.json: names 1 stages but the folder"):
        manifest_stream(root, skills=["count", "id"])
