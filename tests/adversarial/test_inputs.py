"""Adversarial inputs: bad privacy/security settings and hostile manifest folders.

Each bad input must stop the run at start with one line naming the field (config)
or the file and line (manifest), never after training and never with a traceback at
the command line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import TINY_MODEL_FIELDS
from PIL import Image

from fed_asr.config import DataConfig, compose_config
from fed_asr.data import build_stream
from server.cli import main

BAD_SETTINGS = [
    ("privacy.dp_delta", "2"),
    ("privacy.dp_epsilon", "-1"),
    ("privacy.adapter_epsilon", "0"),
    ("privacy.secagg_bits", "100"),
    ("privacy.secagg_threshold", "0"),
    ("security.max_num_examples", "-1"),
]


def _small_central(cache: str, out: Path, *extra: str) -> list[str]:
    fields = {f"model.{k}": v for k, v in TINY_MODEL_FIELDS.items()}
    overrides = {
        **fields,
        "model.pretrain_steps": 3,
        "model.pretrain_batch_size": 4,
        "model.cache_dir": cache,
        "train.batch_size": 8,
        "train.max_steps_per_stage": 1,
        "regularizer.l_sel": 2,
        "progress": "false",
        "engine": "central",
        "method": "vanilla",
        "output_dir": str(out),
    }
    return [f"{k}={v}" for k, v in overrides.items()] + list(extra)


# -- configuration ------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS)
def test_bad_privacy_or_security_setting_is_refused_at_composition(
    field: str, value: str
) -> None:
    # Execute / Assert: the field and the value are named
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")) as err:
        compose_config("config", [f"{field}={value}"])
    assert str(float(value)) in str(err.value) or value in str(err.value)


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS)
def test_cli_bad_setting_prints_one_line_and_exits_2_before_training(
    field: str, value: str, model_cache: str, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    overrides = _small_central(
        model_cache,
        tmp_path / "out",
        "data.max_train_per_stage=8",
        "data.max_test_per_stage=4",
        f"{field}={value}",
    )
    # Execute
    code = main(overrides)
    # Assert: one line on stderr naming the field; nothing was run
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"`{field}`" in err[0]
    assert not (tmp_path / "out").exists()


# -- manifests ----------------------------------------------------------------------
def _rows(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _manifest(root: Path) -> Path:
    """A valid two-stage manifest folder with three PNGs."""
    (root / "img").mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (8, 8), color).save(root / "img" / f"{i}.png")
    for k in range(2):
        train = [
            {
                "image": f"img/{i % 3}.png",
                "question": f"q{i}?",
                "answer": a,
                "skill": "s",
            }
            for i, a in enumerate(["yes", "no", "yes", "no"])
        ]
        test = [{"image": "img/0.png", "question": "q?", "answer": "yes", "skill": "s"}]
        _rows(root / f"stage_{k}_train.jsonl", train)
        _rows(root / f"stage_{k}_test.jsonl", test)
    return root


def _non_utf8(root: Path) -> str:
    path = root / "stage_0_train.jsonl"
    path.write_bytes(
        path.read_bytes() + b'{"image": "img/0.png", "question": "\xff"}\n'
    )
    return f"{path}:5:"


def _corrupt_image(root: Path) -> str:
    good = (root / "img" / "0.png").read_bytes()
    (root / "img" / "bad.png").write_bytes(good[: len(good) // 2])
    path = root / "stage_1_test.jsonl"
    row = {"image": "img/bad.png", "question": "q?", "answer": "no", "skill": "s"}
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    return f"{path}:2:"


def _empty_stage(root: Path) -> str:
    path = root / "stage_1_train.jsonl"
    path.write_text("\n\n")
    return str(path)


def _duplicate_stage(root: Path) -> str:
    (root / "stage_00_train.jsonl").write_text(
        (root / "stage_0_train.jsonl").read_text()
    )
    return "stage_00_train.jsonl"


def _outside(root: Path, how: str) -> str:
    outside = root.parent / "secret.png"
    Image.new("RGB", (8, 8), "black").save(outside)
    if how == "absolute":
        image = str(outside)
    elif how == "dotdot":
        image = "../secret.png"
    else:  # a symlink inside the folder that points out of it
        (root / "img" / "link.png").symlink_to(outside)
        image = "img/link.png"
    path = root / "stage_0_test.jsonl"
    row = {"image": image, "question": "q?", "answer": "no", "skill": "s"}
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    return f"{path}:2:"


BAD_MANIFESTS = {
    "non_utf8_line": _non_utf8,
    "corrupted_image": _corrupt_image,
    "empty_stage": _empty_stage,
    "duplicate_stage_file": _duplicate_stage,
    "absolute_image_path": lambda root: _outside(root, "absolute"),
    "dotdot_image_path": lambda root: _outside(root, "dotdot"),
    "symlink_out_of_folder": lambda root: _outside(root, "symlink"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_refused_at_load_naming_file_and_line(
    case: str, tmp_path: Path
) -> None:
    # Prepare
    root = _manifest(tmp_path / "data")
    where = BAD_MANIFESTS[case](root)
    # Execute / Assert: a ValueError whose single line names the file (and line)
    with pytest.raises(ValueError) as err:
        build_stream(DataConfig(name="manifest", stream="manifest", root=str(root)), 0)
    assert where in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_cli_bad_manifest_prints_one_line_and_exits_2(
    case: str, model_cache: str, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    root = _manifest(tmp_path / "data")
    where = BAD_MANIFESTS[case](root)
    overrides = _small_central(
        model_cache, tmp_path / "out", "data=manifest", f"data.root={root}"
    )
    # Execute
    code = main(overrides)
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and where in err[0]
    assert not (tmp_path / "out").exists()


def test_valid_manifest_with_a_symlink_inside_the_folder_loads(tmp_path: Path) -> None:
    # Prepare: a symlink that stays inside the folder is fine
    root = _manifest(tmp_path / "data")
    (root / "img" / "alias.png").symlink_to(root / "img" / "1.png")
    path = root / "stage_0_test.jsonl"
    row = {"image": "img/alias.png", "question": "q?", "answer": "no", "skill": "s"}
    path.write_text(path.read_text() + json.dumps(row) + "\n")
    # Execute
    stream = build_stream(
        DataConfig(name="manifest", stream="manifest", root=str(root)), 0
    )
    # Assert
    assert [len(s.test) for s in stream.stages] == [2, 1]
    assert stream.stages[0].train
