"""FedASR's train round around an inner Flower strategy, with hand-made replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from strategy_helpers import (
    RUN_ID,
    SENT,
    _ok,
    _task_identity,
    _train,
    make_grid,
    make_reply,
    make_spectrum,
    make_strategy,
)

from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import FederationConfig
from fed_asr.security.signing import SignatureError, generate_signing_key
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays, record_nbytes, verify_content
from server.adapter_strategies import build_adapter_strategy
from server.ledger import RoundLedger
from server.strategy import FedASR, spectrum_version, spectrum_wire_record

__all__ = ["_task_identity"]  # autouse fixture shared via strategy_helpers


# -- aggregate_train -------------------------------------------------------------
def test_aggregate_train_drops_error_missing_examples_failed_check_into_ledger() -> (
    None
):
    # Prepare: one good reply; an error, one without num-examples, one the check fails
    good = {"w": np.array([1.0, 2.0], np.float32)}
    strategy = make_strategy(
        reply_check=lambda msg, sent: (
            "update norm too large"
            if msg.content[P.METRICS_RECORD][P.PARTITION_ID_KEY] == 3
            else None
        )
    )
    strategy.begin_round(0, 1, None, {})
    replies = [
        make_reply(11, 0, good, {P.NUM_EXAMPLES_KEY: 4, P.loss_key("task"): 1.5}),
        make_reply(12, error="boom"),
        make_reply(13, 2, good, {P.loss_key("task"): 1.0}),
        make_reply(14, 3, {"w": good["w"] * 9}, {P.NUM_EXAMPLES_KEY: 4}),
    ]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: only the good reply is aggregated; each drop is named with its node
    assert arrays is not None and metrics is not None
    np.testing.assert_array_equal(record_arrays(arrays)["w"], good["w"])
    entry = strategy.ledger.rounds[-1]
    assert (entry.round, entry.stage) == (1, 0)
    assert entry.failures == 1 and entry.clients_answered == 3
    assert [(d["node"], d["partition"]) for d in entry.dropped] == [(13, 2), (14, 3)]
    assert "missing metric 'num-examples'" in entry.dropped[0]["reason"]
    assert entry.dropped[1]["reason"] == "update norm too large"
    assert entry.losses == {"task": 1.5}


def test_aggregate_train_never_aggregates_replies_with_zero_examples() -> None:
    # Prepare
    strategy = make_strategy()
    strategy.begin_round(0, 1, None, {})
    empty = make_reply(11, 0, {"w": np.array([100.0])}, {P.NUM_EXAMPLES_KEY: 0})
    full = make_reply(12, 1, {"w": np.array([2.0])}, {P.NUM_EXAMPLES_KEY: 3})
    # Execute
    arrays, _ = strategy.aggregate_train(1, [empty, full])
    only_empty = strategy.aggregate_train(1, [empty])
    # Assert: the empty reply is answered, not dropped, and never averaged in
    assert arrays is not None
    np.testing.assert_array_equal(record_arrays(arrays)["w"], np.array([2.0]))
    assert only_empty == (None, None)
    assert strategy.ledger.rounds[-1].dropped == []


def test_aggregate_train_inner_fedavg_gives_example_weighted_mean() -> None:
    # Prepare: weights 1 and 3
    strategy = make_strategy()
    strategy.begin_round(0, 1, None, {})
    a = {"w": np.array([1.0, 0.0], np.float32), "v": np.array([[4.0]], np.float32)}
    b = {"w": np.array([5.0, 8.0], np.float32), "v": np.array([[0.0]], np.float32)}
    replies = [
        make_reply(
            11,
            0,
            a,
            {
                P.NUM_EXAMPLES_KEY: 1,
                P.loss_key("task"): 2.0,
                P.TRAIN_SECONDS_KEY: 1.0,
            },
        ),
        make_reply(
            12,
            1,
            b,
            {
                P.NUM_EXAMPLES_KEY: 3,
                P.loss_key("task"): 6.0,
                P.TRAIN_SECONDS_KEY: 2.0,
            },
        ),
    ]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1 a + 3 b) / 4 per array; losses weighted, seconds summed
    assert arrays is not None and metrics is not None
    merged = record_arrays(arrays)
    np.testing.assert_allclose(merged["w"], [4.0, 6.0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(merged["v"], [[1.0]], rtol=1e-6, atol=0)
    assert metrics[P.loss_key("task")] == pytest.approx(5.0)
    assert metrics[P.TRAIN_SECONDS_KEY] == pytest.approx(3.0)
    assert metrics[P.NUM_EXAMPLES_KEY] == 4
    assert strategy.ledger.rounds[-1].losses == {"task": pytest.approx(5.0)}


def test_aggregate_train_around_fedadam_keeps_float32_and_uses_the_global_round() -> (
    None
):
    # Prepare: FedAdam (Flower's FedOpt) computes its update in float64; global round 3
    federation = FederationConfig(num_clients=2, strategy="fedadam")
    inner = build_adapter_strategy(federation, get_lora_aggregation("fedavg"))
    strategy = FedASR(inner, ledger=RoundLedger())
    messages = _train(strategy, make_grid([11, 12]), 3, None)
    moved = {k: v + 1.0 for k, v in SENT.items()}
    replies = [make_reply(n, n, moved, {P.NUM_EXAMPLES_KEY: 2}) for n in (11, 12)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: Adam's first step for delta = 1 with round-3 bias correction, float32
    assert len(messages) == 2 and arrays is not None
    merged = record_arrays(arrays)
    assert {k: v.dtype for k, v in merged.items()} == {k: np.float32 for k in SENT}
    b1, b2, r = inner.beta_1, inner.beta_2, 3
    eta_norm = inner.eta * np.sqrt(1 - b2 ** (r + 1)) / (1 - b1 ** (r + 1))
    step = eta_norm * (1 - b1) / (np.sqrt(1 - b2) + inner.tau)
    np.testing.assert_allclose(
        merged["m.lora_A.weight"], SENT["m.lora_A.weight"] + step, rtol=1e-6, atol=0
    )


def test_aggregate_train_replies_with_different_metric_keys_still_aggregate() -> None:
    # Prepare: one client reports a `spec` term, another an unknown metric of its own
    strategy = make_strategy()
    strategy.begin_round(1, 3, None, {})
    a = make_reply(
        11, 0, {"w": np.array([1.0])}, {P.NUM_EXAMPLES_KEY: 1, "loss-task": 2.0}
    )
    b = make_reply(
        12,
        1,
        {"w": np.array([3.0])},
        {P.NUM_EXAMPLES_KEY: 1, "loss-task": 4.0, "loss-spec": 1.0, "evil": 9.0},
    )
    # Execute
    arrays, metrics = strategy.aggregate_train(1, [a, b])
    # Assert: FedAvg of both; losses pooled by examples (a term missing counts 0)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(record_arrays(arrays)["w"], np.array([2.0]))
    assert metrics["loss-task"] == 3.0
    assert "evil" not in metrics
    assert strategy.ledger.rounds[-1].losses == {"task": 3.0, "spec": 0.5}


# -- configure_train -------------------------------------------------------------
def test_configure_train_adds_round_stage_and_spectrum_version() -> None:
    # Prepare
    strategy = make_strategy()
    spectrum = make_spectrum()
    grid = make_grid([11, 12])
    # Execute
    messages = _train(strategy, grid, 3, spectrum)
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    for message in messages:
        config = message.content[P.CONFIG_RECORD]
        assert config[P.GLOBAL_ROUND_KEY] == 3 and config[P.STAGE_KEY] == 1
        assert config[P.SERVER_ROUND_KEY] == 3  # the inner strategy saw round 3
        version = spectrum_version(spectrum_wire_record(spectrum))
        assert config[P.SPECTRUM_VERSION_KEY] == version
        received = SkillSpectrum.from_arrays(
            record_arrays(message.content[P.SPECTRUM_RECORD]), ("a", "b")
        )
        torch.testing.assert_close(
            received.mean, spectrum.mean.float().double(), atol=0, rtol=0
        )
    entry = strategy.ledger.rounds[-1]
    assert entry.clients_sampled == 2
    wire = record_nbytes(spectrum_wire_record(spectrum))
    assert entry.bytes_down_spectrum == 2 * wire > 0


def test_configure_train_attaches_spectrum_only_while_a_sampled_node_lacks_it() -> None:
    # Prepare
    strategy = make_strategy()
    spectrum = make_spectrum()
    grid = make_grid([11, 12])

    def carried(messages: list[Message]) -> list[bool]:
        return [P.SPECTRUM_RECORD in m.content.array_records for m in messages]

    # Execute: round 1 delivers; round 2 has nothing to send; in round 2 node 12
    # fails (it may have lost its state); node 13 joins in round 4; a new spectrum
    first = _train(strategy, grid, 1, spectrum)
    strategy.aggregate_train(1, [_ok(11), _ok(12)])
    second = _train(strategy, grid, 2, spectrum)
    strategy.aggregate_train(2, [_ok(11), make_reply(12, error="state lost")])
    third = _train(strategy, grid, 3, spectrum)
    strategy.aggregate_train(3, [_ok(11), _ok(12)])
    grid.get_node_ids.return_value = [11, 12, 13]
    fourth = _train(strategy, grid, 4, spectrum)
    strategy.aggregate_train(4, [_ok(11), _ok(12), _ok(13)])
    fifth = _train(strategy, grid, 5, spectrum)
    sixth = _train(strategy, grid, 6, make_spectrum(scale=2.0))
    # Assert
    assert carried(first) == [True, True] and carried(second) == [False, False]
    assert carried(third) == [True, True]
    assert carried(fourth) == [True] * 3 and carried(fifth) == [False] * 3
    assert carried(sixth) == [True] * 3
    assert all(P.SPECTRUM_VERSION_KEY in m.content[P.CONFIG_RECORD] for m in fifth)
    assert [r.bytes_down_spectrum > 0 for r in strategy.ledger.rounds] == [
        True,
        False,
        True,
        True,
        False,
        True,
    ]


def test_configure_train_without_spectrum_sends_memory_records_and_no_version() -> None:
    # Prepare
    strategy = make_strategy()
    memory = {
        P.memory_record("previous"): ArrayRecord(
            {"w": Array(np.arange(4, dtype=np.float32))}
        ),
        P.memory_record("fisher"): ArrayRecord(
            {"w": Array(np.ones(4, dtype=np.float32))}
        ),
    }
    strategy.begin_round(1, 2, None, memory)
    arrays = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    # Execute
    messages = list(
        strategy.configure_train(1, arrays, ConfigRecord(), make_grid([11, 12]))
    )
    # Assert
    for message in messages:
        content = message.content
        assert set(content.array_records) == {P.ARRAYS_RECORD, *memory}
        np.testing.assert_array_equal(
            record_arrays(content[P.memory_record("previous")])["w"], np.arange(4)
        )
        assert P.SPECTRUM_VERSION_KEY not in content[P.CONFIG_RECORD]
    entry = strategy.ledger.rounds[-1]
    per_message = sum(record_nbytes(record) for record in memory.values())
    assert entry.bytes_down_extra == 2 * per_message >= 2 * 2 * 16
    assert entry.bytes_down_spectrum == 0
    assert entry.bytes_down_adapter == 2 * record_nbytes(arrays)


def test_configure_train_signs_each_whole_message_for_its_node_and_round() -> None:
    # Prepare
    key = generate_signing_key()
    strategy = make_strategy(signing_key=key)
    # Execute
    messages = _train(strategy, make_grid([11, 12]), 4, make_spectrum())
    # Assert: each message verifies for its node in round 4, not for the other node;
    # an older accepted position refuses it (replay)
    assert messages[0].content is not messages[1].content
    for message in messages:
        node = message.metadata.dst_node_id
        other = ({11, 12} - {node}).pop()
        assert P.SPECTRUM_RECORD in message.content.array_records
        args = (key.public_key(), message.content)
        where = {"run_id": RUN_ID, "message_type": "train"}
        assert verify_content(*args, **where, node_id=node, last=None)[0] == 4
        with pytest.raises(SignatureError, match="Signature check failed"):
            verify_content(*args, **where, node_id=other, last=None)
        with pytest.raises(SignatureError, match="replayed"):
            verify_content(*args, **where, node_id=node, last=(5, 0))
