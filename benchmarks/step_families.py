"""Training step time per model family: ASR over plain LoRA on each tiny checkpoint.

``python -m benchmarks.bench_step --family all`` (or one family name) runs this: for
every tiny checkpoint kind of the family (``fed_asr.models.tiny_families``; LLaVA is
the built-in tiny model at the same sizes), untrained, loaded the way a run loads it
(``load_base_model``: bound family, capturing attention), with LoRA on the language
model's ``q_proj``/``v_proj`` and one batch of real easy-VQA samples (64x64 images,
laid out by each family's processor: tiles, crops, resolution-dependent grids).
Every tiny model has a 2-layer decoder of width 32, so the ASR capture reads both
layers (``l_sel=2``). Variants and timing are ``bench_step``'s (interleaved, warm-up,
median); the table reports each variant's median step over the plain-LoRA step, and
the fastest step over the fastest plain-LoRA step (less sensitive to other processes
on a shared machine).
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_step import StepSetup, get_variant, time_variants
from benchmarks.common import machine_info, set_threads
from fed_asr.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    RegularizerConfig,
    TrainConfig,
)
from fed_asr.data import VQASample, build_stream
from fed_asr.models import (
    VQACollator,
    adapter_state,
    attach_lora,
    build_tiny,
    forward_with_attention,
    install_attention_capture,
    load_base_model,
    model_family,
    move_batch,
)
from fed_asr.models.tiny_families import TINY_TEMPLATES, save_tiny_checkpoint
from fed_asr.train import spectrum_statistics

# Tiny checkpoint kinds of every family (``--family`` picks one, or ``all``).
FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "llava": ("llava",),
    "paligemma": ("paligemma", "paligemma2"),
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
    "idefics3": ("idefics3",),
    "llava_onevision": ("llava_onevision",),
}
FAMILY_VARIANTS = (
    "vanilla",
    "asr_spec_selective",
    "asr_full_selective",
    "asr_spec_eager",
)
# The built-in tiny LLaVA at the sizes of the other tiny checkpoints (4x4 grid).
LLAVA_FIELDS: dict[str, int] = {
    "image_size": 16,
    "patch_size": 4,
    "vision_hidden_size": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden_size": 32,
    "text_layers": 2,
    "text_heads": 4,
    "text_intermediate_size": 64,
}
L_SEL = 2  # every tiny decoder has 2 layers
COLUMNS = (
    "family",
    "kind",
    "grid",
    "seq_len",
    "variant",
    "median_s",
    "ratio_vs_vanilla",
    "min_s",
    "min_ratio_vs_vanilla",
)


def family_kinds(family: str) -> list[str]:
    """Tiny checkpoint kinds of ``family`` (every family's for ``"all"``).

    Raises
    ------
    ValueError
        Unknown family; the message lists the choices.
    """
    if family == "all":
        return [k for kinds in FAMILY_KINDS.values() for k in kinds]
    if family not in FAMILY_KINDS:
        raise ValueError(
            f"`--family` must be 'all' or one of {sorted(FAMILY_KINDS)}, "
            f"got {family!r}."
        )
    return list(FAMILY_KINDS[family])


def _mixed(stream_stages: Sequence[Sequence[VQASample]], n: int) -> list[VQASample]:
    """Round-robin over the stages, so every skill is in the batch."""
    mixed = [s for group in zip(*stream_stages, strict=False) for s in group]
    if len(mixed) < n:
        raise ValueError(f"Only {len(mixed)} samples for a batch of {n}.")
    return mixed[:n]


def load_tiny_kind(
    kind: str, vocabulary: Sequence[str], seed: int, device: str, root: Path
) -> tuple[Any, Any, str]:
    """Untrained tiny model of ``kind`` as a run loads it, processor and template."""
    if kind == "llava":
        cfg = ModelConfig(**LLAVA_FIELDS, device=device)  # type: ignore[arg-type]
        model, processor = build_tiny(cfg, vocabulary, seed=seed)
        model.requires_grad_(False)
        install_attention_capture(model)
        return model.to(device), processor, cfg.prompt_template
    path = save_tiny_checkpoint(kind, root / kind, vocabulary, seed=seed)
    cfg = ModelConfig(
        name="pretrained",
        path=str(path),
        prompt_template=TINY_TEMPLATES[kind],
        device=device,
    )
    model, processor = load_base_model(cfg, [], device)
    return model, processor, cfg.prompt_template


def build_family_setup(
    kind: str, batch_size: int, seed: int, device: str, root: Path
) -> StepSetup:
    """``bench_step``'s set-up (model + LoRA, one batch, prototypes) for ``kind``."""
    data_cfg = DataConfig(max_train_per_stage=max(batch_size, 16), max_test_per_stage=4)
    stream = build_stream(data_cfg, seed)
    samples = _mixed([s.train for s in stream.stages], batch_size)
    base, processor, template = load_tiny_kind(
        kind, stream.vocabulary(), seed, device, root
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_lora(base, LoraConfig())
    collator = VQACollator(
        processor, template, stream.answers, family=model_family(base)
    )
    target = torch.device(device)
    batch = move_batch(collator(samples), target)
    reg_cfg = RegularizerConfig(l_sel=L_SEL)
    stats = spectrum_statistics(
        model, collator, samples, stream.skills, reg_cfg, batch_size, "selective"
    )
    with torch.no_grad():
        grid = forward_with_attention(model, batch, L_SEL).grid
    return StepSetup(
        model=model,
        collator=collator,
        samples=samples,
        batch=batch,
        spectrum=stats.to_prototypes(reg_cfg.cov_floor),
        skills=list(stream.skills),
        model_cfg=ModelConfig(device=device),
        reg_cfg=reg_cfg,
        train_cfg=TrainConfig(batch_size=batch_size, epochs=1, max_steps_per_stage=1),
        initial_adapter=adapter_state(model),
        grid=grid,
        device=target,
    )


def family_of(kind: str) -> str:
    """Family name of a tiny checkpoint kind."""
    return next(f for f, kinds in FAMILY_KINDS.items() if kind in kinds)


def run_family_benchmark(
    family: str = "all",
    batch_size: int = 16,
    warmup: int = 2,
    repeat: int = 5,
    threads: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time ``FAMILY_VARIANTS`` on every tiny checkpoint kind of ``family``.

    Returns
    -------
    dict[str, Any]
        ``rows`` (one per kind and variant, with ``ratio_vs_vanilla``),
        ``ratios`` (per kind: ASR spectral-only and full over vanilla),
        ``settings`` and ``machine``.
    """
    set_threads(threads)
    variants = [get_variant(name) for name in FAMILY_VARIANTS]
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-step-families-") as tmp:
        for kind in family_kinds(family):
            setup = build_family_setup(kind, batch_size, seed, device, Path(tmp))
            timed = time_variants(setup, variants, warmup, repeat)
            vanilla = timed["vanilla"]["median_s"]
            vanilla_min = min(timed["vanilla"]["seconds"])
            for variant in variants:
                result = timed[variant.name]
                rows.append(
                    {
                        "family": family_of(kind),
                        "kind": kind,
                        "grid": f"{setup.grid[0]}x{setup.grid[1]}",
                        "seq_len": int(setup.batch["input_ids"].shape[1]),
                        "variant": variant.name,
                        "median_s": result["median_s"],
                        "ratio_vs_vanilla": result["median_s"] / vanilla,
                        "min_s": min(result["seconds"]),
                        "min_ratio_vs_vanilla": min(result["seconds"]) / vanilla_min,
                        "seconds": result["seconds"],
                        "losses": result["losses"],
                    }
                )
            ratios[kind] = {
                name: timed[name]["median_s"] / vanilla
                for name in ("asr_spec_selective", "asr_full_selective")
            }
            del setup, timed
            gc.collect()
    return {
        "benchmark": "bench_step_families",
        "settings": {
            "family": family,
            "batch_size": batch_size,
            "warmup": warmup,
            "repeat": repeat,
            "threads": threads,
            "device": device,
            "seed": seed,
            "model": "untrained tiny checkpoints (fed_asr.models.tiny_families), "
            "2-layer decoders of width 32",
            "lora": "r=8 q_proj/v_proj of the language model",
            "regularizer": dataclasses.asdict(RegularizerConfig(l_sel=L_SEL)),
        },
        "rows": rows,
        "ratios": ratios,
        "machine": machine_info(),
    }
