"""Tests of the tiny LLaVA: build, tokenizer, processor, save/reload."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fed_asr.config import ModelConfig
from fed_asr.models.tiny import IMAGE, build_tiny, tiny_config


def test_build_tiny_save_and_reload_gives_same_outputs(
    cfg: ModelConfig, vocab: list[str], image_files: dict[str, str], tmp_path: Path
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab, seed=0)
    image = Image.open(image_files["red circle"]).convert("RGB")
    text = [f"{IMAGE} what color is the shape ?"]
    inputs = processor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "tiny"))
    processor.save_pretrained(str(tmp_path / "tiny"))

    # Execute
    reloaded = LlavaForConditionalGeneration.from_pretrained(
        str(tmp_path / "tiny"), local_files_only=True
    )
    reprocessor = AutoProcessor.from_pretrained(
        str(tmp_path / "tiny"), local_files_only=True
    )
    reinputs = reprocessor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**reinputs).logits

    # Assert
    assert torch.equal(reinputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(reinputs["pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_processor_expands_image_token_to_grid_size(
    cfg: ModelConfig, vocab: list[str], image_files: dict[str, str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)
    image = Image.open(image_files["blue triangle"]).convert("RGB")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)

    # Execute
    out = processor(text=[f"{IMAGE} what shape ?"], images=[image], return_tensors="pt")

    # Assert
    grid = cfg.image_size // cfg.patch_size
    assert int((out["input_ids"] == image_id).sum()) == grid * grid
    assert out["pixel_values"].shape == (1, 3, cfg.image_size, cfg.image_size)


def test_tokenizer_lowercases_splits_punctuation_and_maps_unknown_words(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)
    tokenizer = processor.tokenizer

    # Execute
    ids = tokenizer("What COLOR, shape? zebra", add_special_tokens=True)["input_ids"]

    # Assert
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<s>", "what", "color", ",", "shape", "?", "<unk>"]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"


def test_build_tiny_same_seed_same_weights_and_other_seed_differs(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Execute
    first, _ = build_tiny(cfg, vocab, seed=3)
    second, _ = build_tiny(cfg, vocab, seed=3)
    third, _ = build_tiny(cfg, vocab, seed=4)

    # Assert
    a, b, c = (m.state_dict() for m in (first, second, third))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_config_kv_heads_not_dividing_heads_raises(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)

    # Execute / Assert
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(cfg, processor.tokenizer, num_key_value_heads=3)


def test_tiny_config_hidden_not_multiple_of_heads_raises(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)
    bad = dataclasses.replace(cfg, text_hidden_size=30)

    # Execute / Assert
    with pytest.raises(ValueError, match="model.text_hidden_size"):
        tiny_config(bad, processor.tokenizer)
