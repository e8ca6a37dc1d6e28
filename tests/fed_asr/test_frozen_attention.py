"""``frozen_attention``: attention-score adapters stop after the first stage."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_MODEL_FIELDS

from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import (
    DataConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RegularizerConfig,
    TrainConfig,
)
from fed_asr.data import build_stream
from fed_asr.methods import PREVIOUS_ADAPTER, build_method
from fed_asr.models import VQACollator, adapter_state
from fed_asr.models.tiny import build_tiny
from fed_asr.train import train_stage

MODEL = ModelConfig(**TINY_MODEL_FIELDS)  # type: ignore[arg-type]
REG = RegularizerConfig(l_sel=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _is_frozen_key(key: str) -> bool:
    return any(m in key.split(".") for m in ("q_proj", "k_proj"))


@pytest.mark.parametrize("later_stage", [False, True])
def test_frozen_attention_keeps_q_k_adapters_only_after_the_first_stage(
    later_stage: bool,
) -> None:
    stream = build_stream(DataConfig(max_train_per_stage=8, max_test_per_stage=4), 0)
    base, processor = build_tiny(MODEL, stream.vocabulary())
    model = get_lora_aggregation("fedavg").attach(
        base, LoraConfig(r=4, target_modules=TARGETS), seed=0
    )
    collator = VQACollator(processor, MODEL.prompt_template, stream.answers)
    method = build_method(MethodConfig(name="frozen_attention"), REG)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    method.set_memory(model, {PREVIOUS_ADAPTER: before} if later_stage else {})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    train_stage(
        model,
        collator,
        list(stream.stages[0].train),
        stream.skills,
        method,
        TrainConfig(batch_size=4, epochs=1, lr=1e-2, diagnostics=False),
        REG,
    )

    after = adapter_state(model)
    frozen = [k for k in before if _is_frozen_key(k)]
    trained = [k for k in before if not _is_frozen_key(k) and "lora_B" in k]
    assert frozen and trained
    moved = {k: not torch.equal(before[k], after[k]) for k in before}
    assert all(moved[k] for k in trained)
    assert all(moved[k] != later_stage for k in frozen if "lora_B" in k)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_frozen_attention_refuses_an_empty_module_list() -> None:
    with pytest.raises(ValueError, match="method.options.modules"):
        build_method(
            MethodConfig(name="frozen_attention", options={"modules": []}), REG
        )
