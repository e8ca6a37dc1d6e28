"""Tests of the vision tower preparation (``model.pretrain_vision_steps``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import small_config

from fed_asr.config import DataConfig, ModelConfig
from fed_asr.data import scenes_objects
from fed_asr.models.device import torch_threads
from fed_asr.models.loading import (
    META_FILE,
    PREPARATION_THREADS,
    ensure_tiny_model,
    load_run_base_model,
    tiny_model_dir,
    tiny_model_spec,
)
from fed_asr.models.pretrain import preparation_objects
from fed_asr.models.tiny import build_tiny
from fed_asr.models.vision_pretrain import (
    object_patch_features,
    pretrain_vision_tower,
    vision_tower,
)

WORDS = ["red", "blue", "circle", "square", "what", "color", "is", "the", "caption"]


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Scene images with labelled objects (64x64, every style)."""
    return scenes_objects(48, 0, cache_dir=tmp_path_factory.mktemp("obj"))


def _scene_config(tmp_path: Path, **overrides: object) -> ModelConfig:
    """Small tiny model on the scenes' 64x64 canvas (8x8 grid)."""
    fields: dict[str, object] = {
        "image_size": 64,
        "patch_size": 8,
        "pretrain_vision_steps": 40,
        "pretrain_vision_lr": 3e-3,
        **overrides,
    }
    return small_config(tmp_path, **fields)


def test_object_patch_features_average_each_objects_patches() -> None:
    # Prepare: two images of three patches, three objects
    hidden = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3)
    masks = torch.tensor([[1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    owner = torch.tensor([0, 0, 1])

    # Execute
    pooled = object_patch_features(hidden, masks, owner)

    # Assert
    assert torch.allclose(pooled[0], hidden[0, :2].mean(0))
    assert torch.allclose(pooled[1], hidden[0, 2])
    assert torch.allclose(pooled[2], hidden[1, [0, 2]].mean(0))


def test_pretrain_vision_tower_learns_attributes_and_changes_only_the_tower(
    tmp_path: Path, objects: list
) -> None:
    # Prepare
    cfg = _scene_config(tmp_path, pretrain_batch_size=16)
    model, processor = build_tiny(cfg, WORDS)
    before = {n: p.clone() for n, p in model.named_parameters()}

    # Execute
    result = pretrain_vision_tower(model, processor, objects, cfg, progress=False)

    # Assert: the loss falls, colour is told apart, nothing but the tower moved
    assert result.steps == 40 and result.final_loss < result.first_loss
    assert result.final_accuracy["color"] > 0.8
    assert set(result.final_accuracy) == {"color", "horizontal", "shape", "vertical"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("vision_tower" in n for n in changed)
    assert not any(p.requires_grad for p in vision_tower(model).parameters())


def test_ensure_tiny_model_keeps_the_prepared_tower_frozen(
    tmp_path: Path, objects: list, caption_set: list
) -> None:
    # Prepare: the tower after the vision preparation alone, from the same seed, on
    # the preparation's thread count (another count changes the last bits)
    cfg = _scene_config(tmp_path, pretrain_steps=4)
    with torch_threads(PREPARATION_THREADS):
        reference, processor = build_tiny(cfg, WORDS)
        pretrain_vision_tower(reference, processor, objects, cfg, progress=False)

    # Execute
    path = ensure_tiny_model(cfg, WORDS, 0, caption_set, False, objects)

    # Assert: saved tower = the vision preparation's; the language model did train
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(str(path))
    for (name, p), q in zip(
        vision_tower(saved).named_parameters(),
        vision_tower(reference).parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), name
    fresh, _ = build_tiny(cfg, WORDS)
    assert not torch.equal(
        saved.lm_head.weight, fresh.lm_head.weight
    )  # prepared after the tower
    meta = json.loads((path / META_FILE).read_text())
    assert meta["pretrain_vision"]["steps"] == 40
    assert meta["spec"]["vision"]["pretrain_vision_steps"] == 40


def test_vision_preparation_enters_the_cache_key_only_when_set(
    tmp_path: Path, objects: list
) -> None:
    # Prepare
    plain = small_config(tmp_path)
    vision = dataclasses.replace(plain, pretrain_vision_steps=10)

    # Assert: without it the spec (and every existing cache) is unchanged
    assert "vision" not in tiny_model_spec(plain, WORDS)
    assert tiny_model_dir(plain, WORDS) != tiny_model_dir(
        vision, WORDS, 0, None, objects
    )
    other = tiny_model_dir(vision, WORDS, 0, None, objects[:10])
    assert other != tiny_model_dir(vision, WORDS, 0, None, objects)
    longer = dataclasses.replace(vision, pretrain_vision_steps=20)
    assert tiny_model_dir(longer, WORDS, 0, None, objects) != tiny_model_dir(
        vision, WORDS, 0, None, objects
    )


def test_ensure_tiny_model_needs_objects_for_a_vision_preparation(
    tmp_path: Path, caption_set: list
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="labelled-object images"):
        ensure_tiny_model(_scene_config(tmp_path), WORDS, 0, caption_set, False)


def test_preparation_objects_follow_the_config(tmp_path: Path) -> None:
    # Prepare
    data = DataConfig(stream="scenes", cache_dir=str(tmp_path))

    # Execute / Assert
    assert preparation_objects(ModelConfig(), 0, data) is None
    items = preparation_objects(
        ModelConfig(pretrain_vision_steps=5, pretrain_vision_size=6), 0, data
    )
    assert items is not None and len(items) == 6
    with pytest.raises(ValueError, match="data config"):
        preparation_objects(ModelConfig(pretrain_vision_steps=5))
    manifest = DataConfig(stream="manifest", root="any")
    with pytest.raises(ValueError, match=r"pretrain_vision_steps.*'manifest'"):
        load_run_base_model(ModelConfig(pretrain_vision_steps=5), manifest, WORDS)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"pretrain_vision_steps": -1}, "model.pretrain_vision_steps"),
        ({"pretrain_vision_size": 0}, "model.pretrain_vision_size"),
        ({"pretrain_vision_lr": 0.0}, "model.pretrain_vision_lr"),
        ({"pretrain_vision_styles": "stages"}, "model.pretrain_vision_styles"),
        (
            {"name": "pretrained", "path": "x", "pretrain_vision_steps": 5},
            "pre-trained checkpoint",
        ),
    ],
)
def test_model_config_rejects_bad_vision_preparation(fields: dict, match: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)
