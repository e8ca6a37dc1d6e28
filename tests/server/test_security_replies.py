"""Rounds over real Flower messages with bad replies and a node that lost state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from security_helpers import NUM_NODES, Federation, _task_identity, federation

from fed_asr import protocol as P
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays as record_to_numpy
from server.ledger import RoundLedger, RoundLog
from server.records import numpy_record
from server.reply_validation import make_train_reply_check
from server.strategy import FedASR

__all__ = ["_task_identity", "federation"]  # fixtures shared via security_helpers


# -- reply validation ---------------------------------------------------------------
def _corrupt(kind: str, reply: Message) -> Message:
    content = reply.content
    arrays = record_to_numpy(content.array_records[P.ARRAYS_RECORD])
    metrics = content.metric_records[P.METRICS_RECORD]
    first = sorted(arrays)[0]
    if kind == "nan":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = np.nan
    elif kind == "shape":
        arrays[first] = np.zeros((3, 3), dtype=np.float32)
    elif kind == "key":
        arrays["intruder.weight"] = arrays.pop(first)
    elif kind == "negative":
        metrics[P.NUM_EXAMPLES_KEY] = -5
    elif kind == "huge":
        metrics[P.NUM_EXAMPLES_KEY] = 10**9
    elif kind == "norm":
        arrays[first] = arrays[first] + 1e4
    content[P.ARRAYS_RECORD] = numpy_record(arrays)
    return reply


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "non-finite"),
        ("shape", "shape"),
        ("key", "expected arrays"),
        ("negative", "num-examples"),
        ("huge", "num-examples"),
        ("norm", "norm"),
    ],
)
def test_bad_train_reply_is_dropped_and_logged_with_its_node(
    federation, kind: str, reason: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: node 1000 sends a corrupted reply, the others are honest
    fed = federation()
    fed.grid.on_reply = lambda node, msg, reply: (
        _corrupt(kind, reply) if node == 1000 else reply
    )
    strategy = fed.strategy(reply_check=make_train_reply_check(fed.cfg.security))
    strategy.begin_round(0, 1, None, {})
    # Execute
    messages = strategy.configure_train(1, fed.arrays, ConfigRecord(), fed.grid)
    replies = fed.grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the round went on with the two honest replies
    dropped = strategy.ledger.rounds[-1].dropped
    assert arrays is not None
    assert [d["node"] for d in dropped] == [1000]
    assert reason in dropped[0]["reason"]
    assert all(np.isfinite(v).all() for v in record_to_numpy(arrays).values())


def test_bad_statistics_reply_is_dropped_and_counted(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: node 1001 claims more skill samples than examples
    fed = federation()

    def inflate(node: int, msg: Message, reply: Message) -> Message:
        if node == 1001 and P.STATS_RECORD in reply.content.array_records:
            stats = record_to_numpy(reply.content.array_records[P.STATS_RECORD])
            stats["count"] = stats["count"] + 1000
            reply.content[P.STATS_RECORD] = numpy_record(stats)
        return reply

    fed.grid.on_reply = inflate
    ledger = RoundLedger([RoundLog(round=1, stage=0)])
    # Execute
    inputs = fed.stage_end(ledger)
    # Assert: the two honest parts are kept, the inflated one dropped and named
    assert len(inputs.spectrum_parts) == NUM_NODES - 1
    assert [d["node"] for d in ledger.rounds[-1].dropped] == [1001]
    assert "exceeds" in ledger.rounds[-1].dropped[0]["reason"]


# -- spectrum delivery ----------------------------------------------------------------
def _train_round(
    fed: Federation, strategy: FedASR, round_: int, spectrum: SkillSpectrum
) -> tuple[list[int], list[Message]]:
    strategy.begin_round(1, round_, spectrum, {})
    messages = list(
        strategy.configure_train(round_, fed.arrays, ConfigRecord(), fed.grid)
    )
    carried = sorted(
        m.metadata.dst_node_id
        for m in messages
        if P.SPECTRUM_RECORD in m.content.array_records
    )
    replies = list(fed.grid.send_and_receive(messages))
    strategy.aggregate_train(round_, replies)
    return carried, replies


def test_global_spectrum_travels_once_per_version_and_is_resent_after_state_loss(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a global spectrum from a stage-end round of stage 0
    fed = federation()
    spectrum = fed.spectrum()
    assert spectrum is not None
    strategy = fed.strategy()
    # Execute: two rounds; then node 1001 loses its state; two more rounds
    first, _ = _train_round(fed, strategy, 1, spectrum)
    second, replies = _train_round(fed, strategy, 2, spectrum)
    fed.grid.contexts[1001].state = RecordDict()
    third, failed = _train_round(fed, strategy, 3, spectrum)
    fourth, _ = _train_round(fed, strategy, 4, spectrum)
    # Assert: sent once; after the node that lost it fails, sent again. The inner
    # strategy gives every message one shared content, so the spectrum goes to all
    # sampled nodes while any of them has not confirmed the version.
    assert first == sorted(fed.nodes) and second == [] and third == []
    assert all(m.content[P.METRICS_RECORD][P.loss_key("spec")] > 0 for m in replies)
    assert [m.metadata.src_node_id for m in failed if m.has_error()] == [1001]
    assert "never received" in next(m for m in failed if m.has_error()).error.reason
    assert fourth == sorted(fed.nodes)
    bytes_down = [r.bytes_down_spectrum for r in strategy.ledger.rounds]
    assert bytes_down[1] == bytes_down[2] == 0 < bytes_down[3] == bytes_down[0]
