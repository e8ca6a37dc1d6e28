"""Evaluation replies: validated, pooled per stage, per-client rows and outliers.

Clients report counts (``correct-*``, ``total-*``), which pool exactly. With a
:class:`~server.reply_validation.ReplyGuard`, a reply with counts no honest client
can report is dropped (its reason recorded), and a client whose accuracy on a stage
is far from the others' is flagged in the round's ``flagged`` list and logged. A
flagged client stays in the pool: non-IID clients can differ for honest reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common import log

from fed_asr import protocol as P
from fed_asr.wire import reply_partition
from server.ledger import RoundLedger, RoundLog
from server.reply_validation import ReplyGuard

ClientResults = dict[str, dict[int, tuple[int, int]]]  # client -> stage -> counts


def pool_evaluation_counts(records: Sequence[RecordDict]) -> dict[str, int]:
    """Sum over clients of every count (``correct-*``, ``total-*``) they report."""
    pooled: dict[str, int] = {}
    for record in records:
        for key, value in record[P.METRICS_RECORD].items():  # type: ignore[union-attr]
            if key.startswith((P.CORRECT_PREFIX, P.TOTAL_PREFIX)):
                pooled[key] = pooled.get(key, 0) + int(value)  # type: ignore[arg-type]
    return pooled


def stage_accuracy(counts: dict[str, int]) -> dict[str, float]:
    """Accuracy per stage (``all`` protocol) from pooled counts: correct / scored."""
    accuracy: dict[str, float] = {}
    for key, total in counts.items():
        stage = key[len(P.TOTAL_PREFIX) :]
        if key.startswith(P.TOTAL_PREFIX) and stage.isdigit() and total:
            accuracy[stage] = counts.get(P.correct_key(int(stage)), 0) / total
    return dict(sorted(accuracy.items()))


def pool_stage_accuracy(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Accuracy per stage pooled over clients (``acc-<stage>``), Flower's signature."""
    accuracy = stage_accuracy(pool_evaluation_counts(records))
    return MetricRecord({f"acc-{k}": v for k, v in accuracy.items()})


def accepted_evaluations(
    replies: Sequence[Message],
    guard: ReplyGuard | None,
    seen_stages: int,
    num_nodes: int,
    ledger: RoundLedger,
) -> list[Message]:
    """Replies whose counts pass the guard, by partition; drops are recorded."""
    accepted = []
    for msg in sorted(replies, key=reply_partition):
        if msg.has_error() or P.METRICS_RECORD not in msg.content.metric_records:
            continue
        metrics = msg.content.metric_records[P.METRICS_RECORD]
        reason = (
            None
            if guard is None
            else guard.evaluation_reason(metrics, seen_stages, num_nodes)
        )
        if reason is None:
            accepted.append(msg)
            continue
        node = msg.metadata.src_node_id
        ledger.record_drop(node, reply_partition(msg), f"evaluation: {reason}")
        log(WARNING, "Evaluation reply from node %d dropped: %s", node, reason)
    return accepted


def client_results(replies: Sequence[Message], seen_stages: int) -> ClientResults:
    """Per client (partition) and seen stage with test data: (correct, total)."""
    results: ClientResults = {}
    for msg in replies:
        metrics = msg.content.metric_records[P.METRICS_RECORD]
        rows = {}
        for i in range(seen_stages):
            total = int(metrics.get(P.total_key(i), 0))  # type: ignore[arg-type]
            if total:
                rows[i] = (int(metrics.get(P.correct_key(i), 0)), total)  # type: ignore[arg-type]
        results[str(reply_partition(msg))] = rows
    return results


def flag_outliers(
    guard: ReplyGuard,
    results: ClientResults,
    replies: Sequence[Message],
    entry: RoundLog,
) -> None:
    """Add each client whose accuracy is an outlier to ``entry.flagged``; warn."""
    nodes = {str(reply_partition(m)): m.metadata.src_node_id for m in replies}
    for outlier in guard.outliers(results):
        node = nodes[outlier.client]
        entry.flagged.append(
            {
                "node": node,
                "partition": int(outlier.client),
                "stage": outlier.stage,
                "accuracy": outlier.accuracy,
                "median_others": outlier.median_others,
                "z": outlier.z,
            }
        )
        log(
            WARNING,
            "Round %d: node %d (partition %s) flagged: accuracy %.3f on stage %d, "
            "the others' median %.3f (robust z %.1f)",
            entry.round,
            node,
            outlier.client,
            outlier.accuracy,
            outlier.stage,
            outlier.median_others,
            outlier.z,
        )
