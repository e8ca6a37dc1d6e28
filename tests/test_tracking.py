"""Experiment tracking (fed_asr.tracking): event files of real runs, read back.

A tiny central run and a tiny federated run (real ClientApps over the in-process
``LoopbackGrid``) write TensorBoard event files; TensorBoard's own
``EventAccumulator`` reads them back and the scalars must match ``metrics.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flower_helpers import loopback_grid, set_task_identity
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fed_asr import protocol as P
from fed_asr.central import run_central
from fed_asr.config import compose_config
from fed_asr.tracking import (
    TrackingConfig,
    open_tracker,
    round_scalars,
    tracking_run_dir,
)
from server.ledger import RoundLog
from server.run import FederatedRun
from server.run_tracking import RunTracking

STAGES = ["shape", "color"]  # conftest's small_run_overrides: data.stage_order


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``log_dir``: tag -> (step, value)."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def series(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """(steps, values) of a scalar series."""
    return [step for step, _ in points], [value for _, value in points]


def test_central_run_writes_tensorboard_scalars_after_each_stage(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    overrides = run_overrides(
        "central",
        engine="central",
        method="asr",
        **{"train.max_steps_per_stage": 2, "data.max_train_per_stage": 16},
    )
    cfg = compose_config("config", overrides)

    # Execute
    metrics = json.loads(run_central(cfg).read_text())
    scalars = read_scalars(Path(cfg.output_dir) / "tracking")

    # Assert: one point per stage, equal to the accuracy matrix
    matrix = metrics["accuracy_matrix"]
    steps, values = series(scalars["accuracy/shape"])
    assert steps == [1, 2] and values == pytest.approx([matrix[0][0], matrix[1][0]])
    assert series(scalars["accuracy/color"]) == ([2], [pytest.approx(matrix[1][1])])
    assert series(scalars["loss/task"])[0] == [1, 2]
    assert {"loss/spec", "accuracy/mean_seen", "drift/shape"} <= set(scalars)
    skill_tags = [t for t in scalars if t.startswith("accuracy_skill/shape/")]
    assert skill_tags and all(len(scalars[t]) == 2 for t in skill_tags)


def test_federated_run_writes_tensorboard_scalars_after_each_round(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    overrides = run_overrides(
        "federated",
        method="vanilla",
        **{"train.max_steps_per_stage": 2, "data.max_train_per_stage": 16},
    )
    cfg = compose_config("config", overrides)

    # Execute
    path = FederatedRun(cfg, loopback_grid(overrides)).run()
    metrics = json.loads(Path(path).read_text())
    scalars = read_scalars(Path(cfg.output_dir) / "tracking")

    # Assert: one point per global round, equal to the round log of metrics.json
    first, second = metrics["rounds"]
    steps, losses = series(scalars["loss/task"])
    assert steps == [1, 2]
    assert losses == pytest.approx([first["losses"]["task"], second["losses"]["task"]])
    accuracy = [first["accuracy"]["0"], second["accuracy"]["0"]]
    assert series(scalars["accuracy/shape"])[1] == pytest.approx(accuracy)
    color = second["accuracy"]["1"]
    assert series(scalars["accuracy/color"]) == ([2], [pytest.approx(color)])
    up = sum(v for k, v in first.items() if k.startswith("bytes_up_"))
    assert up > 0 and scalars["bytes/up"][0] == (1, pytest.approx(up))
    assert scalars["bytes/down"][0][1] > 0 and scalars["clients/answered"][0] == (1, 2)
    assert any(t.startswith("accuracy_skill/color/") for t in scalars)
    # the pooled drift round (train.diagnostics, on by default) after each stage
    assert {row["stage"] for row in metrics["drift"]} == {0, 1}
    assert series(scalars["drift/shape"])[0] == [1, 2]
    assert series(scalars["map_shift/shape"])[0] == [1, 2]


def test_run_tracking_with_dp_logs_epsilon_spent(tmp_path: Path) -> None:
    # Prepare: a DP config and a real round log; no training needed for the budget
    cfg = compose_config(
        "config", [f"output_dir={tmp_path}", "privacy.dp=true", "data.stream=domain"]
    )
    tracking = RunTracking(cfg, ["a", "b"], num_skills=3)
    entry = RoundLog(round=1, stage=0, bytes_up_adapter=10, bytes_down_adapter=20)

    # Execute
    tracking.round_done(entry, releases=[], adapter_releases=1)
    entry.bytes_up_spectrum = 5  # the stage-end round adds its statistics
    tracking.stage_end_done(entry, releases=[0], adapter_releases=1)
    tracking.close()
    scalars = read_scalars(tmp_path / "tracking")

    # Assert: the stage-end release raises the budget; its bytes are logged apart
    (_, before), (_, after) = scalars["privacy/epsilon_spent"]
    assert 0 <= before < after
    assert scalars["bytes/up"] == [(1, 10.0)]
    assert scalars["bytes/stage_end_up"] == [(1, 5.0)]


def test_round_scalars_per_skill_accuracy_from_pooled_counts() -> None:
    # Prepare: stage 1 scored 4 "color" questions, 3 right
    log = {
        "round": 3,
        "stage": 1,
        "losses": {"task": 0.5, "spec": 0.1},
        "accuracy": {"0": 0.5, "1": 0.75},
        "counts": {
            P.total_key(1): 4,
            P.total_key(1, "color"): 4,
            P.correct_key(1, "all", "color"): 3,
        },
        "bytes_up_adapter": 100,
        "bytes_up_extra": 1,
        "bytes_down_adapter": 50,
        "dropped": [{"node": 1}],
    }

    # Execute
    scalars = round_scalars(log, STAGES)

    # Assert
    assert scalars["accuracy_skill/color/color"] == 0.75
    assert scalars["accuracy/mean_seen"] == 0.625
    assert (scalars["loss/spec"], scalars["stage"]) == (0.1, 2)
    assert (scalars["bytes/up"], scalars["bytes/down"]) == (101, 50)
    assert scalars["clients/dropped"] == 1


def test_open_tracker_none_writes_nothing(tmp_path: Path) -> None:
    # Prepare
    cfg = compose_config("config", [f"output_dir={tmp_path / 'run'}", "tracking=none"])

    # Execute
    tracker = open_tracker(cfg)
    tracker.log_scalars({"loss/task": 1.0}, step=1)
    tracker.close()

    # Assert
    assert not (tmp_path / "run").exists()


def test_tracking_dir_gives_one_subfolder_per_run(tmp_path: Path) -> None:
    # Prepare
    cfg = TrackingConfig(dir=str(tmp_path / "study"), run_name="cell-a")

    # Execute
    folder = tracking_run_dir(cfg, tmp_path / "runs" / "cell-a")

    # Assert
    assert folder == tmp_path / "study" / "cell-a"


def test_tracking_tensorboard_skips_non_finite_scalars(tmp_path: Path) -> None:
    # Prepare
    cfg = compose_config("config", [f"output_dir={tmp_path}"])
    tracker = open_tracker(cfg)

    # Execute
    tracker.log_scalars({"a": float("nan"), "b": torch.tensor(2.0).item()}, step=4)
    tracker.close()

    # Assert
    assert read_scalars(tmp_path / "tracking") == {"b": [(4, 2.0)]}


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is not None, reason="wandb is installed"
)
def test_tracking_wandb_without_package_says_how_to_install(tmp_path: Path) -> None:
    # Prepare
    cfg = compose_config("config", [f"output_dir={tmp_path}", "tracking=wandb"])

    # Execute / Assert
    with pytest.raises(ValueError, match=r'pip install -e "\.\[wandb\]"'):
        open_tracker(cfg)


def test_tracking_unknown_backend_names_the_field() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`tracking.backend` must be one of"):
        TrackingConfig(backend="neptune")
