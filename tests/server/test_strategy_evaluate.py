"""FedASR's evaluate round and what it delegates to the inner Flower strategy."""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy
from strategy_helpers import (
    SENT,
    _ok,
    _task_identity,
    make_grid,
    make_reply,
    make_spectrum,
    make_strategy,
)

from fed_asr import protocol as P
from fed_asr.wire import record_nbytes
from server.ledger import RoundLedger
from server.strategy import FedASR

__all__ = ["_task_identity"]  # autouse fixture shared via strategy_helpers


# -- evaluation ------------------------------------------------------------------
def test_configure_evaluate_sends_number_of_seen_stages() -> None:
    # Prepare
    strategy = make_strategy()
    strategy.begin_round(2, 5, make_spectrum(), {})
    arrays = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    # Execute
    messages = list(
        strategy.configure_evaluate(1, arrays, ConfigRecord(), make_grid([11, 12]))
    )
    # Assert: evaluation never carries the spectrum
    assert len(messages) == 2
    for message in messages:
        config = message.content[P.CONFIG_RECORD]
        assert config[P.NUM_SEEN_STAGES_KEY] == 3 and config[P.GLOBAL_ROUND_KEY] == 5
        assert P.SPECTRUM_RECORD not in message.content.array_records
    # ... and its adapter downloads are counted apart from training's
    entry = strategy.ledger.rounds[-1]
    assert entry.bytes_down_evaluate == 2 * record_nbytes(arrays) > 0
    assert entry.bytes_down_adapter == 0
    assert strategy.ledger.totals()["bytes_down_evaluate"] == 2 * record_nbytes(arrays)


def test_aggregate_evaluate_pools_correct_over_total_and_logs_client_rows() -> None:
    # Prepare: stage 1 (two stages seen), two clients and one failure
    strategy = make_strategy()
    strategy.begin_round(1, 2, None, {})

    def counts(c0: int, t0: int, c1: int, t1: int) -> dict[str, int]:
        return {
            P.correct_key(0): c0,
            P.total_key(0): t0,
            P.correct_key(1): c1,
            P.total_key(1): t1,
            P.NUM_EXAMPLES_KEY: t0 + t1,
        }

    replies = [
        make_reply(12, 1, metrics=counts(1, 4, 2, 2)),
        make_reply(13, error="evaluation crashed"),
        make_reply(11, 0, metrics=counts(3, 4, 1, 2)),
    ]
    # Execute
    pooled = strategy.aggregate_evaluate(1, replies)
    # Assert: pooled = sum correct / sum total per stage, not a mean of accuracies
    assert pooled is not None
    assert dict(pooled) == {"acc-0": pytest.approx(0.5), "acc-1": pytest.approx(0.75)}
    entry = strategy.ledger.rounds[-1]
    assert entry.accuracy == {"0": pytest.approx(0.5), "1": pytest.approx(0.75)}
    assert entry.per_client == {
        "0": {"0": pytest.approx(0.75), "1": pytest.approx(0.5)},
        "1": {"0": pytest.approx(0.25), "1": pytest.approx(1.0)},
    }


def test_aggregate_evaluate_pools_type_and_skill_counts_with_differing_keys() -> None:
    # Prepare: client 0 has only colour questions on stage 0, client 1 also shapes
    strategy = make_strategy()
    strategy.begin_round(0, 1, None, {})
    a = make_reply(
        11,
        0,
        metrics={
            P.NUM_EXAMPLES_KEY: 2,
            P.total_key(0): 2,
            P.correct_key(0): 1,
            P.correct_key(0, "type"): 2,
            P.total_key(0, "color"): 2,
            P.correct_key(0, "all", "color"): 1,
            P.correct_key(0, "type", "color"): 2,
        },
    )
    b = make_reply(
        12,
        1,
        metrics={
            P.NUM_EXAMPLES_KEY: 2,
            P.total_key(0): 2,
            P.correct_key(0): 0,
            P.correct_key(0, "type"): 1,
            P.total_key(0, "color"): 1,
            P.correct_key(0, "all", "color"): 0,
            P.correct_key(0, "type", "color"): 1,
            P.total_key(0, "shape"): 1,
            P.correct_key(0, "all", "shape"): 0,
            P.correct_key(0, "type", "shape"): 0,
        },
    )
    # Execute
    pooled = strategy.aggregate_evaluate(1, [a, b])
    # Assert: pooled all-protocol accuracy 1/4; counts summed key by key
    assert pooled is not None and pooled["acc-0"] == 0.25
    counts = strategy.ledger.rounds[-1].counts
    assert counts[P.correct_key(0, "type")] == 3
    assert counts[P.total_key(0, "color")] == 3
    assert counts[P.correct_key(0, "type", "color")] == 3
    assert counts[P.total_key(0, "shape")] == 1


def test_inner_strategy_sees_the_global_round_not_flowers_round_one() -> None:
    # Prepare: the run starts Flower once per round, so `server_round` is always 1
    inner = Mock(spec=Strategy)
    inner.configure_train.return_value = []
    inner.aggregate_train.return_value = (None, None)
    inner.configure_evaluate.return_value = []
    inner.aggregate_evaluate.return_value = None
    strategy = FedASR(inner, ledger=RoundLedger())
    strategy.begin_round(2, 7, None, {})
    arrays = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    grid = make_grid([11])
    # Execute
    strategy.configure_train(1, arrays, ConfigRecord(), grid)
    strategy.aggregate_train(1, [_ok(11)])
    strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)
    strategy.aggregate_evaluate(1, [make_reply(11, metrics={P.NUM_EXAMPLES_KEY: 1})])
    # Assert
    for hook in ("configure_train", "aggregate_train", "configure_evaluate"):
        assert getattr(inner, hook).call_args.args[0] == 7, hook
    # evaluation counts are pooled by FedASR itself (clients' keys may differ)
    inner.aggregate_evaluate.assert_not_called()


def test_summary_logs_fedasr_then_delegates_to_inner_strategy() -> None:
    # Prepare
    inner = Mock(spec=Strategy)
    strategy = FedASR(inner, ledger=RoundLedger())
    # Execute
    strategy.summary()
    # Assert
    inner.summary.assert_called_once_with()
