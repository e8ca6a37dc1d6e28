"""``fedprox``: (mu/2) ||w - w_global||^2 over the adapter (Li et al., MLSys 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.methods.base import (
    ContinualMethod,
    StepContext,
    check_non_negative,
    trainable_parameters,
)
from fed_asr.methods.registry import register_method


@dataclass
class FedProxOptions:
    """Options of ``fedprox``: the proximal weight ``mu``."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        check_non_negative("mu", self.mu)


class FedProx(ContinualMethod):
    """FedProx: (mu/2) ||w - w_global||^2 over the trainable (LoRA) weights.

    ``w_global`` is the adapter received this round, snapshotted by
    ``before_training`` (in the central engine: the adapter at the stage start).
    """

    def __init__(self, options: FedProxOptions, regularizer: RegularizerConfig) -> None:
        super().__init__(options, regularizer)
        self.anchor: dict[str, Tensor] = {}

    def before_training(self, model: Any) -> None:
        """Snapshot the received weights."""
        self.anchor = {
            k: p.detach().clone() for k, p in trainable_parameters(model).items()
        }

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``prox``: (mu/2) sum ||w - w_global||^2."""
        params = trainable_parameters(ctx.model)
        terms = [(params[k] - w0).square().sum() for k, w0 in self.anchor.items()]
        if not terms or self.options.mu == 0:
            return {}
        return {"prox": 0.5 * self.options.mu * torch.stack(terms).sum()}


register_method("fedprox", FedProx, FedProxOptions)
