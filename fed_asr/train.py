"""Local work of one site on one stage: training and spectrum statistics.

Shared by the central engine and the Flower ClientApp (evaluation lives in
``fed_asr.evaluation``); they take the model (a peft model on the base MLLM), the
processor and narrow configs.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from fed_asr.config import RegularizerConfig, TrainConfig
from fed_asr.data import VQASample, skill_probabilities
from fed_asr.descriptor_layout import model_descriptor_size
from fed_asr.diagnostics import grad_norm_ratios
from fed_asr.methods import ContinualMethod, StepContext, preserve_requires_grad
from fed_asr.models import (
    VQACollator,
    forward_with_attention,
    model_device,
    model_inputs,
    move_batch,
)
from fed_asr.progress import Progress
from fed_asr.regularizer import describe_capture
from fed_asr.security.dp import clip_angular, clip_descriptors
from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum import SkillStats


@dataclass
class StageTrainResult:
    """What local training of one stage did."""

    num_examples: int
    steps: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)
    # Mean gradient-norm ratio of each penalty to the task loss (diagnostics)
    grad_ratios: dict[str, float] = field(default_factory=dict)


def _batches(
    n: int, batch_size: int, generator: torch.Generator | None
) -> list[list[int]]:
    order = torch.randperm(n, generator=generator) if generator else torch.arange(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def train_stage(
    model: torch.nn.Module,
    collator: VQACollator,
    samples: Sequence[VQASample],
    skills: Sequence[str],
    method: ContinualMethod,
    train_cfg: TrainConfig,
    reg_cfg: RegularizerConfig,
    capture_mode: str = "selective",
    epochs: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> StageTrainResult:
    """Train the trainable (LoRA) weights on one stage's samples.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model; only parameters with ``requires_grad`` are optimised.
    collator : VQACollator
        Turns samples into model batches.
    samples : Sequence[VQASample]
        This site's training data of the stage (may be empty).
    skills : Sequence[str]
        Skill names, in the order of the spectrum's rows.
    method : ContinualMethod
        Supplies the extra loss terms (already configured for this stage).
    train_cfg, reg_cfg : TrainConfig, RegularizerConfig
        Optimisation settings and ASR settings (``l_sel``).
    capture_mode : str
        ``selective`` (SDPA + captured rows) or ``eager``.
    epochs : int | None
        Passes over the data; ``train_cfg.epochs`` when None.
    seed : int
        Seeds the data order.
    progress : Progress | None
        Receives a line every ``train_cfg.log_every`` steps.

    Returns
    -------
    StageTrainResult
        Examples, steps, wall time and mean loss per term (``task``, ``total`` ...).
    """
    start = time.perf_counter()
    if len(samples) == 0:
        return StageTrainResult(num_examples=0, steps=0, seconds=0.0)
    with _only_what_the_method_optimizes(model, method):
        device = model_device(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        generator = torch.Generator().manual_seed(seed)
        n_epochs = train_cfg.epochs if epochs is None else epochs
        plan = [
            b
            for _ in range(n_epochs)
            for b in _batches(len(samples), train_cfg.batch_size, generator)
        ]
        if train_cfg.max_steps_per_stage is not None:
            plan = plan[: train_cfg.max_steps_per_stage]
        if progress is not None:
            progress.total = len(plan)
        sums: dict[str, float] = {}
        ratio_sums: dict[str, list[float]] = {}
        method.before_training(model)
        model.train()
        for step, indices in enumerate(plan, start=1):
            chunk = [samples[i] for i in indices]
            batch = move_batch(collator(chunk), device)
            probs = skill_probabilities(chunk, skills).to(device)
            keys = [(sample.image, sample.question) for sample in chunk]
            terms = _step_losses(
                model, batch, probs, method, reg_cfg, capture_mode, keys
            )
            total = sum(terms.values())
            assert isinstance(total, Tensor)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"Non-finite loss at step {step}: "
                    f"{ {k: float(v) for k, v in terms.items()} }"
                )
            penalties = {
                k: v for k, v in terms.items() if k != "task" and v.requires_grad
            }
            if train_cfg.diagnostics and penalties and step % train_cfg.log_every == 1:
                ratios = grad_norm_ratios(params, terms["task"], penalties)
                for name, ratio in ratios.items():
                    ratio_sums.setdefault(name, []).append(ratio)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
            optimizer.step()
            for name, value in {**terms, "total": total}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if progress is not None and (
                step % train_cfg.log_every == 0 or step == len(plan)
            ):
                shown = " ".join(f"{k}={v / step:.4f}" for k, v in sums.items())
                progress.update(step, shown)
        model.eval()
        losses = {name: value / len(plan) for name, value in sums.items()}
        return StageTrainResult(
            num_examples=len(samples),
            steps=len(plan),
            seconds=time.perf_counter() - start,
            losses=losses,
            grad_ratios={k: sum(v) / len(v) for k, v in ratio_sums.items()},
        )


@contextmanager
def _only_what_the_method_optimizes(
    model: torch.nn.Module, method: ContinualMethod
) -> Iterator[None]:
    """Freeze the trainable parameters ``method.optimizes`` declines; restore after."""
    with preserve_requires_grad(model):
        for name, param in model.named_parameters():
            if param.requires_grad and not method.optimizes(name):
                param.requires_grad_(False)
        yield


def _step_losses(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    skill_probs: Tensor,
    method: ContinualMethod,
    reg_cfg: RegularizerConfig,
    capture_mode: str,
    sample_keys: Sequence[Hashable] = (),
) -> dict[str, Tensor]:
    """Task loss plus the method's penalties for one batch.

    ``sample_keys`` identify the batch rows (image, question) for per-sample caches.
    """
    forward = partial(forward_with_attention, model, batch, reg_cfg.l_sel, capture_mode)
    outputs = None
    if method.needs_attention or method.needs_hidden:
        capture = forward(hidden=method.needs_hidden)
        task_loss = capture.loss
    else:
        capture = None
        outputs = model(**model_inputs(model, batch))
        task_loss = outputs.loss
    ctx = StepContext(
        model=model,
        batch=batch,
        capture=capture,
        skill_probs=skill_probs,
        forward=forward,
        sample_keys=sample_keys,
        outputs=outputs,
    )
    return {"task": task_loss, **method.penalties(ctx)}


@torch.no_grad()
def spectrum_statistics(
    model: torch.nn.Module,
    collator: VQACollator,
    samples: Sequence[VQASample],
    skills: Sequence[str],
    reg_cfg: RegularizerConfig,
    batch_size: int,
    capture_mode: str = "selective",
    dp_clip: float | None = None,
) -> SkillStats:
    """Per-skill sufficient statistics of the spectral descriptors of ``samples``.

    With ``dp_clip`` (differential privacy) every descriptor is scaled to L2 norm at
    most ``dp_clip`` and every angular distribution to L1 norm at most 1 first, which
    bounds one sample's effect on the statistics (``fed_asr.security.dp``).
    """
    dim = model_descriptor_size(model, reg_cfg)
    stats = SkillStats.empty(tuple(skills), dim, reg_cfg.n_angular)
    if len(samples) == 0:
        return stats
    device = model_device(model)
    model.eval()
    for indices in _batches(len(samples), batch_size, None):
        chunk = [samples[i] for i in indices]
        batch = move_batch(collator(chunk), device)
        capture = forward_with_attention(model, batch, reg_cfg.l_sel, capture_mode)
        desc = describe_capture(capture, batch, reg_cfg)
        if dp_clip is not None:
            desc = SpectralDescriptor(
                clip_descriptors(desc.descriptor, dp_clip), clip_angular(desc.angular)
            )
        probs = skill_probabilities(chunk, skills)
        stats = stats + SkillStats.from_batch(
            desc, probs, tuple(skills), reg_cfg.tau_skill
        )
    return stats
