"""Fixtures of the model tests: a very small tiny-LLaVA config, images and samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_MODEL_FIELDS
from PIL import Image, ImageDraw

from fed_asr.config import LoraConfig, ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import VQACollator, attach_lora
from fed_asr.models.tiny import build_tiny

VOCAB = [
    "what", "color", "is", "the", "shape", "there", "a", "not", "in", "image",
    "red", "blue", "green", "circle", "rectangle", "triangle", "yes", "no",
]  # fmt: skip
ANSWERS = ["blue", "circle", "green", "no", "rectangle", "red", "triangle", "yes"]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def small_config(tmp_path: Path, **overrides: object) -> ModelConfig:
    """Tiny LLaVA small enough for unit tests (4x4 grid, 2 text layers)."""
    fields: dict[str, object] = dict(
        TINY_MODEL_FIELDS,
        pretrain_steps=3,
        pretrain_batch_size=4,
        pretrain_lr=3e-3,
        cache_dir=str(tmp_path / "cache"),
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def _draw(path: Path, color: str, shape: str) -> str:
    """Save a 32x32 image of one coloured shape on white."""
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((6, 6, 26, 26), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((4, 10, 28, 22), fill=fill)
    else:
        draw.polygon([(16, 4), (28, 28), (4, 28)], fill=fill)
    image.save(path)
    return str(path)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``"red circle"`` -> PNG path, for every colour x shape."""
    root = tmp_path_factory.mktemp("images")
    return {
        f"{c} {s}": _draw(root / f"{c}-{s}.png", c, s)
        for c in COLORS
        for s in ("circle", "rectangle", "triangle")
    }


@pytest.fixture
def vocab() -> list[str]:
    """Words of the test stream."""
    return list(VOCAB)


@pytest.fixture
def answers() -> list[str]:
    """Candidate answers of the test stream."""
    return list(ANSWERS)


@pytest.fixture
def cfg(tmp_path: Path) -> ModelConfig:
    """The small test config with its cache under ``tmp_path``."""
    return small_config(tmp_path)


@pytest.fixture
def vqa_samples(image_files: dict[str, str]) -> list[VQASample]:
    """Four questions of different lengths (one answer outside ``ANSWERS``)."""
    return [
        VQASample(image_files["red circle"], "What color is the shape?", "red"),
        VQASample(image_files["blue triangle"], "Is there a circle?", "no"),
        VQASample(image_files["green rectangle"], "What shape?", "rectangle"),
        VQASample(image_files["red triangle"], "What is the color?", "green circle"),
    ]


@pytest.fixture
def caption_set(image_files: dict[str, str]) -> list[VQASample]:
    """Caption samples ("caption" -> "red circle") of every test image."""
    return [
        VQASample(path, "caption", caption) for caption, path in image_files.items()
    ]


@pytest.fixture
def perturbed_lora(
    cfg: ModelConfig, vocab: list[str], answers: list[str], vqa_samples: list[VQASample]
) -> tuple[Any, dict[str, Any], list[tuple[str, str]]]:
    """Tiny model with LoRA B non-zero (so current and reference differ), the collated
    ``vqa_samples`` and their ``(image, question)`` keys."""
    model, processor = build_tiny(cfg, vocab)
    model = attach_lora(model, LoraConfig())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    batch = VQACollator(processor, cfg.prompt_template, answers)(vqa_samples)
    keys = [(s.image, s.question) for s in vqa_samples]
    return model, batch, keys
