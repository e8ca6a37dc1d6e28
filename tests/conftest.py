"""Shared test fixtures: determinism and a small thread budget."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tiny-model cache for the whole session (the base model is built once)."""
    return str(tmp_path_factory.mktemp("fed_asr_cache"))


@pytest.fixture
def run_overrides(model_cache: str, tmp_path):  # type: ignore[no-untyped-def]
    """Factory of small-run overrides writing under this test's tmp_path."""

    def make(name: str = "run", **extra: object) -> list[str]:
        return small_run_overrides(model_cache, str(tmp_path / name), **extra)

    return make
