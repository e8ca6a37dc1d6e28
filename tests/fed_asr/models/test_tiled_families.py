"""Tiled image layouts: Idefics3 / SmolVLM tiles and LLaVA-OneVision anyres maps.

The spans the families give must be the ones the processors and models build: each
Idefics3 tile sits where its ``<row_i_col_j>`` marker says, the global image is not
in the map; LLaVA-OneVision's map has the unpadded (and, past ``anyres_max_<n>``,
shrunk) shape of the model's own feature map, newlines excluded. A wrong count or
order makes the model or the capture fail; a wrong placement shows in the markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from fed_asr.config import LoraConfig
from fed_asr.data import VQASample
from fed_asr.models import (
    VQACollator,
    attach_lora,
    forward_with_attention,
    install_attention_capture,
    model_family,
)
from fed_asr.models.families.idefics3 import Idefics3Family
from fed_asr.models.families.llava_onevision import anyres_map_shape
from fed_asr.models.image_layout import image_layout
from fed_asr.models.modules import language_model_prefix
from fed_asr.models.tiny_families import TINY_TEMPLATES
from fed_asr.models.tiny_tiled import (
    build_idefics3,
    build_llava_onevision,
    idefics3_config,
)

WORDS = ["what", "color", "is", "the", "shape", "red", "blue", "no", "circle"]
TEMPLATE = TINY_TEMPLATES["idefics3"]


def _image(tmp_path: Path, width: int, height: int) -> str:
    """A ``width x height`` PNG with a red block in its top-right corner."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste((220, 30, 30), (width // 2, 0, width, height // 2))
    path = tmp_path / f"{width}x{height}.png"
    image.save(path)
    return str(path)


def _sample(path: str) -> VQASample:
    return VQASample(path, "What color is the shape?", "red")


def _with_lora(model: Any) -> Any:
    """Frozen base with LoRA whose B is non-zero (the adapters change attention)."""
    model.requires_grad_(False)
    install_attention_capture(model)
    peft_model = attach_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return peft_model


def _capture_equals_eager(model: Any, batch: dict[str, Any]) -> Any:
    """Run both capture modes, check they agree, return the selective result."""
    with torch.no_grad():
        selective = forward_with_attention(model, batch, 2, "selective")
        eager = forward_with_attention(model, batch, 2, "eager")
    torch.testing.assert_close(selective.attn, eager.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective.logits, eager.logits, rtol=0, atol=1e-5)
    assert float(selective.attn.sum(-1).max()) > 0.0
    return selective


@pytest.fixture(scope="module")
def idefics3() -> tuple[Any, Any]:
    """Tiny Idefics3 (tiles of 2x2 tokens) with LoRA, and its processor."""
    model, processor = build_idefics3(WORDS, TEMPLATE, seed=0)
    return _with_lora(model), processor


@pytest.mark.parametrize(
    ("width", "height", "tiles", "grid"),
    [(64, 64, (2, 2), (4, 4)), (64, 32, (1, 2), (2, 4)), (32, 64, (2, 1), (4, 2))],
)
def test_idefics3_tiles_sit_where_their_row_col_markers_say(
    idefics3: tuple[Any, Any],
    tmp_path: Path,
    width: int,
    height: int,
    tiles: tuple[int, int],
    grid: tuple[int, int],
) -> None:
    # Prepare
    model, processor = idefics3
    family = model_family(model)
    collator = VQACollator(processor, TEMPLATE, ["red"], family=family)
    batch = collator([_sample(_image(tmp_path, width, height))])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])

    # Execute
    spans = family.image_spans(model.get_base_model().config, batch["input_ids"])[0]
    result = _capture_equals_eager(model, batch)

    # Assert: every tile's marker names the tile its origin places; global last
    placed = [s for s in spans if s.origin is not None]
    assert len(placed) == tiles[0] * tiles[1]
    for span in placed:
        row, col = span.origin[0] // 2, span.origin[1] // 2  # type: ignore[index]
        assert tokens[span.start - 1] == f"<row_{row + 1}_col_{col + 1}>"
    assert spans[-1].origin is None and tokens[spans[-1].start - 1] == "<global-img>"
    assert result.grid == grid
    assert result.attn.shape[-1] == grid[0] * grid[1]


def test_idefics3_image_not_split_is_its_global_image_alone(
    idefics3: tuple[Any, Any], tmp_path: Path
) -> None:
    # Prepare: no image splitting, so the image is one tile-sized view
    model, processor = idefics3
    processor.image_processor.do_image_splitting = False
    try:
        collator = VQACollator(processor, TEMPLATE, ["red"], family=model_family(model))
        batch = collator([_sample(_image(tmp_path, 64, 64))])

        # Execute
        result = _capture_equals_eager(model, batch)
    finally:
        processor.image_processor.do_image_splitting = True

    # Assert
    assert batch["pixel_values"].shape[1] == 1
    assert result.grid == (2, 2)
    assert [s.origin for s in result.spans[0]] == [(0, 0)]


def test_idefics3_tiles_not_forming_a_grid_raise_naming_the_row() -> None:
    # Prepare: three tiles of 2x2 tokens, a row break after the second, then global
    config = idefics3_config(build_idefics3(WORDS, TEMPLATE, seed=0)[1])
    image, text = config.image_token_id, 0
    tile = [image] * 4
    ids = [text, text, *tile, text, text, *tile, text, text, text, *tile]
    ids += [text, text, text, *tile, text]

    # Execute / Assert
    with pytest.raises(ValueError, match="Row 0: the 3 image tiles .* do not form"):
        Idefics3Family().image_spans(config, torch.tensor([ids]))
    with pytest.raises(ValueError, match="an Idefics3 tile is \\(2, 2\\)"):
        Idefics3Family().image_spans(config, torch.tensor([[text, *tile[:3], text]]))


def test_smolvlm_checkpoint_uses_the_idefics3_family_on_its_text_model(
    tmp_path: Path,
) -> None:
    # Prepare: a SmolVLM model (same image prompt as Idefics3's processor writes)
    from transformers import SmolVLMForConditionalGeneration

    _, processor = build_idefics3(WORDS, TEMPLATE, seed=0)
    torch.manual_seed(0)
    base = SmolVLMForConditionalGeneration(idefics3_config(processor, "smolvlm"))
    model = _with_lora(base)
    collator = VQACollator(processor, TEMPLATE, ["red"], family=model_family(base))
    batch = collator([_sample(_image(tmp_path, 64, 64))] * 2)

    # Execute
    result = _capture_equals_eager(model, batch)

    # Assert: LoRA only on the decoder (the vision encoder has q/v projections too)
    assert isinstance(model_family(base), Idefics3Family)
    assert language_model_prefix(base) == "model.text_model"
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(".text_model." in n for n in lora)
    assert result.grid == (4, 4)


@pytest.fixture(scope="module")
def onevision() -> tuple[Any, Any]:
    """Tiny LLaVA-OneVision (4x4 base view, crops up to 32x32) with LoRA."""
    model, processor = build_llava_onevision(WORDS, TEMPLATE, seed=0)
    return _with_lora(model), processor


def test_llava_onevision_map_of_a_wide_image_is_unpadded_without_newlines(
    onevision: tuple[Any, Any], tmp_path: Path
) -> None:
    # Prepare: 64x40 picks 2x2 crops (8x8 tokens); unpadding keeps 6 of 8 rows
    model, processor = onevision
    family = model_family(model)
    collator = VQACollator(processor, TEMPLATE, ["red"], family=family)
    batch = collator([_sample(_image(tmp_path, 64, 40))])
    config = model.get_base_model().config

    # Execute
    result = _capture_equals_eager(model, batch)
    layout = image_layout(batch, family.spans_of_batch(config, batch))

    # Assert: 16 base tokens, then 6 rows of 8 cells + a newline each
    start = batch["image_start"]
    assert anyres_map_shape(config, (40, 64)) == (6, 8)
    assert batch["image_end"] - start == 16 + 6 * 9
    assert result.grid == (6, 8)
    newlines = {start + 16 + r * 9 + 8 for r in range(6)}
    assert not newlines & set(layout.columns)
    assert min(layout.columns) == start + 16


def test_llava_onevision_map_beyond_anyres_max_is_shrunk_as_the_model_does(
    onevision: tuple[Any, Any], tmp_path: Path
) -> None:
    # Prepare: anyres_max_1 shrinks the 8x8 map of a 64x64 image to 4x4
    model, processor = onevision
    config = model.get_base_model().config
    config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"
    try:
        collator = VQACollator(processor, TEMPLATE, ["red"], family=model_family(model))
        batch = collator([_sample(_image(tmp_path, 64, 64))] * 2)

        # Execute
        result = _capture_equals_eager(model, batch)
    finally:
        config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_9"

    # Assert
    assert result.grid == (4, 4)
    assert batch["image_end"] - batch["image_start"] == 16 + 4 * 5


def test_llava_onevision_image_sizes_not_matching_the_blocks_raise(
    onevision: tuple[Any, Any], tmp_path: Path
) -> None:
    # Prepare
    model, processor = onevision
    family = model_family(model)
    collator = VQACollator(processor, TEMPLATE, ["red"], family=family)
    batch = collator([_sample(_image(tmp_path, 64, 64))] * 2)
    config = model.get_base_model().config

    # Execute / Assert
    one_size = {**batch, "image_sizes": batch["image_sizes"][:1]}
    with pytest.raises(
        ValueError, match="2 image blocks but `image_sizes` describes 1"
    ):
        family.spans_of_batch(config, one_size)
    other_size = {**batch, "image_sizes": torch.tensor([[40, 64], [40, 64]])}
    with pytest.raises(ValueError, match=r"6x8 map"):
        family.spans_of_batch(config, other_size)
    with pytest.raises(ValueError, match="use `spans_of_batch`"):
        family.image_spans(config, batch["input_ids"])


@pytest.mark.parametrize("kind", ["idefics3", "onevision"])
def test_tiled_family_collator_matches_the_processor_on_the_whole_prompt(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    # Prepare
    model, processor = request.getfixturevalue(kind)
    path = _image(tmp_path, 64, 64)
    sample = _sample(path)
    collator = VQACollator(processor, TEMPLATE, ["red"], family=model_family(model))
    prompt = collator.prompt(sample.question)

    # Execute
    batch = collator([sample])
    reference = processor(
        text=[prompt],
        images=[Image.open(path).convert("RGB")],
        add_special_tokens=False,
        return_tensors="pt",
    )

    # Assert: the prompt tokens and pixels the processor itself produces
    length = int(batch["prompt_length"][0])
    assert batch["input_ids"][0, :length].tolist() == reference["input_ids"][0].tolist()
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])
