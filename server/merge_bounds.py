"""What the inner adapter strategy sees of each train reply, bounded (poisoning).

``FedASR`` hands the inner strategy (FedAvg, FedAdam, ...) only each reply's adapter
and weight. Validated replies may still dominate a weighted merge, by a large
``num-examples`` or a long update; here the weights are capped at
``security.max_example_share`` of the round's total and updates longer than
``security.norm_bound_factor`` times the round's median norm are scaled down to it
(clipping, not dropping: the client still counts, with a bounded pull). A method's
own stage-end statistics (EWC's Fisher, ...) are bounded by the same rule, per
example (:func:`bounded_statistics`). Each bound that bites is recorded in the
round's ``clipped`` list and logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log

from fed_asr import protocol as P
from fed_asr.config import SecurityConfig
from fed_asr.security.robust_weights import cap_shares, norm_clip_scales
from fed_asr.security.validation import update_norm
from fed_asr.wire import record_arrays, reply_partition
from server.ledger import RoundLog
from server.records import numpy_record


def num_examples(msg: Message) -> int:
    """A reply's ``num-examples``."""
    return int(msg.content[P.METRICS_RECORD][P.NUM_EXAMPLES_KEY])  # type: ignore[call-overload]


def adapter_only(
    msg: Message, weight: float | None = None, arrays: ArrayRecord | None = None
) -> Message:
    """A reply's adapter and weight alone (what the inner strategy sees).

    ``weight`` (default: the reply's ``num-examples``) and ``arrays`` (default: its
    adapter) replace the reply's own when the merge bounds them.
    """
    content = RecordDict(
        {
            P.ARRAYS_RECORD: msg.content[P.ARRAYS_RECORD] if arrays is None else arrays,
            P.METRICS_RECORD: MetricRecord(
                {P.NUM_EXAMPLES_KEY: num_examples(msg) if weight is None else weight}
            ),
        }
    )
    return Message(
        content=content,
        dst_node_id=msg.metadata.src_node_id,
        message_type=MessageType.TRAIN,
    )


def _scaled(
    msg: Message, sent: Mapping[str, np.ndarray] | None, scale: float
) -> ArrayRecord | None:
    """The reply's adapter with its update ``new - sent`` scaled (None: unchanged)."""
    if scale >= 1.0 or sent is None:
        return None
    record = msg.content.array_records[P.ARRAYS_RECORD]
    return numpy_record(
        {
            name: (sent[name] + (value - sent[name]) * scale).astype(value.dtype)
            for name, value in record_arrays(record).items()
        }
    )


def _note(entry: RoundLog, msg: Message, kind: str, value: float, bound: float) -> None:
    node, partition = msg.metadata.src_node_id, reply_partition(msg)
    entry.clipped.append(
        {
            "node": node,
            "partition": partition,
            "kind": kind,
            "value": float(value),
            "bound": float(bound),
        }
    )
    log(
        WARNING,
        "Round %d: reply from node %d clipped: %s %.6g lowered to %.6g",
        entry.round,
        node,
        kind,
        value,
        bound,
    )


def bounded_replies(
    replies: list[Message],
    sent: ArrayRecord | None,
    security: SecurityConfig | None,
    entry: RoundLog,
) -> list[Message]:
    """Each reply as the inner strategy sees it, with weight and update bounded.

    Parameters
    ----------
    replies : list[Message]
        Validated train replies with data.
    sent : ArrayRecord | None
        The global adapter the round sent (the reference of the update norms).
    security : SecurityConfig | None
        ``max_example_share`` and ``norm_bound_factor``; None: nothing is bounded.
    entry : RoundLog
        The round's log; every bound that bites is appended to ``clipped``.
    """
    weights = [float(num_examples(m)) for m in replies]
    scales = [1.0] * len(replies)
    if security is not None and security.max_example_share is not None:
        capped = cap_shares(weights, security.max_example_share)
        for msg, weight, cap in zip(replies, weights, capped, strict=True):
            if cap < weight:
                _note(entry, msg, "num-examples share", weight, cap)
        weights = capped
    reference = None if sent is None else record_arrays(sent)
    factor = None if security is None else security.norm_bound_factor
    if factor is not None and reference is not None:
        norms = [
            update_norm(record_arrays(m.content[P.ARRAYS_RECORD]), reference)
            for m in replies
        ]
        scales = norm_clip_scales(norms, factor)
        for msg, norm, scale in zip(replies, norms, scales, strict=True):
            if scale < 1.0:
                _note(entry, msg, "update norm", norm, norm * scale)
    return [
        adapter_only(msg, weight, _scaled(msg, reference, scale))
        for msg, weight, scale in zip(replies, weights, scales, strict=True)
    ]


def statistics_norm(sums: Mapping[str, Any], count: int) -> float:
    """``sqrt(sum_k ||sums[k]||^2) / count``: one reply's statistics per example."""
    total = sum(
        float(torch.as_tensor(v).double().square().sum()) for v in sums.values()
    )
    return math.sqrt(total) / count


def bounded_statistics(
    name: str,
    received: Sequence[tuple[Message, tuple[dict[str, torch.Tensor], int]]],
    factor: float | None,
    entry: RoundLog | None,
) -> list[tuple[dict[str, torch.Tensor], int]]:
    """A method's stage-end statistics, each reply's size per example bounded.

    The same rule as for adapter updates: a reply whose statistics per example
    (:func:`statistics_norm`) exceed ``factor`` times the lower median over the
    replies with data is scaled down to that bound (its count and direction kept),
    so one client cannot dominate a merged Fisher or set of sums by scaling its own.
    Replies without data (count 0) are passed on unchanged (merges ignore them).
    ``factor`` None: nothing is bounded.
    """
    parts = [part for _, part in received]
    with_data = [i for i, (_, count) in enumerate(parts) if count > 0]
    if factor is None or not with_data:
        return parts
    norms = [statistics_norm(*parts[i]) for i in with_data]
    scales = norm_clip_scales(norms, factor)
    out = list(parts)
    for i, norm, scale in zip(with_data, norms, scales, strict=True):
        if scale < 1.0:
            sums, count = parts[i]
            out[i] = ({k: v * scale for k, v in sums.items()}, count)
            if entry is not None:
                _note(
                    entry, received[i][0], f"`{name}` per example", norm, norm * scale
                )
    return out
