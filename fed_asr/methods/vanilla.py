"""``vanilla``: LoRA fine-tuning with the task loss only (FedAvg-LoRA)."""

from __future__ import annotations

from fed_asr.methods.base import ContinualMethod, NoOptions
from fed_asr.methods.registry import register_method


class Vanilla(ContinualMethod):
    """LoRA fine-tuning with the task loss only (the forgetting baseline)."""


register_method("vanilla", Vanilla, NoOptions)
