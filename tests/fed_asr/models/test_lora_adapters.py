"""Tests of LoRA: targets, FFA, seeded init, adapter state round trip, save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fed_asr.config import LoraConfig, ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import (
    VQACollator,
    adapter_state,
    attach_lora,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from fed_asr.models.tiny import build_tiny


def _lora_module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.fixture
def lora_r4(cfg: ModelConfig, vocab: list[str]) -> torch.nn.Module:
    """The tiny model with a rank-4 LoRA adapter attached."""
    base, _ = build_tiny(cfg, vocab)
    return attach_lora(base, LoraConfig(r=4))


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        return model(**inputs).logits


def test_attach_lora_targets_only_language_model_q_and_v(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute
    model = attach_lora(base, LoraConfig(r=4))

    # Assert
    names = _lora_module_names(model)
    assert len(names) == 2 * cfg.text_layers
    assert all(".language_model.layers." in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_attach_lora_scope_all_also_targets_vision_tower(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute
    model = attach_lora(base, LoraConfig(r=4), scope="all")

    # Assert
    names = _lora_module_names(model)
    assert any("vision_tower" in n for n in names)
    assert len(names) == 2 * (cfg.text_layers + cfg.vision_layers)


def test_lora_config_scope_reaches_the_vision_tower_and_refuses_unknown(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute
    model = attach_lora(base, LoraConfig(r=4, scope="all"))

    # Assert
    assert any("vision_tower" in n for n in _lora_module_names(model))
    with pytest.raises(ValueError, match="lora.scope"):
        LoraConfig(scope="vision")


def test_attach_lora_unknown_target_raises(cfg: ModelConfig, vocab: list[str]) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute / Assert
    with pytest.raises(ValueError, match="target_modules"):
        attach_lora(base, LoraConfig(target_modules=["nonexistent_proj"]))


def test_attach_lora_ffa_trains_only_lora_b(cfg: ModelConfig, vocab: list[str]) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute
    model = attach_lora(base, LoraConfig(r=4), ffa=True)

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    state = adapter_state(model, trainable_only=True)
    assert state and all(".lora_B." in k for k in state)


def test_attach_lora_same_seed_gives_same_lora_a(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    first_base, _ = build_tiny(cfg, vocab)
    second_base, _ = build_tiny(cfg, vocab)

    # Execute
    first = adapter_state(attach_lora(first_base, LoraConfig(r=4), seed=7))
    torch.manual_seed(123)  # the global RNG must not matter
    second = adapter_state(attach_lora(second_base, LoraConfig(r=4), seed=7))

    # Assert
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].abs().sum() > 0 for k in first if ".lora_A." in k)


def test_adapter_state_round_trip_restores_outputs(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    vqa_samples: list[VQASample],
) -> None:
    # Prepare
    base, processor = build_tiny(cfg, vocab)
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    model = attach_lora(base, LoraConfig(r=4))
    _perturb(model, seed=1)
    saved = adapter_state(model)
    expected = _logits(model, batch)
    _perturb(model, seed=2)
    assert not torch.allclose(_logits(model, batch), expected)

    # Execute
    load_adapter_state(model, saved)

    # Assert
    assert list(saved) == sorted(saved)
    assert all(
        v.device.type == "cpu" and v.dtype == torch.float32 for v in saved.values()
    )
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=0)


def test_load_adapter_state_missing_key_raises(lora_r4: torch.nn.Module) -> None:
    # Prepare
    model = lora_r4
    state = adapter_state(model)
    dropped = next(iter(state))
    del state[dropped]

    # Execute / Assert
    with pytest.raises(KeyError, match="1 missing"):
        load_adapter_state(model, state)
    load_adapter_state(model, state, strict=False)  # partial (FFA-style) is allowed


def test_load_adapter_state_unexpected_key_raises(lora_r4: torch.nn.Module) -> None:
    # Prepare
    model = lora_r4
    state = adapter_state(model)
    state["vision.q_proj.lora_A.weight"] = torch.zeros(1)

    # Execute / Assert
    with pytest.raises(KeyError, match="1 unexpected"):
        load_adapter_state(model, state, strict=False)


def test_load_adapter_state_shape_mismatch_raises(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)
    other_base, _ = build_tiny(cfg, vocab)
    model = attach_lora(base, LoraConfig(r=4))
    other = adapter_state(attach_lora(other_base, LoraConfig(r=2)))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"has shape \(2, 32\)"):
        load_adapter_state(model, other)


def test_save_adapter_reloads_with_peft_from_pretrained(
    cfg: ModelConfig,
    vocab: list[str],
    answers: list[str],
    vqa_samples: list[VQASample],
    tmp_path: Path,
) -> None:
    # Prepare
    base, processor = build_tiny(cfg, vocab, seed=5)
    fresh_base, _ = build_tiny(cfg, vocab, seed=5)
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    model = attach_lora(base, LoraConfig(r=4))
    _perturb(model, seed=3)
    expected = _logits(model, batch)

    # Execute
    path = save_adapter(model, tmp_path / "adapter", config_yaml="lora:\n  r: 4\n")
    reloaded = load_adapter(fresh_base, path)

    # Assert
    assert isinstance(reloaded, PeftModel)
    assert (path / "config.yaml").read_text().startswith("lora:")
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-6)


def test_load_adapter_missing_dir_raises(
    cfg: ModelConfig, vocab: list[str], tmp_path: Path
) -> None:
    # Prepare
    base, _ = build_tiny(cfg, vocab)

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(base, tmp_path / "nothing")
