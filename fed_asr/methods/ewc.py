"""``ewc``: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) on LoRA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.data import VQASample
from fed_asr.methods.base import (
    PREVIOUS_ADAPTER,
    ContinualMethod,
    MethodMemory,
    StageEndPlan,
    StepContext,
    check_non_negative,
    layout_reason,
    trainable_parameters,
)
from fed_asr.methods.registry import register_method
from fed_asr.models import model_device, model_inputs

FISHER = "fisher"  # stage-end statistics: diagonal Fisher of the adapter


@dataclass
class EWCOptions:
    """Options of ``ewc``.

    ``decay``: accumulation across stages, F <- decay * F + F_new (1 = sum);
    ``fisher_batch_size``: samples per gradient when estimating the Fisher
    (1 = the empirical Fisher).
    """

    ewc_lambda: float = 100.0
    decay: float = 1.0
    fisher_batch_size: int = 1

    def __post_init__(self) -> None:
        check_non_negative("ewc_lambda", self.ewc_lambda)
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(
                f"`method.options.decay` must be in [0, 1], got {self.decay}."
            )
        if self.fisher_batch_size <= 0:
            raise ValueError(
                "`method.options.fisher_batch_size` must be positive, got "
                f"{self.fisher_batch_size}."
            )


def fisher_sums(
    model: Any, collator: Any, samples: Sequence[VQASample], batch_size: int = 1
) -> tuple[dict[str, Tensor], int]:
    """Sums of squared task-loss gradients of the trainable weights over ``samples``.

    The samples are cut into consecutive batches of ``batch_size``; batch b (of n_b
    samples) adds ``n_b * g_b^2``, with ``g_b`` the gradient of its mean task loss.
    With ``batch_size=1`` this is the empirical Fisher (sum over samples of the
    squared per-sample gradient).

    Returns
    -------
    tuple[dict[str, Tensor], int]
        Adapter-state keys -> float32 CPU sums, and the number of samples.
    """
    params = trainable_parameters(model)
    sums = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in params.items()}
    if len(samples) == 0:
        return sums, 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        for start in range(0, len(samples), batch_size):
            chunk = list(samples[start : start + batch_size])
            batch = collator(chunk)
            inputs = {k: v.to(device) for k, v in model_inputs(model, batch).items()}
            loss = model(**inputs).loss
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for key, grad in zip(params, grads, strict=True):
                if grad is not None:
                    sums[key] += len(chunk) * grad.detach().float().cpu().square()
    model.train(was_training)
    return sums, len(samples)


def accumulate_fisher(
    old: Mapping[str, Tensor] | None, new: Mapping[str, Tensor] | None, decay: float
) -> dict[str, Tensor] | None:
    """``F <- decay * F_old + F_new`` (decay 1: sum over stages; < 1: online EWC)."""
    if new is None:
        return None if old is None else dict(old)
    if old is None:
        return dict(new)
    return {
        k: decay * torch.as_tensor(old[k]) + v if k in old else v
        for k, v in new.items()
    }


class EWC(ContinualMethod):
    """Elastic Weight Consolidation with an accumulated diagonal Fisher.

    Penalty ``(ewc_lambda/2) sum F (w - w*)^2`` with ``w*`` the global adapter at the
    end of the previous stage and ``F`` the Fisher pooled over clients at each stage
    end and accumulated over stages.
    """

    stage_end = StageEndPlan(statistics=(FISHER,), keep_adapter=True)

    def __init__(self, options: EWCOptions, regularizer: Any) -> None:
        super().__init__(options, regularizer)
        self.terms: list[tuple[str, Tensor, Tensor]] = []

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Keep (key, Fisher, anchor) on the model's device per trainable weight."""
        self.terms = []
        previous, fisher = memory.get(PREVIOUS_ADAPTER), memory.get(FISHER)
        if previous is None or fisher is None:
            return
        device = model_device(model)
        for key in trainable_parameters(model):
            if key in fisher and key in previous:
                f = torch.as_tensor(fisher[key]).to(device, torch.float32)
                anchor = torch.as_tensor(previous[key]).to(device, torch.float32)
                self.terms.append((key, f, anchor))

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``ewc``: (lambda/2) sum F (w - w*)^2 (none in the first stage)."""
        if not self.terms or self.options.ewc_lambda == 0:
            return {}
        params = trainable_parameters(ctx.model)
        total = torch.stack(
            [(f * (params[k].float() - a).square()).sum() for k, f, a in self.terms]
        ).sum()
        return {"ewc": 0.5 * self.options.ewc_lambda * total}

    def stage_end_statistics(
        self, name: str, model: Any, collator: Any, samples: Sequence[VQASample]
    ) -> tuple[dict[str, Tensor], int]:
        """Fisher sums of this site's stage data (``fisher_sums``)."""
        return fisher_sums(model, collator, samples, self.options.fisher_batch_size)

    def statistics_reason(
        self,
        name: str,
        sums: Mapping[str, Tensor],
        adapter_shapes: Mapping[str, tuple[int, ...]],
    ) -> str | None:
        """The Fisher has one array per trainable adapter weight, of its shape."""
        return layout_reason(sums, adapter_shapes)

    def update_memory(
        self,
        memory: MethodMemory,
        adapter: Mapping[str, Tensor],
        merged: Mapping[str, dict[str, Tensor] | None],
    ) -> MethodMemory:
        """Anchor = stage-end adapter; Fisher accumulated with ``decay``."""
        new = super().update_memory(memory, adapter, {})
        fisher = accumulate_fisher(
            memory.get(FISHER), merged.get(FISHER), self.options.decay
        )
        if fisher is not None:
            new[FISHER] = fisher
        return new


class EWCLocal(EWC):
    """EWC with each client's own Fisher (nothing but the adapter shared).

    The anchor is still the global adapter of the previous stage end; the Fisher is
    the client's own stage data's, accumulated across stages in its node state and
    never sent (``StageEndPlan.statistics_scope="local"``). Isolates the value of
    pooling the Fisher, as ``asr_local`` does for the spectrum. In the central engine
    (one site) it equals ``ewc``.
    """

    stage_end = StageEndPlan(
        statistics=(FISHER,), keep_adapter=True, statistics_scope="local"
    )


register_method("ewc", EWC, EWCOptions)
register_method("ewc_local", EWCLocal, EWCOptions)
