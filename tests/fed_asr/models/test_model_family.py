"""Tests of model families: registry, LLaVA layout, inference and forcing a family."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from fed_asr.config import ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import (
    MODEL_FAMILIES,
    ImageSpan,
    LlavaFamily,
    VQACollator,
    ensure_tiny_model,
    forward_with_attention,
    get_model_family,
    infer_model_family,
    load_base_model,
    model_family,
    register_model_family,
)
from fed_asr.models.modules import attention_modules, vision_tower
from fed_asr.models.tiny import build_tiny


class ToyFamily(LlavaFamily):
    """A LLaVA under another name that records its span look-ups (forced only)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    calls: ClassVar[list[int]] = []

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """LLaVA's spans, counting the calls."""
        self.calls.append(int(input_ids.shape[0]))
        return super().image_spans(config, input_ids)


class TwoTileFamily(LlavaFamily):
    """A LLaVA whose image block reads as two tiles of half the grid each."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Split each LLaVA span into its top and bottom halves."""
        halves = []
        for row in super().image_spans(config, input_ids):
            span = row[0]
            gh, gw = span.grid
            middle = span.start + (gh // 2) * gw
            halves.append(
                [
                    ImageSpan(span.start, middle, (gh // 2, gw), (0, 0)),
                    ImageSpan(middle, span.end, (gh - gh // 2, gw), (gh // 2, 0)),
                ]
            )
        return halves


class VideoFamily(LlavaFamily):
    """A family whose forward needs a processor output the collator lacks."""

    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values_videos",
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def toy_families() -> Iterator[None]:
    """Register the test families for one test, then remove them."""
    names = {"toy_llava": ToyFamily, "two_tile": TwoTileFamily, "video": VideoFamily}
    for name, cls in names.items():
        register_model_family(name, cls)
    ToyFamily.calls.clear()
    yield
    for name in names:
        MODEL_FAMILIES.pop(name, None)


def test_register_model_family_duplicate_name_raises_key_error() -> None:
    # Execute / Assert
    with pytest.raises(KeyError, match="'llava' is already registered"):
        register_model_family("llava", LlavaFamily)
    assert MODEL_FAMILIES["llava"] is LlavaFamily


def test_register_model_family_non_snake_case_name_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="snake_case"):
        register_model_family("Llava-Next", LlavaFamily)
    assert "Llava-Next" not in MODEL_FAMILIES


def test_get_model_family_unknown_name_lists_choices() -> None:
    # Execute / Assert
    with pytest.raises(KeyError, match=r"Unknown model family 'lava'\. Available: "):
        get_model_family("lava")


def test_model_config_unknown_family_raises_with_field_and_choices() -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"`model.family` must be one of \[.*'llava'.*\], got 'fuyu'"
    ):
        ModelConfig(family="fuyu")


def test_infer_model_family_unknown_model_type_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="'fuyu'.*set `model.family`"):
        infer_model_family(SimpleNamespace(model_type="fuyu"))


def test_llava_family_spans_are_one_grid_block_per_row_on_tiny_model(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab)
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    grid = (cfg.image_size // cfg.patch_size, cfg.image_size // cfg.patch_size)

    # Execute
    spans = LlavaFamily().image_spans(model.config, batch["input_ids"])

    # Assert
    expected = ImageSpan(batch["image_start"], batch["image_end"], grid)
    assert spans == [[expected]] * len(vqa_samples)
    assert LlavaFamily().image_grid(model.config) == grid


def test_llava_family_spans_split_adjacent_images_and_reject_partial_blocks(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    model, _ = build_tiny(cfg, vocab)
    image = LlavaFamily().image_token_id(model.config)
    per_image = (cfg.image_size // cfg.patch_size) ** 2
    two = torch.tensor([[5] + [image] * (2 * per_image) + [6, 7]])
    partial = torch.tensor([[5] + [image] * (per_image - 1) + [6]])

    # Execute
    spans = LlavaFamily().image_spans(model.config, two)

    # Assert
    assert [(s.start, s.end) for s in spans[0]] == [
        (1, 1 + per_image),
        (1 + per_image, 1 + 2 * per_image),
    ]
    with pytest.raises(ValueError, match="vision grid"):
        LlavaFamily().image_spans(model.config, partial)


def test_llava_family_locates_language_model_and_vision_tower(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    model, _ = build_tiny(cfg, vocab)

    # Execute
    family = model_family(model)
    attention = attention_modules(model)
    tower = vision_tower(model)

    # Assert
    assert type(family) is LlavaFamily
    assert len(attention) == cfg.text_layers
    assert attention[0] is model.model.language_model.layers[0].self_attn
    assert tower is model.model.vision_tower


def test_infer_model_family_from_saved_tiny_checkpoint_config_is_llava(
    cfg: ModelConfig, vocab: list[str], caption_set: list[VQASample]
) -> None:
    # Prepare
    from transformers import AutoConfig

    path = ensure_tiny_model(cfg, vocab, 0, caption_set, progress=False)

    # Execute
    name = infer_model_family(AutoConfig.from_pretrained(str(path)))
    model, _ = load_base_model(cfg, vocab, "cpu", samples=caption_set, progress=False)

    # Assert
    assert name == "llava"
    assert type(model_family(model)) is LlavaFamily


@pytest.mark.usefixtures("toy_families")
def test_load_base_model_forced_family_is_used_by_capture(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    vqa_samples: list[VQASample],
    caption_set: list[VQASample],
) -> None:
    # Prepare
    forced = dataclasses.replace(cfg, family="toy_llava")
    model, processor = load_base_model(
        forced, vocab, "cpu", samples=caption_set, progress=False
    )
    family = model_family(model)
    batch = VQACollator(processor, forced.prompt_template, answers, family=family)(
        vqa_samples
    )

    # Execute
    with torch.no_grad():
        result = forward_with_attention(model, batch, l_sel=1)

    # Assert
    assert type(family) is ToyFamily
    assert ToyFamily.calls == [len(vqa_samples)]
    assert result.spans is not None and len(result.spans[0]) == 1


@pytest.mark.usefixtures("toy_families")
def test_forward_with_attention_two_tiles_per_row_stitch_into_one_map(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    from fed_asr.models import bind_model_family

    model, processor = build_tiny(cfg, vocab)
    bind_model_family(model, get_model_family("llava"))
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    with torch.no_grad():
        whole = forward_with_attention(model, batch, l_sel=1)
    bind_model_family(model, get_model_family("two_tile"))

    # Execute
    with torch.no_grad():
        tiled = forward_with_attention(model, batch, l_sel=1)

    # Assert
    assert tiled.spans is not None and len(tiled.spans[0]) == 2
    assert tiled.grid == whole.grid
    torch.testing.assert_close(tiled.attn, whole.attn, rtol=0, atol=0)


@pytest.mark.usefixtures("toy_families")
def test_collator_family_needing_other_processor_outputs_not_implemented(
    cfg: ModelConfig, vocab: list[str], answers: list[str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)

    # Execute / Assert
    with pytest.raises(NotImplementedError, match="pixel_values_videos"):
        VQACollator(
            processor, cfg.prompt_template, answers, family=get_model_family("video")
        )
