"""Values and small spies shared by test modules (``tests/`` is on ``sys.path``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

# Tiny LLaVA small enough for unit tests: 16x16 images in a 4x4 grid, 2 text layers.
TINY_MODEL_FIELDS: dict[str, int] = {
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


def small_run_overrides(cache_dir: str, output_dir: str, **extra: object) -> list[str]:
    """Hydra overrides of a run small enough for tests (tiny slice, small model)."""
    overrides = {
        "model.image_size": 16,
        "model.vision_hidden_size": 16,
        "model.vision_layers": 1,
        "model.text_hidden_size": 32,
        "model.text_layers": 2,
        "model.text_intermediate_size": 64,
        "model.pretrain_steps": 3,
        "model.pretrain_batch_size": 4,
        "model.cache_dir": cache_dir,
        "data.max_train_per_stage": 24,
        "data.max_test_per_stage": 12,
        "data.stage_order": "[shape,color]",
        "train.batch_size": 8,
        "train.eval_batch_size": 32,
        "federation.num_clients": 2,
        "federation.rounds_per_stage": 1,
        "federation.schedule": "fixed",
        "regularizer.l_sel": 2,
        "progress": "false",
        "output_dir": output_dir,
        **extra,
    }
    return [f"{key}={value}" for key, value in overrides.items()]


def record_threads(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str
) -> list[int]:
    """Wrap ``module.name`` so each call records torch's thread count, then runs it."""
    seen: list[int] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def simulation_metrics(overrides: list[str]) -> dict[str, Any]:
    """Run a real Flower simulation with ``overrides`` and return its metrics.json."""
    import json
    from pathlib import Path

    from fed_asr.config import compose_config
    from server.simulation import run_simulation_engine

    cfg = compose_config("config", overrides)
    return json.loads(Path(run_simulation_engine(cfg, overrides)).read_text())
