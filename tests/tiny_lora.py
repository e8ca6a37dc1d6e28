"""A tiny LLaVA with fresh LoRA and its collator, for method tests (on ``sys.path``)."""

from __future__ import annotations

from typing import Any

from helpers import TINY_MODEL_FIELDS

from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import DataConfig, LoraConfig, ModelConfig
from fed_asr.data import ContinualStream, build_stream
from fed_asr.models import VQACollator
from fed_asr.models.tiny import build_tiny

TINY_MODEL = ModelConfig(**TINY_MODEL_FIELDS)  # type: ignore[arg-type]


def small_stream() -> ContinualStream:
    """The default easy-VQA stream cut to 8 training / 4 test rows per stage."""
    return build_stream(DataConfig(max_train_per_stage=8, max_test_per_stage=4), 0)


def tiny_lora_model(
    stream: ContinualStream,
    lora: LoraConfig | None = None,
    aggregation: str = "fedavg",
) -> tuple[Any, VQACollator]:
    """The tiny model with LoRA (rank 4 by default) attached by ``aggregation``."""
    base, processor = build_tiny(TINY_MODEL, stream.vocabulary())
    model = get_lora_aggregation(aggregation).attach(
        base, lora or LoraConfig(r=4), seed=0
    )
    collator = VQACollator(processor, TINY_MODEL.prompt_template, stream.answers)
    return model, collator
