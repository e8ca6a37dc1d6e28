"""Base-model preparation of the tiny LLaVA: pre-training of all its weights.

A freshly built tiny model knows nothing about images. Before federated continual
learning starts, it is trained with the LM loss on the answer tokens, so that its
cross-modal attention is meaningful, as that of a real pre-trained MLLM would be.
``model.pretrain_data`` picks the set (``preparation_samples``):

- ``easyvqa``: easy-VQA captions ("caption" -> "red circle"), the default;
- ``stream``: the run stream's own preparation set (for ``scenes``: scene captions
  plus QA pairs of every skill and answer, on images disjoint from its test set);
- ``manifest``: the rows of the JSONL file ``model.pretrain_manifest``.

The prepared model is cached by a hash of its configuration and of these samples
(``fed_asr.models.loading``).
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
    from fed_asr.config import DataConfig
    from fed_asr.data import ObjectImage, VQASample

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


def preparation_samples(
    cfg: ModelConfig, seed: int = 0, data: DataConfig | None = None
) -> list[VQASample] | None:
    """Samples of the base-model preparation chosen by ``cfg.pretrain_data``.

    Parameters
    ----------
    cfg : ModelConfig
        ``pretrain_data``, ``pretrain_size`` and ``pretrain_manifest`` are used.
    seed : int
        Seed of the sample subset (pass the seed given to ``load_base_model``).
    data : DataConfig | None
        The run's data config; required for ``pretrain_data="stream"``.

    Returns
    -------
    list[VQASample] | None
        ``None`` for the default (easy-VQA captions of ``PRETRAIN_IMAGES`` images):
        ``load_base_model(..., samples=None)`` then builds them itself and the cache
        key stays the one of earlier versions. Otherwise the samples, to pass as
        ``samples=`` (their digest enters the cache key).

    Raises
    ------
    ValueError
        ``stream`` without ``data`` or for a stream without a preparation set.
    FileNotFoundError
        A missing ``pretrain_manifest`` or image of one of its rows.
    """
    from fed_asr.data import caption_samples, read_manifest, stream_preparation

    if cfg.pretrain_data == "easyvqa":
        from fed_asr.models.loading import PRETRAIN_IMAGES

        if cfg.pretrain_size == PRETRAIN_IMAGES:
            return None
        return caption_samples(cfg.pretrain_size, seed)
    if cfg.pretrain_data == "manifest":
        return read_manifest(str(cfg.pretrain_manifest))
    if data is None:
        raise ValueError(
            "`model.pretrain_data='stream'` needs the run's data config: pass "
            "`data=cfg.data` to `preparation_samples`."
        )
    return stream_preparation(data, cfg.pretrain_size, seed)


def preparation_objects(
    cfg: ModelConfig, seed: int = 0, data: DataConfig | None = None
) -> list[ObjectImage] | None:
    """Labelled-object images of the vision tower preparation, or None without one.

    ``cfg.pretrain_vision_steps == 0`` gives None; otherwise
    ``cfg.pretrain_vision_size`` images of the run's stream in
    ``cfg.pretrain_vision_styles`` (``fed_asr.data.stream_objects``).

    Raises
    ------
    ValueError
        A vision preparation without ``data``, or for a stream without labelled
        objects (the message names ``model.pretrain_vision_steps``).
    """
    from fed_asr.data import stream_objects

    if cfg.pretrain_vision_steps == 0:  # `ModelConfig` refuses it for checkpoints
        return None
    if data is None:
        raise ValueError(
            "`model.pretrain_vision_steps` > 0 needs the run's data config: pass "
            "`data=cfg.data` to `preparation_objects`."
        )
    return stream_objects(
        data, cfg.pretrain_vision_size, seed, cfg.pretrain_vision_styles
    )


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to ``MIN_LR_FRACTION``."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def preparation_optimizer(
    params: Sequence[nn.Parameter], lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay) with ``lr_factor``'s warm-up and cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps)
    )
    return optimizer, scheduler


def preparation_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    params: Sequence[nn.Parameter],
    step: int,
    what: str,
) -> float:
    """One clipped optimiser step on ``loss``; returns it as a float.

    Raises
    ------
    ValueError
        A non-finite loss (``what`` names the preparation in the message).
    """
    if not torch.isfinite(loss):
        raise ValueError(f"Non-finite {what} loss at step {step}.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def recent_mean(values: Sequence[float]) -> float:
    """Mean of the last ``LOG_EVERY`` values (NaN when there are none)."""
    tail = values[-LOG_EVERY:]
    return sum(tail) / len(tail) if tail else math.nan


def index_stream(n: int, generator: torch.Generator):  # noqa: ANN202 - generator
    """Endless sample indices: one fresh permutation per epoch."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


@torch.no_grad()
def scale_qk_init(
    model: nn.Module, factor: float, *, trainable_only: bool = False
) -> None:
    """Multiply every ``q_proj``/``k_proj`` weight of ``model`` by ``factor``.

    The default init (std 0.02) leaves the attention of a small model nearly uniform
    over the image tokens, so preparation first sits on a plateau where the answers
    ignore the image; larger query/key weights shorten it. ``factor == 1`` is a no-op.
    ``trainable_only`` leaves frozen weights (a prepared vision tower) alone.
    """
    if factor == 1.0:
        return
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            param.mul_(factor)


def pretrain_base_model(
    model: nn.Module,
    processor: Any,
    samples: Sequence[VQASample],
    cfg: ModelConfig,
    seed: int = 0,
    progress: bool = True,
    train_vision: bool = True,
) -> PretrainResult:
    """Train the weights of ``model`` on preparation samples (in place).

    Parameters
    ----------
    model : nn.Module
        The tiny LLaVA from ``build_tiny`` (on any device).
    processor : Any
        Its processor.
    samples : Sequence[VQASample]
        Preparation samples (``preparation_samples``), e.g.
        ``VQASample(image, question="caption", answer="red circle")``; the LM loss
        covers every token of each answer.
    cfg : ModelConfig
        ``pretrain_steps``, ``pretrain_batch_size``, ``pretrain_lr``,
        ``pretrain_qk_init`` and ``prompt_template`` are used.
    seed : int
        Seeds the batch order (weights are initialised by the caller).
    progress : bool
        Print a line with the loss and ETA every ``LOG_EVERY`` steps (stderr).
    train_vision : bool
        Train the vision tower too; False keeps it as it is (after
        ``fed_asr.models.vision_pretrain``; its query/key init is left alone too).

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
    if not train_vision:
        from fed_asr.models.vision_pretrain import vision_tower

        vision_tower(model).requires_grad_(False)
    scale_qk_init(model, cfg.pretrain_qk_init, trainable_only=not train_vision)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = preparation_optimizer(trainable, cfg.pretrain_lr, steps)
    indices = index_stream(len(samples), torch.Generator().manual_seed(seed))
    meter = Progress("pretrain tiny", steps, enabled=progress)
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(1, steps + 1):
        chunk = [samples[next(indices)] for _ in range(cfg.pretrain_batch_size)]
        batch = move_batch(collator(chunk), device)
        loss = model(**{k: batch[k] for k in MODEL_INPUT_KEYS}).loss
        losses.append(
            preparation_step(
                loss, optimizer, scheduler, trainable, step, "caption pre-training"
            )
        )
        if step % LOG_EVERY == 0 or step == steps:
            meter.update(step, f"loss={recent_mean(losses):.4f}")
    model.eval()
    model.requires_grad_(False)
    return PretrainResult(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else math.nan,
        final_loss=recent_mean(losses),
    )
