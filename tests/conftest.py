"""Shared test fixtures: determinism and a small thread budget."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from helpers import small_run_overrides  # noqa: F401  (re-exported for tests)


def _thread_budget() -> int:
    """Two torch threads, or the cores' share of one pytest-xdist worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


torch.set_num_threads(_thread_budget())


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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
