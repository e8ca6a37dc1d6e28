"""Validation of client replies before they reach an aggregate (issue: hostile peers).

Thin glue between the Flower messages and the pure checks of
``fed_asr.security.validation``: a train reply must carry exactly the adapter the
server sent (same names, shapes, dtypes), finite values, a plausible integer
``num-examples`` and an update within ``security.max_update_norm``; clear-text
spectrum statistics must be consistent with the reply's ``num-examples``. A reply
that fails is dropped by the strategy with the returned reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Message

from fed_asr import protocol as P
from fed_asr.config import SecurityConfig
from fed_asr.security.validation import (
    ReplyLimits,
    check_num_examples,
    check_spectrum_stats,
    spec_from_arrays,
    validate_reply,
)
from fed_asr.wire import record_arrays

ReplyCheck = Callable[[Message, ArrayRecord | None], str | None]


def _is_zero(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value) == 0.0
    )


def make_train_reply_check(security: SecurityConfig) -> ReplyCheck:
    """A ``FedASR.reply_check`` validating train replies against the sent adapter.

    A reply with ``num-examples`` exactly 0 (a client without data for the stage) is
    accepted unchecked: the strategy never aggregates it.
    """
    limits = ReplyLimits.from_config(security)

    def check(msg: Message, sent: ArrayRecord | None) -> str | None:
        content = msg.content
        extra = sorted(set(content.array_records) - {P.ARRAYS_RECORD})
        if extra:
            return f"unexpected ArrayRecords {extra}"
        metrics = dict(content.metric_records[P.METRICS_RECORD])
        if _is_zero(metrics.get(P.NUM_EXAMPLES_KEY)):
            return None
        arrays = record_arrays(content.array_records[P.ARRAYS_RECORD])
        if sent is None:
            result = check_num_examples(metrics, limits.max_num_examples)
            return None if result else result.reason
        reference = record_arrays(sent)
        result = validate_reply(
            arrays, metrics, spec_from_arrays(reference), limits, reference
        )
        return None if result else result.reason

    return check


def check_stats_reply(
    stats: dict[str, np.ndarray],
    metrics: dict[str, object],
    security: SecurityConfig,
    noisy: bool,
) -> str | None:
    """Reason to drop a clear-text statistics reply, or None.

    ``noisy`` (client-side DP noise) relaxes the integer-count and moment checks,
    which noise legitimately breaks.
    """
    result = check_num_examples(metrics, security.max_num_examples)
    if not result and not _is_zero(metrics.get(P.NUM_EXAMPLES_KEY)):
        return result.reason
    n = int(metrics[P.NUM_EXAMPLES_KEY])  # type: ignore[call-overload]
    if noisy:
        # Noise can push a count above num-examples; bound it loosely instead.
        result = check_spectrum_stats(
            stats, max(n, 1) * 10**6, integer_counts=False, check_moments=False
        )
    else:
        result = check_spectrum_stats(stats, n)
    return None if result else result.reason
