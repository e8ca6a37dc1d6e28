"""The federated run over an in-process grid (real ClientApps, protobuf on the wire)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import loopback_grid, set_task_identity
from flwr.app import Message

from fed_asr import protocol as P
from fed_asr.config import compose_config
from fed_asr.wire import record_arrays
from server.records import numpy_record
from server.run import FederatedRun


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def _nan(node: int, msg: Message, reply: Message) -> Message:
    """Every train reply of global round 1 carries a NaN."""
    config = msg.content.config_records.get(P.CONFIG_RECORD)
    if msg.metadata.message_type.startswith("train") and config is not None:
        if int(config[P.GLOBAL_ROUND_KEY]) == 1 and not reply.has_error():
            arrays = record_arrays(reply.content[P.ARRAYS_RECORD])
            first = sorted(arrays)[0]
            arrays[first] = np.full_like(arrays[first], np.nan)
            reply.content[P.ARRAYS_RECORD] = numpy_record(arrays)
    return reply


def test_federated_run_round_with_every_reply_dropped_keeps_the_global_adapter(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: both replies of round 1 are invalid (NaN), round 2 is honest
    overrides = run_overrides(
        "all-dropped",
        method="vanilla",
        **{"data.max_train_per_stage": 16, "train.max_steps_per_stage": 2},
    )
    grid = loopback_grid(overrides)
    grid.on_reply = _nan
    # Execute
    path = FederatedRun(compose_config("config", overrides), grid).run()
    # Assert: nothing aggregated in round 1, yet the run went on with the adapter
    metrics = json.loads(Path(path).read_text())
    first, second = metrics["rounds"]
    assert [d["round"] for d in metrics["dropped"]] == [1, 1]
    assert all("non-finite" in d["reason"] for d in metrics["dropped"])
    assert first["losses"] == {} and second["losses"]["task"] > 0
    assert metrics["failed_replies"] == 0 and second["clients_answered"] == 2
    matrix = metrics["accuracy_matrix"]
    assert matrix[0][0] is not None and None not in matrix[1]


def test_federated_run_pools_the_clients_drift_after_every_stage(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two clients, two stages, diagnostics on (the default)
    overrides = run_overrides(
        "drift", method="vanilla", **{"train.max_steps_per_stage": 2}
    )
    grid = loopback_grid(overrides)
    # Execute
    path = FederatedRun(compose_config("config", overrides), grid).run()
    # Assert: the floor of each stage and stage 0 after stage 1, from both clients
    rows = json.loads(Path(path).read_text())["drift"]
    assert [(r["after_stage"], r["stage"]) for r in rows] == [(0, 0), (1, 0), (1, 1)]
    for row in rows:
        assert row["drift"] and all(
            v > 0 and np.isfinite(v) for v in row["drift"].values()
        )
        assert row["drift_mean"] == pytest.approx(np.mean(list(row["drift"].values())))
    # the maps: 0 on each floor (the reference); stage 0's maps moved after stage 1
    shifts = [row["map_shift"] for row in rows]
    assert shifts[0] == pytest.approx(0.0, abs=1e-6)
    assert shifts[2] == pytest.approx(0.0, abs=1e-6)
    assert shifts[1] > 0 and np.isfinite(shifts[1])


@pytest.mark.parametrize("features", ["spectrum", "coherence"])
def test_federated_asr_with_per_head_descriptors_keeps_every_clients_statistics(
    run_overrides, features: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: ASR whose per-skill statistics are per layer-head (D = J x F)
    overrides = run_overrides(
        f"heads-{features}",
        method="asr",
        **{
            "train.max_steps_per_stage": 2,
            "regularizer.heads": "each",
            "regularizer.features": features,
        },
    )
    cfg = compose_config("config", overrides)
    grid = loopback_grid(overrides)
    # Execute
    run = FederatedRun(cfg, grid)
    path = run.run()
    # Assert: the server's range check knows the layout and refuses nothing
    metrics = json.loads(Path(path).read_text())
    assert metrics["dropped"] == []
    assert run.guard.bounds is not None
    j = cfg.regularizer.l_sel * run.model.config.text_config.num_attention_heads
    per_head = {"spectrum": 8 + 2 * 8 + 3, "coherence": 8}[features]
    assert run.guard.bounds.dim == j * per_head
    assert len(metrics["drift"]) == 3
