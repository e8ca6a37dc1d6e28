"""ASR's descriptor layouts: features (spectrum | coherence) x heads (pooled | each)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_lora import small_stream, tiny_lora_model

from fed_asr.config import RegularizerConfig
from fed_asr.descriptor_layout import (
    describe_batch,
    descriptor_size,
    layer_heads,
    model_descriptor_size,
)
from fed_asr.models import forward_with_attention
from fed_asr.security.stat_bounds import descriptor_bounds

LAYOUTS = [
    ("spectrum", "pooled"),
    ("spectrum", "each"),
    ("coherence", "pooled"),
    ("coherence", "each"),
]


@pytest.mark.parametrize(
    ("features", "heads", "expected"),
    [
        ("spectrum", "pooled", 2 * (8 + 16 + 3)),
        ("spectrum", "each", 6 * (8 + 16 + 3)),
        ("coherence", "pooled", 2 * 8),
        ("coherence", "each", 6 * 8),
    ],
)
def test_descriptor_size_of_each_layout(
    features: str, heads: str, expected: int
) -> None:
    cfg = RegularizerConfig(features=features, heads=heads)
    assert descriptor_size(cfg, 6) == expected


def test_per_head_size_needs_the_layer_heads() -> None:
    with pytest.raises(ValueError, match="captured layer-heads"):
        descriptor_size(RegularizerConfig(heads="each"), None)


@pytest.mark.parametrize(("field", "value"), [("features", "phase"), ("heads", "all")])
def test_unknown_layout_is_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"regularizer.{field}"):
        RegularizerConfig(**{field: value})


@pytest.mark.parametrize(("features", "heads"), LAYOUTS)
def test_descriptors_of_a_real_capture_have_the_size_and_range_declared(
    features: str, heads: str
) -> None:
    # Prepare: the tiny LLaVA with LoRA, its attention captured on real samples
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    cfg = RegularizerConfig(l_sel=2, features=features, heads=heads)
    batch = collator(stream.stages[0].train[:4])
    capture = forward_with_attention(model, batch, cfg.l_sel)

    # Execute
    desc = describe_batch(capture, batch, cfg)
    j = layer_heads(model, cfg.l_sel)
    bounds = descriptor_bounds(
        cfg.n_radial,
        cfg.n_angular,
        features=features,
        layer_heads=j if heads == "each" else None,
    )

    # Assert: the size the statistics and the server expect, within the server's range
    assert j == capture.attn.shape[1] * capture.attn.shape[2]
    assert desc.descriptor.shape == (4, model_descriptor_size(model, cfg))
    assert bounds.dim == desc.descriptor.shape[1]
    values = desc.descriptor.detach().numpy()
    assert bool(
        np.all(values >= bounds.low - 1e-6) and np.all(values <= bounds.high + 1e-6)
    )
    assert desc.angular.shape == (4, cfg.n_angular)
    torch.testing.assert_close(desc.angular.sum(-1), torch.ones(4))


@pytest.mark.parametrize("features", ["spectrum", "coherence"])
def test_pooled_descriptor_is_the_mean_and_variance_of_the_per_head_one(
    features: str,
) -> None:
    # Prepare
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    each = RegularizerConfig(l_sel=2, features=features, heads="each")
    pooled = dataclasses.replace(each, heads="pooled")
    batch = collator(stream.stages[0].train[:4])
    capture = forward_with_attention(model, batch, each.l_sel)

    # Execute
    per_head = describe_batch(capture, batch, each).descriptor
    summary = describe_batch(capture, batch, pooled).descriptor

    # Assert: (B, J, F) -> mean and population variance over J
    feats = per_head.reshape(4, layer_heads(model, 2), -1)
    mean, var = feats.mean(1), feats.var(1, unbiased=False)
    torch.testing.assert_close(
        summary, torch.cat([mean, var], -1), atol=1e-5, rtol=1e-4
    )
