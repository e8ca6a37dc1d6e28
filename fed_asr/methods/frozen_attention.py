"""``frozen_attention``: vanilla LoRA whose attention-score adapters stop after stage 0.

A diagnostic bound, not a method to deploy: from the second stage on, the LoRA weights
of the projections that compute attention scores (``q_proj`` and ``k_proj`` by
default, in every tower) are no longer trained, so the attention logits' own
parameters keep their first-stage values while everything else adapts as in
``vanilla``. Attention can still move through the hidden states that feed it; the
run's drift rows say how much. If forgetting under this method equals vanilla's, no
regularizer that only holds attention still (ASR included) can remove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_asr.config import RegularizerConfig
from fed_asr.methods.base import (
    PREVIOUS_ADAPTER,
    ContinualMethod,
    MethodMemory,
    StageEndPlan,
)
from fed_asr.methods.registry import register_method


@dataclass
class FrozenAttentionOptions:
    """Options of ``frozen_attention``: which LoRA-wrapped modules stop training."""

    modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj"])

    def __post_init__(self) -> None:
        if not self.modules or not all(
            isinstance(m, str) and m.strip() for m in self.modules
        ):
            raise ValueError(
                "`method.options.modules` must be a non-empty list of module names, "
                f"got {self.modules!r}."
            )


class FrozenAttention(ContinualMethod):
    """Vanilla LoRA; the adapters of ``options.modules`` are frozen after stage 0.

    The first stage is plain ``vanilla``. The stage-end adapter kept as ``previous``
    (``keep_adapter``) is how a client knows a stage has passed; the frozen weights are
    the received ones, which equal it at every later stage's start.
    """

    stage_end = StageEndPlan(keep_adapter=True)

    def __init__(
        self, options: FrozenAttentionOptions, regularizer: RegularizerConfig
    ) -> None:
        super().__init__(options, regularizer)
        self.frozen = False

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Freeze from the stage after the first one (memory holds ``previous``)."""
        self.frozen = PREVIOUS_ADAPTER in memory

    def optimizes(self, parameter_name: str) -> bool:
        """False for the LoRA weights of ``options.modules`` once frozen."""
        if not self.frozen:
            return True
        parts = parameter_name.split(".")
        return not any(module in parts for module in self.options.modules)


register_method("frozen_attention", FrozenAttention, FrozenAttentionOptions)
