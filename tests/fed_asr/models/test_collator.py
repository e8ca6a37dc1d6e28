"""Tests of VQACollator: padding, labels, query mask, answer index, pixel cache."""

from __future__ import annotations

import pytest
import torch

from fed_asr.config import ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import IGNORE_INDEX, VQACollator
from fed_asr.models.tiny import build_tiny


@pytest.fixture
def collator(cfg: ModelConfig, vocab: list[str], answers: list[str]) -> VQACollator:
    _, processor = build_tiny(cfg, vocab)
    return VQACollator(processor, cfg.prompt_template, answers)


def _tokens(collator: VQACollator, ids: torch.Tensor) -> list[str]:
    return collator.tokenizer.convert_ids_to_tokens(ids.tolist())


def test_collator_labels_cover_only_answer_tokens_and_eos(
    collator: VQACollator, vqa_samples: list[VQASample]
) -> None:
    # Execute
    batch = collator(vqa_samples)

    # Assert
    labels = batch["labels"]
    first = _tokens(collator, labels[0][labels[0] != IGNORE_INDEX])
    last = _tokens(collator, labels[3][labels[3] != IGNORE_INDEX])
    assert first == ["red", "</s>"]
    assert last == ["green", "circle", "</s>"]
    answer_start = int(batch["prompt_length"][0])
    assert _tokens(
        collator, batch["input_ids"][0, answer_start - 2 : answer_start]
    ) == [
        "answer",
        ":",
    ]
    assert torch.equal(
        labels[0, answer_start : answer_start + 2],
        batch["input_ids"][0, answer_start : answer_start + 2],
    )


def test_collator_right_pads_and_masks_padding(
    collator: VQACollator, vqa_samples: list[VQASample]
) -> None:
    # Execute
    batch = collator(vqa_samples)

    # Assert
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (batch["input_ids"][row, length:] == collator.pad_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert int(batch["input_ids"][row, length - 1]) == collator.eos_id
    assert int(lengths.max()) == batch["input_ids"].shape[1]


def test_collator_image_block_is_contiguous_and_shared(
    collator: VQACollator, vqa_samples: list[VQASample], cfg: ModelConfig
) -> None:
    # Execute
    batch = collator(vqa_samples)

    # Assert
    start, end = batch["image_start"], batch["image_end"]
    assert (start, end) == (1, 1 + (cfg.image_size // cfg.patch_size) ** 2)
    is_image = batch["input_ids"] == collator.image_token_id
    assert is_image[:, start:end].all()
    assert int(is_image.sum()) == len(vqa_samples) * (end - start)


def test_collator_query_mask_marks_prompt_tokens_after_image(
    collator: VQACollator, vqa_samples: list[VQASample]
) -> None:
    # Execute
    batch = collator(vqa_samples)

    # Assert
    end = batch["image_end"]
    query_mask = batch["query_mask"]
    assert query_mask.shape == (len(vqa_samples), batch["input_ids"].shape[1] - end)
    first = _tokens(collator, batch["input_ids"][0, end:][query_mask[0]])
    assert first == ["what", "color", "is", "the", "shape", "?", "answer", ":"]
    expected_counts = batch["prompt_length"] - end
    assert torch.equal(query_mask.sum(dim=1), expected_counts)


def test_collator_answer_index_is_minus_one_outside_answer_set(
    collator: VQACollator, vqa_samples: list[VQASample], answers: list[str]
) -> None:
    # Execute
    batch = collator(vqa_samples)

    # Assert
    expected = [
        answers.index("red"),
        answers.index("no"),
        answers.index("rectangle"),
        -1,
    ]
    assert batch["answer_index"].tolist() == expected


def test_collator_pixel_values_match_processor_and_are_cached(
    collator: VQACollator, vqa_samples: list[VQASample]
) -> None:
    # Prepare
    from fed_asr.data import load_image

    expected = collator.processor.image_processor(
        images=[load_image(vqa_samples[0].image)], return_tensors="pt"
    )["pixel_values"][0]

    # Execute
    first = collator(vqa_samples)["pixel_values"]
    cached = dict(collator._pixels._items)
    second = collator(vqa_samples[:1])["pixel_values"]

    # Assert
    torch.testing.assert_close(first[0], expected)
    assert set(cached) == {s.image for s in vqa_samples}
    assert torch.equal(second[0], first[0])
    assert collator._pixels._items[vqa_samples[0].image] is cached[vqa_samples[0].image]


def test_collator_question_with_image_token_raises(
    collator: VQACollator, image_files: dict[str, str]
) -> None:
    # Prepare
    sample = VQASample(image_files["red circle"], "what is <image> ?", "red")

    # Execute / Assert
    with pytest.raises(ValueError, match="exactly one image token"):
        collator([sample])


def test_collator_template_without_question_raises(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    _, processor = build_tiny(cfg, vocab)

    # Execute / Assert
    with pytest.raises(ValueError, match="prompt_template"):
        VQACollator(processor, "{image} answer :", ["red"])
