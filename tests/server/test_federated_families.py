"""Federated FedASR runs on tiny Qwen2-VL and Idefics3 checkpoints (real ClientApps).

Two clients, two stages (shape -> color), one round per stage: the stage-end
spectrum of stage 1 reaches the clients, so stage 2's training carries a non-zero
spectral loss. The in-process grid runs by default; the same run on Flower's
simulation engine (``fed-asr engine=simulation``) is marked ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flower_helpers import loopback_grid, set_task_identity

from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.models.tiny_families import TINY_TEMPLATES, save_tiny_checkpoint
from server.run import FederatedRun
from server.simulation import run_simulation_engine

KINDS = ("qwen2_vl", "idefics3")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def _overrides(tmp_path: Path, kind: str) -> list[str]:
    """A two-client, two-stage run on a tiny checkpoint of ``kind`` (built here)."""
    overrides = [
        "model=pretrained",
        f"model.path={tmp_path / 'checkpoint'}",
        f"model.prompt_template='{TINY_TEMPLATES[kind]}'",
        "model.device=cpu",
        "data.max_train_per_stage=8",
        "data.max_test_per_stage=2",
        "data.stage_order=[shape,color]",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "train.max_steps_per_stage=1",
        "federation.num_clients=2",
        "federation.rounds_per_stage=1",
        "federation.schedule=fixed",
        "regularizer.l_sel=2",
        "progress=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = compose_config("config", overrides)
    vocabulary = build_stream(cfg.data, cfg.seed).vocabulary()
    save_tiny_checkpoint(kind, tmp_path / "checkpoint", vocabulary)
    return overrides


def _check_two_stages_with_spectral_loss(metrics: dict[str, Any]) -> None:
    """Both stages scored, both clients answered, stage 2 regularized spectrally."""
    first, second = metrics["rounds"]
    assert metrics["stages"] == ["shape", "color"]
    assert (first["stage"], second["stage"]) == (0, 1)
    assert first["clients_answered"] == second["clients_answered"] == 2
    assert first["losses"].get("spec", 0.0) == 0.0  # no prototypes before stage 2
    assert second["bytes_down_spectrum"] > 0
    assert second["losses"]["spec"] > 0.0
    matrix = metrics["accuracy_matrix"]
    assert matrix[0][0] is not None and None not in matrix[1]


@pytest.mark.parametrize("kind", KINDS)
def test_federated_family_run_has_spectral_loss_from_stage_two(
    tmp_path: Path, kind: str
) -> None:
    # Prepare
    overrides = _overrides(tmp_path, kind)
    cfg = compose_config("config", overrides)

    # Execute
    path = FederatedRun(cfg, loopback_grid(overrides)).run()

    # Assert
    _check_two_stages_with_spectral_loss(json.loads(Path(path).read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_simulation_engine_family_run_has_spectral_loss_from_stage_two(
    tmp_path: Path, kind: str
) -> None:
    # Prepare
    overrides = _overrides(tmp_path, kind)
    cfg = compose_config("config", overrides)

    # Execute: Flower's simulation engine, as `fed-asr engine=simulation` runs it
    path = run_simulation_engine(cfg, overrides)

    # Assert
    _check_two_stages_with_spectral_loss(json.loads(Path(path).read_text()))
