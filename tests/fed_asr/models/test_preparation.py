"""Tests of the configurable base-model preparation set (``model.pretrain_data``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import record_threads
from PIL import Image

from fed_asr.config import DataConfig, ModelConfig
from fed_asr.data import VQASample, build_stream, caption_samples
from fed_asr.models import loading
from fed_asr.models.fingerprint import base_fingerprint
from fed_asr.models.loading import PRETRAIN_IMAGES, load_run_base_model, tiny_model_dir
from fed_asr.models.pretrain import preparation_samples


def test_preparation_samples_default_is_none_and_keeps_cache_key(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = ModelConfig(cache_dir=str(tmp_path))

    # Execute
    samples = preparation_samples(cfg, seed=0)

    # Assert: loading builds its own default captions, under the earlier cache key
    assert samples is None
    assert cfg.pretrain_size == PRETRAIN_IMAGES
    assert tiny_model_dir(cfg, ["red"], 0, samples) == tiny_model_dir(cfg, ["red"], 0)


def test_preparation_samples_easyvqa_other_size_gives_captions() -> None:
    # Prepare
    cfg = ModelConfig(pretrain_size=25)

    # Execute
    samples = preparation_samples(cfg, seed=1)

    # Assert
    assert samples == caption_samples(25, 1)


def test_preparation_samples_stream_uses_scenes_set(tmp_path: Path) -> None:
    # Prepare
    cfg = ModelConfig(pretrain_data="stream", pretrain_size=30)
    data = DataConfig(stream="scenes", cache_dir=str(tmp_path))

    # Execute
    samples = preparation_samples(cfg, seed=0, data=data)

    # Assert
    assert samples is not None and len(samples) == 30
    assert sum(s.question == "caption" for s in samples) == 10
    assert all(Path(s.image).is_file() for s in samples)
    other = tiny_model_dir(cfg, ["red"], 0, samples)
    assert other != tiny_model_dir(cfg, ["red"], 0)  # the set enters the cache key


def test_preparation_samples_stream_needs_data_config() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="data config"):
        preparation_samples(ModelConfig(pretrain_data="stream"))


def test_preparation_samples_manifest_reads_rows(tmp_path: Path) -> None:
    # Prepare
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")  # images are verified
    rows = [{"image": "a.png", "question": "caption", "answer": "red circle"}]
    path = tmp_path / "prep.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ModelConfig(pretrain_data="manifest", pretrain_manifest=str(path))

    # Execute
    samples = preparation_samples(cfg)

    # Assert
    assert samples is not None
    assert [(s.question, s.answer) for s in samples] == [("caption", "red circle")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pretrain_data": "coco"}, "model.pretrain_data"),
        ({"pretrain_data": "manifest"}, "model.pretrain_manifest"),
        ({"pretrain_size": 0}, "model.pretrain_size"),
        ({"pretrain_batch_size": 0}, "model.pretrain_batch_size"),
        ({"pretrain_lr": 0.0}, "model.pretrain_lr"),
        ({"pretrain_steps": -1}, "model.pretrain_steps"),
        ({"pretrain_seed": -1}, "model.pretrain_seed"),
        (
            {"name": "pretrained", "path": "x", "pretrain_seed": 1},
            "pretrain_seed.*checkpoint",
        ),
    ],
)
def test_model_config_rejects_bad_pretrain_value(
    kwargs: dict[str, object], match: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_model_config_warns_on_ignored_pretrain_manifest() -> None:
    # Execute / Assert
    with pytest.warns(UserWarning, match="specified but will be ignored"):
        ModelConfig(pretrain_manifest="/tmp/prep.jsonl")


def _captions(folder: Path, color: str) -> list[VQASample]:
    folder.mkdir()
    Image.new("RGB", (8, 8), color).save(folder / "a.png")
    return [VQASample(str(folder / "a.png"), "caption", f"{color} circle")]


def test_cache_key_follows_image_contents_not_their_folder(tmp_path: Path) -> None:
    # Prepare: the same image in two folders (two venvs), and another image
    cfg = ModelConfig(cache_dir=str(tmp_path / "cache"))
    here = _captions(tmp_path / "venv_a", "red")
    there = _captions(tmp_path / "venv_b", "red")
    other = [VQASample(here[0].image, "caption", "red circle")]
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "venv_b" / "a.png")

    # Execute
    key_here = tiny_model_dir(cfg, ["red"], 0, here)
    key_there = tiny_model_dir(cfg, ["red"], 0, there)
    key_other = tiny_model_dir(cfg, ["red"], 0, other)

    # Assert: folder does not count; pixels do
    assert key_here == key_other
    assert key_here != key_there  # venv_b's image now holds other pixels
    Image.new("RGB", (8, 8), "red").save(tmp_path / "venv_b" / "a.png")
    assert tiny_model_dir(cfg, ["red"], 0, there) == key_here


def test_cache_key_names_a_missing_image(tmp_path: Path) -> None:
    # Prepare
    missing = [VQASample(str(tmp_path / "gone.png"), "caption", "red circle")]

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="gone.png"):
        tiny_model_dir(ModelConfig(cache_dir=str(tmp_path)), ["red"], 0, missing)


def test_preparation_runs_on_fixed_threads_and_records_the_keyed_spec(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: spy on the caption preparation, in a process on 2 threads
    seen = record_threads(monkeypatch, loading, "pretrain_base_model")
    cfg = ModelConfig(cache_dir=str(tmp_path), pretrain_steps=1, pretrain_batch_size=2)
    words = build_stream(DataConfig(), 0).vocabulary()
    torch.set_num_threads(2)

    # Execute: the default caption set (samples=None)
    path = loading.ensure_tiny_model(cfg, words, 0, None, progress=False)

    # Assert: prepared on PREPARATION_THREADS, recorded; the process keeps its own
    assert seen == [loading.PREPARATION_THREADS] == [1]
    meta = json.loads((path / loading.META_FILE).read_text())
    assert meta["threads"] == 1
    digest = hashlib.sha256(json.dumps(meta["spec"], sort_keys=True).encode())
    assert path.name == f"tiny-{digest.hexdigest()[:16]}"  # the spec that names it
    assert torch.get_num_threads() == 2


def test_pretrain_seed_prepares_another_base_and_run_seeds_share_one(
    tmp_path: Path,
) -> None:
    # Prepare: a fast preparation on a 30-caption subset (the subset is seeded too)
    fields = {"cache_dir": str(tmp_path), "pretrain_steps": 2, "pretrain_size": 30}
    data = DataConfig(max_train_per_stage=8, max_test_per_stage=4)
    words = build_stream(data, 0).vocabulary()

    # Execute: the default base, loaded twice, and the base of pretrain_seed 1
    first, _ = load_run_base_model(ModelConfig(**fields), data, words, "cpu")
    again, _ = load_run_base_model(ModelConfig(**fields), data, words, "cpu")
    other, _ = load_run_base_model(
        ModelConfig(**fields, pretrain_seed=1), data, words, "cpu"
    )

    # Assert: one base per pretrain_seed, each cached under its own key, and seed 0
    # keeps the key bases had before the field existed
    assert base_fingerprint(first) == base_fingerprint(again)
    assert base_fingerprint(other) != base_fingerprint(first)
    cached = sorted(p.name for p in tmp_path.glob("tiny-*") if p.is_dir())
    samples = preparation_samples(ModelConfig(**fields), 0)
    assert len(cached) == 2
    assert tiny_model_dir(ModelConfig(**fields), words, 0, samples).name in cached
