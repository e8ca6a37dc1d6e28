"""Tests of candidate scoring: packed (fast) path == teacher forcing == LM loss."""

from __future__ import annotations

import pytest
import torch

from fed_asr.config import LoraConfig, ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import (
    VQACollator,
    attach_lora,
    candidate_token_ids,
    predict,
    score_candidates,
)
from fed_asr.models.tiny import build_tiny

MULTI = ["red", "blue circle", "no", "green rectangle", "yes"]


@pytest.fixture
def setup(cfg: ModelConfig, vocab: list[str], vqa_samples: list[VQASample]):  # noqa: ANN201
    model, processor = build_tiny(cfg, vocab, seed=2, num_key_value_heads=2)
    batch = VQACollator(processor, cfg.prompt_template, MULTI)(vqa_samples)
    return model, processor, batch


def test_candidate_token_ids_appends_eos_and_splits_words(setup) -> None:  # noqa: ANN001
    # Prepare
    _, processor, _ = setup
    tokenizer = processor.tokenizer

    # Execute
    with_eos = candidate_token_ids(processor, MULTI)
    without = candidate_token_ids(processor, MULTI, eos=False)

    # Assert
    assert tokenizer.convert_ids_to_tokens(with_eos[1]) == ["blue", "circle", "</s>"]
    assert [len(c) for c in without] == [1, 2, 1, 2, 1]
    assert all(c[-1] == tokenizer.eos_token_id for c in with_eos)


@pytest.mark.parametrize("eos", [True, False])
def test_score_candidates_packed_equals_teacher_forcing(setup, eos: bool) -> None:  # noqa: ANN001
    # Prepare
    model, processor, batch = setup
    candidates = candidate_token_ids(processor, MULTI, eos=eos)

    # Execute
    packed = score_candidates(model, batch, candidates, method="packed")
    forced = score_candidates(
        model, batch, candidates, method="teacher_forcing", chunk_size=3
    )

    # Assert
    assert packed.shape == (batch["input_ids"].shape[0], len(MULTI))
    torch.testing.assert_close(packed, forced, rtol=0, atol=1e-5)


def test_score_candidates_on_peft_model_packed_equals_teacher_forcing(setup) -> None:  # noqa: ANN001
    # Prepare
    base, processor, batch = setup
    candidates = candidate_token_ids(processor, MULTI)
    plain = score_candidates(base, batch, candidates)
    model = attach_lora(base, LoraConfig(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)

    # Execute
    packed = score_candidates(model, batch, candidates, method="packed")
    forced = score_candidates(model, batch, candidates, method="teacher_forcing")

    # Assert
    torch.testing.assert_close(packed, forced, rtol=0, atol=1e-5)
    assert not torch.allclose(packed, plain, atol=1e-3)


def test_score_candidates_single_token_fast_path_equals_general_path(
    setup,
    vocab: list[str],  # noqa: ANN001
) -> None:
    # Prepare
    model, processor, batch = setup
    single = ["red", "blue", "no", "yes", "circle"]
    candidates = candidate_token_ids(processor, single, eos=False)
    assert all(len(c) == 1 for c in candidates)

    # Execute
    fast = score_candidates(model, batch, candidates)
    general = score_candidates(model, batch, candidates, method="teacher_forcing")

    # Assert
    torch.testing.assert_close(fast, general, rtol=0, atol=1e-5)


def test_score_candidates_equals_lm_loss_of_the_labelled_answer(
    cfg: ModelConfig, vocab: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab, seed=2)
    sample = vqa_samples[3]  # answer "green circle": 2 tokens + EOS
    batch = VQACollator(processor, cfg.prompt_template, [sample.answer])([sample])
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")
    }
    with torch.no_grad():
        loss = model(**inputs).loss
    n_tokens = int((batch["labels"] != -100).sum())

    # Execute
    score = score_candidates(
        model, batch, candidate_token_ids(processor, [sample.answer])
    )

    # Assert
    torch.testing.assert_close(score[0, 0], -loss * n_tokens, rtol=1e-5, atol=1e-5)


def test_predict_returns_argmax_of_scores(setup) -> None:  # noqa: ANN001
    # Prepare
    model, processor, batch = setup
    candidates = candidate_token_ids(processor, MULTI)

    # Execute
    predicted = predict(model, batch, candidates)

    # Assert
    expected = score_candidates(model, batch, candidates).argmax(dim=-1)
    assert torch.equal(predicted, expected)


def test_score_candidates_unknown_method_raises(setup) -> None:  # noqa: ANN001
    # Prepare
    model, processor, batch = setup

    # Execute / Assert
    with pytest.raises(ValueError, match="`method`"):
        score_candidates(
            model, batch, candidate_token_ids(processor, MULTI), method="beam"
        )
