"""The base fingerprint: same weights, same hex; one last bit of the base changes it."""

from __future__ import annotations

import pytest
import torch
from tiny_lora import TINY_MODEL, small_stream, tiny_lora_model

from fed_asr.models.fingerprint import base_fingerprint, base_parameter_name
from fed_asr.models.tiny import build_tiny


def test_base_parameter_names_drop_the_peft_wrapping_and_skip_adapters() -> None:
    assert (
        base_parameter_name("base_model.model.lm.q_proj.base_layer.weight")
        == "lm.q_proj.weight"
    )
    assert base_parameter_name("lm.q_proj.weight") == "lm.q_proj.weight"
    for adapter in ("q.lora_A.default.weight", "head.modules_to_save.default.w"):
        assert base_parameter_name(f"base_model.model.{adapter}") is None
    assert (
        base_parameter_name("base_model.model.head.original_module.weight")
        == "head.weight"
    )


def test_lora_wrapping_and_adapter_training_leave_the_fingerprint_alone() -> None:
    # Prepare: the same tiny base, bare and with LoRA attached
    stream = small_stream()
    bare, _ = build_tiny(TINY_MODEL, stream.vocabulary())
    wrapped, _ = tiny_lora_model(stream)

    # Execute: the adapter moves, the base does not
    before = base_fingerprint(wrapped)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)

    # Assert
    assert before == base_fingerprint(bare) == base_fingerprint(wrapped)
    assert len(before) == 64 and int(before, 16) >= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_last_bit_of_one_base_weight_changes_the_fingerprint(
    dtype: torch.dtype,
) -> None:
    # Prepare: the tiny base, as stored in float32 and as loaded in bf16 on a GPU
    stream = small_stream()
    model, _ = build_tiny(TINY_MODEL, stream.vocabulary())
    model.to(dtype)
    before = base_fingerprint(model)

    # Execute: the next representable value of one weight
    weight = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0, dtype=dtype))

    # Assert
    assert base_fingerprint(model) != before
