"""Vision tower preparation of the tiny LLaVA: learn to tell labelled objects apart.

A real MLLM's vision encoder arrives pre-trained; the tiny model's is built from
scratch, and preparing the whole model on captions and questions does not teach it to
encode an object's shape (``studies/scenes/vision_probe.py``: its image tokens carry no
more shape than random weights). This stage trains the tower alone, before that
preparation: for every labelled object of an image (``fed_asr.data.ObjectImage``) the
tower's last hidden states (the features LLaVA hands to its projector, CLS dropped) are
averaged over the patches the object's box covers, and one linear head per attribute
(colour, shape) classifies the average (cross-entropy). The heads are thrown away; the
tower keeps what it learned and stays frozen while the rest of the model is prepared
(``pretrain_base_model(..., train_vision=False)``), as LLaVA keeps its CLIP frozen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fed_asr.config import ModelConfig
from fed_asr.data.images import load_image
from fed_asr.data.objects import ObjectImage, attribute_values
from fed_asr.data.regions import region_mask
from fed_asr.models.device import model_device
from fed_asr.models.pretrain import (
    LOG_EVERY,
    index_stream,
    preparation_optimizer,
    preparation_step,
    recent_mean,
)

# A patch belongs to an object when the box covers more than this share of it.
MIN_PATCH_OVERLAP = 0.25


@dataclass
class VisionPretrainResult:
    """Summary of one vision tower preparation."""

    steps: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last ``LOG_EVERY`` steps
    # attribute -> training accuracy over the last ``LOG_EVERY`` steps
    final_accuracy: dict[str, float] = field(default_factory=dict)


def vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP vision tower of a (tiny) ``LlavaForConditionalGeneration``."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise ValueError(
            f"{type(model).__name__} has no `vision_tower`; the vision preparation "
            "applies to the built-in tiny LLaVA only."
        )
    return tower


def object_patch_features(hidden: Tensor, masks: Tensor, owner: Tensor) -> Tensor:
    """Average each object's patch features.

    Parameters
    ----------
    hidden : Tensor
        ``(B, P, D)`` patch features of the batch's images (CLS dropped).
    masks : Tensor
        ``(K, P)`` bool: the patches of each of the batch's K objects.
    owner : Tensor
        ``(K,)`` long: the image (row of ``hidden``) of each object.

    Returns
    -------
    Tensor
        ``(K, D)`` mean feature over each object's patches.
    """
    weights = masks.to(hidden.dtype)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)  # (K, P)
    return torch.einsum("kp,kpd->kd", weights, hidden[owner])


def _batch(
    items: Sequence[ObjectImage],
    processor: Any,
    grid: int,
    values: dict[str, list[str]],
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Pixels, object masks, owners and per-attribute targets (-100: not labelled)."""
    images = [load_image(item.image) for item in items]
    pixels = processor.image_processor(images=images, return_tensors="pt")[
        "pixel_values"
    ]  # (B, 3, H, W)
    masks, owners = [], []
    targets: dict[str, list[int]] = {name: [] for name in values}
    for row, item in enumerate(items):
        for obj in item.objects:
            masks.append(region_mask(obj.region, grid, min_overlap=MIN_PATCH_OVERLAP))
            owners.append(row)
            labels = dict(obj.attributes)
            for name, known in values.items():
                value = labels.get(name)
                targets[name].append(-100 if value is None else known.index(value))
    return (
        pixels,
        torch.stack(masks).flatten(1),  # (K, P)
        torch.tensor(owners),  # (K,)
        {name: torch.tensor(t) for name, t in targets.items()},  # (K,) each
    )


def pretrain_vision_tower(
    model: nn.Module,
    processor: Any,
    items: Sequence[ObjectImage],
    cfg: ModelConfig,
    seed: int = 0,
    progress: bool = True,
) -> VisionPretrainResult:
    """Train the vision tower of ``model`` to classify its objects' attributes.

    Parameters
    ----------
    model : nn.Module
        The tiny LLaVA from ``build_tiny`` (only its vision tower changes).
    processor : Any
        Its processor (the image processor encodes the images).
    items : Sequence[ObjectImage]
        Images with labelled objects (``fed_asr.data.stream_objects``).
    cfg : ModelConfig
        ``pretrain_vision_steps``, ``pretrain_vision_lr``, ``pretrain_batch_size``
        (images per step), ``image_size`` and ``patch_size`` are used.
    seed : int
        Seeds the heads' initialisation and the batch order.
    progress : bool
        Print a line with loss, accuracies and ETA every ``LOG_EVERY`` steps.

    Returns
    -------
    VisionPretrainResult
        Steps, time, losses and the final training accuracy per attribute. The tower
        is left in eval mode with ``requires_grad=False``.

    Raises
    ------
    ValueError
        No images or no labelled object, or a non-finite loss.
    """
    from fed_asr.progress import Progress

    if len(items) == 0:
        raise ValueError("`items` for the vision preparation must not be empty.")
    values = attribute_values(items)
    tower = vision_tower(model)
    device = model_device(model)
    grid = cfg.image_size // cfg.patch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = cfg.vision_hidden_size
        heads = nn.ModuleDict(
            {name: nn.Linear(width, len(v)) for name, v in values.items()}
        ).to(device)
    tower.requires_grad_(True)
    tower.train()
    params = [*tower.parameters(), *heads.parameters()]
    steps = cfg.pretrain_vision_steps
    optimizer, scheduler = preparation_optimizer(params, cfg.pretrain_vision_lr, steps)
    dtype = next(tower.parameters()).dtype
    indices = index_stream(len(items), torch.Generator().manual_seed(seed))
    meter = Progress("prepare vision tower", steps, enabled=progress)
    start = time.perf_counter()
    losses: list[float] = []
    hits: dict[str, list[float]] = {name: [] for name in values}
    for step in range(1, steps + 1):
        chunk = [items[next(indices)] for _ in range(cfg.pretrain_batch_size)]
        pixels, masks, owners, targets = _batch(chunk, processor, grid, values)
        hidden = tower(pixels.to(device, dtype)).last_hidden_state[:, 1:]  # (B, P, D)
        pooled = object_patch_features(hidden, masks.to(device), owners.to(device))
        loss = pooled.new_zeros(())
        for name, head in heads.items():
            logits = head(pooled.float())  # (K, V)
            target = targets[name].to(device)
            loss = loss + F.cross_entropy(logits, target, ignore_index=-100)
            labelled = target != -100
            hits[name].append(
                (logits.argmax(1)[labelled] == target[labelled]).float().mean().item()
            )
        losses.append(
            preparation_step(
                loss, optimizer, scheduler, params, step, "vision preparation"
            )
        )
        if step % LOG_EVERY == 0 or step == steps:
            accuracy = " ".join(f"{n}={recent_mean(h):.3f}" for n, h in hits.items())
            meter.update(step, f"loss={recent_mean(losses):.4f} {accuracy}")
    tower.eval()
    tower.requires_grad_(False)
    return VisionPretrainResult(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else math.nan,
        final_loss=recent_mean(losses),
        final_accuracy={name: recent_mean(h) for name, h in hits.items()},
    )
