"""The training step that ``bench_step`` times: variants, set-up and one step.

``build_setup`` makes an untrained tiny LLaVA with LoRA, one real easy-VQA batch mixed
over the stream's stages and prototypes of that batch (so the spectral term is
active); ``make_method`` configures the method of a ``StepVariant`` on it and
``run_step`` runs one ``train_stage`` step of one batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.config import (
    DataConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RegularizerConfig,
    TrainConfig,
)
from fed_asr.data import VQASample, build_stream
from fed_asr.methods import ContinualMethod, build_method
from fed_asr.models import (
    VQACollator,
    adapter_state,
    attach_lora,
    build_tiny,
    install_attention_capture,
    move_batch,
)
from fed_asr.spectrum import SkillSpectrum
from fed_asr.train import spectrum_statistics, train_stage

PATCH_SIZE = 4


@dataclass(frozen=True)
class StepVariant:
    """One training-step configuration.

    Attributes
    ----------
    name : str
        Row label.
    method : str
        ``vanilla`` or ``asr``.
    capture : str
        ``selective`` or ``eager`` attention capture.
    spectral : bool
        Use the spectral term (``beta`` from the config; 0 otherwise).
    geometry : bool
        Use the geometry term (``gamma`` from the config; 0 otherwise).
    geo_cache : bool
        Cache the reference rows of the geometry term per sample (the default). The
        benchmark repeats one batch, so with the cache every timed step is a warm one
        (a sample seen before: epochs after the first); without it every step pays
        the reference forward pass (a sample's first visit).
    """

    name: str
    method: str
    capture: str
    spectral: bool
    geometry: bool
    geo_cache: bool = True


VARIANTS: tuple[StepVariant, ...] = (
    StepVariant("vanilla", "vanilla", "selective", False, False),
    StepVariant("asr_spec_selective", "asr", "selective", True, False),
    StepVariant("asr_full_selective", "asr", "selective", True, True),
    StepVariant("asr_full_selective_nocache", "asr", "selective", True, True, False),
    StepVariant("asr_spec_eager", "asr", "eager", True, False),
    StepVariant("asr_full_eager", "asr", "eager", True, True),
)


def get_variant(name: str) -> StepVariant:
    """Look up a variant by name.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(
        f"Unknown variant {name!r}. Available: {[v.name for v in VARIANTS]}."
    )


@dataclass
class StepSetup:
    """Model, batch and spectrum shared by every variant of one grid."""

    model: Any
    collator: VQACollator
    samples: list[VQASample]
    batch: dict[str, Any]
    spectrum: SkillSpectrum
    skills: list[str]
    model_cfg: ModelConfig
    reg_cfg: RegularizerConfig
    train_cfg: TrainConfig
    initial_adapter: dict[str, Tensor]
    grid: tuple[int, int]
    device: torch.device


def _mixed_samples(samples_per_stage: list[list[VQASample]], n: int) -> list[VQASample]:
    """Round-robin over the stages, so every skill of the stream is in the batch."""
    mixed: list[VQASample] = []
    for group in zip(*samples_per_stage, strict=False):
        mixed.extend(group)
    if len(mixed) < n:
        raise ValueError(f"Only {len(mixed)} samples for a batch of {n}.")
    return mixed[:n]


def build_setup(
    image_size: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    patch_size: int = PATCH_SIZE,
) -> StepSetup:
    """Untrained tiny LLaVA + LoRA, one real easy-VQA batch and prototypes.

    Parameters
    ----------
    image_size : int
        Image side; the grid is ``image_size // patch_size`` squared.
    batch_size : int
        Samples in the batch (mixed over the stream's stages).
    seed : int
        Seeds the weights, the LoRA initialisation and the data subset.
    device : str
        ``cpu`` or ``cuda``.
    patch_size : int
        Vision patch size.

    Returns
    -------
    StepSetup
        Ready for ``run_step``; the spectrum holds prototypes of the untrained model's
        descriptors on the same batch, so the spectral term is active.
    """
    model_cfg = ModelConfig(image_size=image_size, patch_size=patch_size, device=device)
    data_cfg = DataConfig(max_train_per_stage=max(batch_size, 16), max_test_per_stage=4)
    stream = build_stream(data_cfg, seed)
    samples = _mixed_samples([s.train for s in stream.stages], batch_size)
    target = torch.device(device)
    base, processor = build_tiny(model_cfg, stream.vocabulary(), seed=seed)
    # What load_base_model does after loading: frozen base, capturing SDPA attention.
    base.requires_grad_(False)
    install_attention_capture(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_lora(base.to(target), LoraConfig())
    collator = VQACollator(processor, model_cfg.prompt_template, stream.answers)
    batch = move_batch(collator(samples), target)
    reg_cfg = RegularizerConfig()
    stats = spectrum_statistics(
        model, collator, samples, stream.skills, reg_cfg, batch_size, "selective"
    )
    grid = (image_size // patch_size, image_size // patch_size)
    return StepSetup(
        model=model,
        collator=collator,
        samples=samples,
        batch=batch,
        spectrum=stats.to_prototypes(reg_cfg.cov_floor),
        skills=list(stream.skills),
        model_cfg=model_cfg,
        reg_cfg=reg_cfg,
        # One stage of one step over the whole batch.
        train_cfg=TrainConfig(batch_size=batch_size, epochs=1, max_steps_per_stage=1),
        initial_adapter=adapter_state(model),
        grid=grid,
        device=target,
    )


def make_method(setup: StepSetup, variant: StepVariant) -> ContinualMethod:
    """The configured method of ``variant`` (prototypes from ``setup.spectrum``)."""
    reg_cfg = dataclasses.replace(
        setup.reg_cfg,
        beta=setup.reg_cfg.beta if variant.spectral else 0.0,
        gamma=setup.reg_cfg.gamma if variant.geometry else 0.0,
        geo_cache_entries=setup.reg_cfg.geo_cache_entries if variant.geo_cache else 0,
    )
    method = build_method(MethodConfig(name=variant.method), reg_cfg)
    method.configure_stage(setup.spectrum)
    return method


def run_step(
    setup: StepSetup, method: ContinualMethod, capture: str
) -> dict[str, float]:
    """One training step: ``train_stage`` on a one-step stage; returns its losses."""
    result = train_stage(
        setup.model,
        setup.collator,
        setup.samples,
        setup.skills,
        method,
        setup.train_cfg,
        setup.reg_cfg,
        capture_mode=capture,
    )
    return result.losses


__all__ = [
    "PATCH_SIZE",
    "VARIANTS",
    "StepSetup",
    "StepVariant",
    "build_setup",
    "get_variant",
    "make_method",
    "run_step",
]
