"""Tests of forward_with_attention: selective == eager, gradients, hidden states."""

from __future__ import annotations

import pytest
import torch

from fed_asr.config import LoraConfig, ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import VQACollator, attach_lora, forward_with_attention
from fed_asr.models.capture import SELECTIVE_ATTENTION
from fed_asr.models.tiny import build_tiny


def _setup(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    samples: list[VQASample],
    kv_heads: int | None = None,
):  # noqa: ANN202
    model, processor = build_tiny(cfg, vocab, seed=1, num_key_value_heads=kv_heads)
    batch = VQACollator(processor, cfg.prompt_template, answers)(samples)
    return model, batch


def _randomize_lora_b(model: torch.nn.Module) -> None:
    """Give LoRA B non-zero values so the adapters change the attention."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)


@pytest.mark.parametrize("rows", [4, 1])  # 1 row: no padding, SDPA gets no mask
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_forward_with_attention_selective_equals_eager(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    vqa_samples: list[VQASample],
    kv_heads: int | None,
    rows: int,
) -> None:
    # Prepare
    vqa_samples = vqa_samples[:rows]
    model, batch = _setup(cfg, vocab, answers, vqa_samples, kv_heads)
    model = attach_lora(model, LoraConfig(r=4))
    _randomize_lora_b(model)

    # Execute
    with torch.no_grad():
        selective = forward_with_attention(model, batch, l_sel=2, mode="selective")
        eager = forward_with_attention(model, batch, l_sel=2, mode="eager")

    # Assert
    grid = cfg.image_size // cfg.patch_size
    tq = batch["input_ids"].shape[1] - batch["image_end"]
    assert selective.attn.shape == (
        len(vqa_samples),
        2,
        cfg.text_heads,
        tq,
        grid * grid,
    )
    assert selective.grid == (grid, grid)
    torch.testing.assert_close(selective.attn, eager.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective.logits, eager.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective.loss, eager.loss, rtol=0, atol=1e-5)
    assert torch.equal(selective.query_mask, batch["query_mask"])


def test_forward_with_attention_matches_plain_sdpa_model_and_restores_configs(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = model(**inputs).logits  # plain sdpa

    # Execute
    with torch.no_grad():
        result = forward_with_attention(model, batch, l_sel=1)
        forward_with_attention(model, batch, l_sel=1, mode="eager")

    # Assert
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-6)
    assert model.config.text_config._attn_implementation == SELECTIVE_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_forward_with_attention_rows_sum_to_at_most_one(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)

    # Execute
    with torch.no_grad():
        result = forward_with_attention(model, batch, l_sel=2)

    # Assert
    mass = result.attn.sum(dim=-1)  # (B, L, H, Tq)
    assert result.attn.dtype == torch.float32
    assert (result.attn >= 0).all()
    assert (mass > 0).all() and (mass < 1).all()


def test_forward_with_attention_gradients_reach_lora_of_q_proj(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)
    model = attach_lora(model, LoraConfig(r=4))
    _randomize_lora_b(model)
    last = cfg.text_layers - 1

    # Execute
    result = forward_with_attention(model, batch, l_sel=1)
    result.attn.square().sum().backward()

    # Assert
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in ("lora_A", "lora_B"):
        name = next(n for n in grads if f"layers.{last}.self_attn.q_proj.{part}" in n)
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(
        p.grad is None for n, p in model.named_parameters() if not p.requires_grad
    )


def test_forward_with_attention_hidden_slices_last_hidden_state(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        last = model(**inputs, output_hidden_states=True).hidden_states[-1]

    # Execute
    with torch.no_grad():
        result = forward_with_attention(model, batch, l_sel=1, hidden=True)

    # Assert
    start, end = batch["image_start"], batch["image_end"]
    assert result.image_hidden is not None and result.text_hidden is not None
    torch.testing.assert_close(
        result.image_hidden, last[:, start:end], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(result.text_hidden, last[:, end:], rtol=0, atol=1e-6)
    assert result.text_hidden.shape[:2] == batch["query_mask"].shape


@pytest.mark.parametrize("l_sel", [0, 3])
def test_forward_with_attention_l_sel_outside_layers_raises(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    vqa_samples: list[VQASample],
    l_sel: int,
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)

    # Execute / Assert
    with pytest.raises(ValueError, match="l_sel"):
        forward_with_attention(model, batch, l_sel=l_sel)


def test_forward_with_attention_unknown_mode_raises(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)

    # Execute / Assert
    with pytest.raises(ValueError, match="`mode`"):
        forward_with_attention(model, batch, l_sel=1, mode="flash")


def test_forward_with_attention_image_block_not_matching_grid_raises(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, batch = _setup(cfg, vocab, answers, vqa_samples)
    batch = {**batch, "image_end": batch["image_end"] - 1}

    # Execute / Assert
    with pytest.raises(ValueError, match="vision grid"):
        forward_with_attention(model, batch, l_sel=1)


def test_forward_with_attention_under_gradient_checkpointing_equals_without(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> None:
    # Prepare: frozen base, LoRA, training mode; the last of 2 layers is captured
    model, batch = _setup(cfg, vocab, answers, vqa_samples)
    model.requires_grad_(False)
    model = attach_lora(model, LoraConfig(r=4))
    _randomize_lora_b(model)
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    layers = list(model.get_base_model().model.language_model.layers)
    calls = [0, 0]
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(
            lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)
        )

    def grads() -> list[torch.Tensor]:
        result = forward_with_attention(model, batch, l_sel=1)
        return list(torch.autograd.grad(result.attn.square().sum() + result.loss, lora))

    expected = grads()
    calls[:] = [0, 0]
    model.get_base_model().activation_checkpointing_enable()  # non-reentrant

    # Execute
    got = grads()

    # Assert: same gradients; layer 0 recomputed in backward, the captured one not
    assert max(float(g.abs().max()) for g in expected) > 0.0
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert calls == [2, 1]
    assert all(layer.gradient_checkpointing for layer in layers)
