"""The paper's L_geo, query weights and diagnostics on the tiny LLaVA model."""

from __future__ import annotations

from typing import Any

import torch

from fed_asr.config import ModelConfig
from fed_asr.data import VQASample
from fed_asr.diagnostics import grad_norm_ratios
from fed_asr.geometry import (
    batch_geometry_loss,
    cached_pooled_reference,
    pooled_embeddings,
)
from fed_asr.models import VQACollator, forward_with_attention
from fed_asr.models.tiny import build_tiny
from fed_asr.query_tokens import function_word_mask, query_token_weights
from fed_asr.reference_cache import ReferenceCache
from fed_asr.spectral import describe


def test_paper_geometry_with_cached_reference_equals_recomputed_and_trains_lora(
    perturbed_lora: tuple[Any, dict[str, Any], list[tuple[str, str]]],
) -> None:
    # Prepare: LoRA B non-zero so current and reference differ
    model, batch, keys = perturbed_lora
    capture = forward_with_attention(model, batch, 2, "selective", hidden=True)
    hidden = capture.image_hidden.shape[-1]
    calls = []

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        with torch.no_grad(), model.disable_adapter():
            ref = forward_with_attention(model, batch, 2, "selective", hidden=True)
        return pooled_embeddings(ref.image_hidden, ref.text_hidden, capture.query_mask)

    cache = ReferenceCache(100)

    # Execute
    cur_img, cur_txt = pooled_embeddings(
        capture.image_hidden, capture.text_hidden, capture.query_mask
    )
    first = cached_pooled_reference(cache, keys, compute, 4, hidden, "cpu")
    second = cached_pooled_reference(cache, keys, compute, 4, hidden, "cpu")
    loss = batch_geometry_loss(cur_img, cur_txt, *first)
    again = batch_geometry_loss(cur_img, cur_txt, *second)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ratios = grad_norm_ratios(lora, capture.loss, {"geo": 0.02 * loss})

    # Assert
    assert len(calls) == 1 and cache.hits == len(keys)
    assert loss.item() > 0
    torch.testing.assert_close(again, loss, rtol=1e-5, atol=1e-7)
    assert 0 < ratios["geo"] < float("inf")


def test_function_word_weights_from_collated_ids_feed_describe(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab)
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    capture = forward_with_attention(model, batch, 2, "selective")
    rows = batch["input_ids"][:, batch["image_end"] :]  # the capture's query rows

    # Execute
    function = function_word_mask(rows, tokenizer=processor.tokenizer)
    weights = query_token_weights(capture.query_mask, function)
    desc = describe(capture.attn, capture.grid, token_weights=weights)

    # Assert: weights sit inside the prompt; "What"/"is"/"the"/"there"/"a" exist
    assert function.shape == capture.query_mask.shape
    assert (weights <= capture.query_mask.float()).all()
    assert (weights.sum(1) > 0).all()
    assert (weights.sum(1) < capture.query_mask.sum(1)).any()
    assert torch.isfinite(desc.descriptor).all()
