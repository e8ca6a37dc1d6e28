"""DP of the adapters: what a client sends with ``privacy.dp=true`` is clipped and
noised, its ``num-examples`` is coarsened, and one epsilon covers every release.

The adapters are the replies of real ClientApps to the FedASR strategy's train
messages over the in-process ``LoopbackGrid`` (protobuf on the wire). The expected
noise scale is computed with the library's existing calibration
(``calibrate_gaussian``) for sensitivity ``2 * adapter_clip``.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import loopback_grid, set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Message

from clients.site import site_from_context
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.models import adapter_state
from fed_asr.security.dp import (
    calibrate_gaussian,
    calibrate_stats_noise,
    gaussian_epsilon,
    max_skills_per_sample,
)
from fed_asr.wire import record_arrays
from server.adapter_strategies import build_adapter_strategy
from server.ledger import RoundLedger
from server.run import FederatedRun
from server.strategy import FedASR

GRANULARITY = 4


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def _initial_adapter(overrides: list[str]) -> ArrayRecord:
    """The adapter of partition 0's site, as the server would send it."""
    run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
    node = {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 2}
    return ArrayRecord(
        torch_state_dict=adapter_state(site_from_context(run_config, node).model)
    )


def _train_round(
    overrides: list[str], arrays: ArrayRecord
) -> dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]]:
    """Partition -> (adapter received, adapter sent, num-examples sent), round 1."""
    cfg = compose_config("config", overrides)
    grid = loopback_grid(overrides)
    inner = build_adapter_strategy(
        cfg.federation, get_lora_aggregation(cfg.lora.aggregation)
    )
    strategy = FedASR(inner, ledger=RoundLedger())
    strategy.begin_round(0, 1, None, {})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    seen: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]] = {}

    def capture(node: int, msg: Message, reply: Message) -> Message:
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content[P.METRICS_RECORD]
        seen[int(metrics[P.PARTITION_ID_KEY])] = (
            record_arrays(msg.content[P.ARRAYS_RECORD]),
            record_arrays(reply.content[P.ARRAYS_RECORD]),
            int(metrics[P.NUM_EXAMPLES_KEY]),
        )
        return reply

    grid.on_reply = capture
    grid.send_and_receive(messages)
    return seen


def _delta(received: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> np.ndarray:
    """Flat float64 ``sent - received`` in sorted-name order."""
    return np.concatenate(
        [
            (sent[k].astype(np.float64) - received[k].astype(np.float64)).ravel()
            for k in sorted(received)
        ]
    )


@pytest.fixture(scope="module")
def raw_updates(model_cache: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Overrides factory, the global adapter sent, the round-1 replies without DP."""
    from helpers import small_run_overrides

    out = str(tmp_path_factory.mktemp("dp") / "run")

    def overrides(**extra: object) -> list[str]:
        settings: dict[str, object] = {
            "method": "vanilla",
            "data.max_train_per_stage": 18,
            "train.max_steps_per_stage": 2,
            **extra,
        }
        return small_run_overrides(model_cache, out, **settings)

    set_task_identity(7)
    arrays = _initial_adapter(overrides())  # every round below starts from it
    return overrides, arrays, _train_round(overrides(), arrays)


def test_dp_adapter_update_is_clipped_to_adapter_clip(raw_updates) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a clip well below the raw update norm; noise tiny (epsilon 1e4)
    overrides, arrays, raw = raw_updates
    raw_norm = min(float(np.linalg.norm(_delta(r, s))) for r, s, _ in raw.values())
    clip = raw_norm / 4
    dp = overrides(
        **{
            "privacy.dp": "true",
            "privacy.dp_seed": 1,
            "privacy.adapter_clip": clip,
            "privacy.adapter_epsilon": 1e4,
        }
    )
    sigma = calibrate_gaussian(1e4, 1e-5, 2 * clip)
    # Execute
    sent = _train_round(dp, arrays)
    # Assert: along the raw update the sent update has length clip (up to noise)
    for partition, (received, private, _) in sent.items():
        raw_delta = _delta(*raw[partition][:2])
        direction = raw_delta / np.linalg.norm(raw_delta)
        along = float(_delta(received, private) @ direction)
        assert abs(along - clip) < 5 * sigma + 1e-6, (along, clip, sigma)
        assert np.linalg.norm(raw_delta) > 3.9 * clip  # the clip was active


def test_dp_adapter_update_carries_the_calibrated_gaussian_noise(raw_updates) -> None:  # type: ignore[no-untyped-def]
    # Prepare: default per-round epsilon (8) and delta (1e-5), clip 1/4 of the update
    overrides, arrays, raw = raw_updates
    raw_norm = min(float(np.linalg.norm(_delta(r, s))) for r, s, _ in raw.values())
    clip = raw_norm / 4
    dp = overrides(
        **{"privacy.dp": "true", "privacy.dp_seed": 2, "privacy.adapter_clip": clip}
    )
    sigma = calibrate_gaussian(8.0, 1e-5, 2 * clip)
    # Execute
    sent = _train_round(dp, arrays)
    # Assert: sent update = clipped raw update + N(0, sigma^2) per entry
    noises = []
    for partition, (received, private, _) in sent.items():
        raw_delta = _delta(*raw[partition][:2])
        clipped = raw_delta * (clip / np.linalg.norm(raw_delta))
        noise = _delta(received, private) - clipped
        assert noise.size > 500
        assert abs(float(noise.std()) / sigma - 1.0) < 0.06
        assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(noise.size)
        noises.append(noise)
    # each client draws its own noise
    assert abs(float(np.corrcoef(noises[0], noises[1])[0, 1])) < 0.1


def test_dp_num_examples_is_rounded_down_to_the_granularity(raw_updates) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a granularity below every count (a smaller count would report 1)
    overrides, arrays, raw = raw_updates
    counts = {p: n for p, (_, _, n) in raw.items()}
    assert any(n % GRANULARITY for n in counts.values())  # exact counts would leak
    assert min(counts.values()) >= GRANULARITY
    dp = overrides(
        **{
            "privacy.dp": "true",
            "privacy.dp_seed": 3,
            "privacy.num_examples_granularity": GRANULARITY,
        }
    )
    # Execute
    sent = _train_round(dp, arrays)
    # Assert
    for partition, (_, _, n) in sent.items():
        exact = counts[partition]
        assert n == exact // GRANULARITY * GRANULARITY


def test_dp_off_sends_the_trained_adapter_unchanged(raw_updates) -> None:  # type: ignore[no-untyped-def]
    # Prepare / Execute: the same round again without DP
    overrides, arrays, raw = raw_updates
    again = _train_round(overrides(), arrays)
    # Assert: deterministic, unclipped, exact counts (the reference the tests use)
    for partition, (received, sent, n) in again.items():
        torch.testing.assert_close(
            _delta(received, sent), _delta(*raw[partition][:2]), rtol=0, atol=0
        )
        assert n == raw[partition][2]


def test_one_epsilon_composes_every_adapter_and_statistics_release(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: ASR (a statistics release per stage) with DP, 2 stages x 1 round
    overrides = run_overrides(
        "dp-run",
        **{
            "privacy.dp": "true",
            "privacy.dp_seed": 0,
            "privacy.num_examples_granularity": 5,
            "data.max_train_per_stage": 16,
            "train.max_steps_per_stage": 1,
        },
    )
    cfg = compose_config("config", overrides)
    grid = loopback_grid(overrides)
    stage_end_claims: list[int] = []

    def capture(node: int, msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type.endswith(P.SPECTRUM_ACTION):
            metrics = reply.content[P.METRICS_RECORD]
            stage_end_claims.append(int(metrics[P.NUM_EXAMPLES_KEY]))
        return reply

    grid.on_reply = capture
    # Execute
    path = FederatedRun(cfg, grid).run()
    # Assert: stage-end replies claim coarse sizes (8 per partition -> 10), accepted
    metrics = json.loads(Path(path).read_text())
    assert stage_end_claims and all(n % 5 == 0 for n in stage_end_claims)
    assert metrics["dropped_replies"] == 0
    # Assert: epsilon of the Gaussian-DP composition of all four releases
    privacy = metrics["privacy"]
    skills = build_stream(cfg.data, cfg.seed).skills
    m = max_skills_per_sample(cfg.regularizer.tau_skill, len(skills))
    z_stats = calibrate_stats_noise(cfg.privacy, m).noise_multiplier
    clip = cfg.privacy.adapter_clip
    z_adapter = calibrate_gaussian(8.0, 1e-5, 2 * clip) / (2 * clip)
    mu = math.sqrt(2 / z_stats**2 + 2 / z_adapter**2)
    assert privacy["releases"] == 4
    assert privacy["epsilon_spent"] == pytest.approx(gaussian_epsilon(mu, 1e-5), 1e-9)
    assert privacy["epsilon_spent"] > gaussian_epsilon(math.sqrt(2) / z_stats, 1e-5)
