"""Conversions between Flower records and NumPy, and wire-size accounting."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fed_asr import protocol as P


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """ArrayRecord from named NumPy arrays (order kept)."""
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}
    )


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named NumPy arrays of an ArrayRecord."""
    return {name: array.numpy() for name, array in record.items()}


def record_bytes(record: ArrayRecord | None) -> int:
    """Serialised payload bytes of an ArrayRecord (what travels, without framing)."""
    if record is None:
        return 0
    return sum(len(array.data) for array in record.values())


def partition_of(msg: Message) -> int:
    """Partition id a reply reports (``-1`` when absent or on error)."""
    if msg.has_error() or P.METRICS_RECORD not in msg.content:
        return -1
    return int(msg.content[P.METRICS_RECORD].get(P.PARTITION_ID_KEY, -1))
