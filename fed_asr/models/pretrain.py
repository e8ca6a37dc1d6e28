"""Base-model preparation of the tiny LLaVA: caption pre-training of all its weights.

A freshly built tiny model knows nothing about images. Before federated continual
learning starts, it learns to caption easy-VQA images ("caption" -> "red circle") with
the LM loss on the answer tokens, so that its cross-modal attention is meaningful, as
that of a real pre-trained MLLM would be.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fed_asr.config import ModelConfig
from fed_asr.models.batching import MODEL_INPUT_KEYS, VQACollator
from fed_asr.models.device import model_device, move_batch

if TYPE_CHECKING:
    from fed_asr.data import VQASample

LOG_EVERY = 50
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
GRAD_CLIP = 1.0


@dataclass
class PretrainResult:
    """Summary of one caption pre-training run."""

    steps: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last ``LOG_EVERY`` steps


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to ``MIN_LR_FRACTION``."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def _index_stream(n: int, generator: torch.Generator):  # noqa: ANN202 - generator
    """Endless sample indices: one fresh permutation per epoch."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def pretrain_base_model(
    model: nn.Module,
    processor: Any,
    samples: Sequence[VQASample],
    cfg: ModelConfig,
    seed: int = 0,
    progress: bool = True,
) -> PretrainResult:
    """Train every weight of ``model`` on caption samples (in place).

    Parameters
    ----------
    model : nn.Module
        The tiny LLaVA from ``build_tiny`` (on any device).
    processor : Any
        Its processor.
    samples : Sequence[VQASample]
        ``VQASample(image, question="caption", answer="red circle")`` items.
    cfg : ModelConfig
        ``pretrain_steps``, ``pretrain_batch_size``, ``pretrain_lr`` and
        ``prompt_template`` are used.
    seed : int
        Seeds the batch order (weights are initialised by the caller).
    progress : bool
        Print a line with the loss and ETA every ``LOG_EVERY`` steps (stderr).

    Returns
    -------
    PretrainResult
        Steps, time and losses. The model is left in eval mode.

    Raises
    ------
    ValueError
        No samples, or a non-finite loss.
    """
    from fed_asr.progress import Progress

    if len(samples) == 0:
        raise ValueError("`samples` for caption pre-training must not be empty.")
    steps = cfg.pretrain_steps
    collator = VQACollator(processor, cfg.prompt_template, answers=[])
    device = model_device(model)
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps)
    )
    indices = _index_stream(len(samples), torch.Generator().manual_seed(seed))
    meter = Progress("pretrain tiny", steps, enabled=progress)
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(1, steps + 1):
        chunk = [samples[next(indices)] for _ in range(cfg.pretrain_batch_size)]
        batch = move_batch(collator(chunk), device)
        loss = model(**{k: batch[k] for k in MODEL_INPUT_KEYS}).loss
        if not torch.isfinite(loss):
            raise ValueError(f"Non-finite caption pre-training loss at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % LOG_EVERY == 0 or step == steps:
            recent = losses[-LOG_EVERY:]
            meter.update(step, f"loss={sum(recent) / len(recent):.4f}")
    model.eval()
    model.requires_grad_(False)
    tail = losses[-LOG_EVERY:] or [math.nan]
    return PretrainResult(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else math.nan,
        final_loss=sum(tail) / len(tail),
    )
