"""The wire layout both Flower apps share, without importing Flower.

Record contents are read through the small duck-typed surface of Flower's records
(``ArrayRecord.items()`` of arrays with ``.numpy()`` and ``.data``), so the server and
the clients use one definition and never import each other. A server message's
signature covers its whole content (every record but the signature record itself, see
``content_records``) and a header of run id, round, sequence, message type and
destination node, in the canonical bytes of ``fed_asr.security.signing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fed_asr import protocol as P
from fed_asr.security.signing import (
    MessageHeader,
    RecordContent,
    SignatureError,
    check_fresh,
    sign_message,
    verify_message,
)

# Keys of the signature record; everything else a message holds is signed.
SIGNATURE_FIELDS = frozenset(
    {P.SIGNATURE_ROUND_KEY, P.SIGNATURE_SEQUENCE_KEY, P.SIGNATURE_VALUE_KEY}
)


def record_arrays(record: Any) -> dict[str, np.ndarray]:
    """Named NumPy arrays of an ``ArrayRecord`` (order kept)."""
    return {name: array.numpy() for name, array in record.items()}


def record_nbytes(record: Any | None) -> int:
    """Serialised payload bytes of an ``ArrayRecord`` (what travels, no framing)."""
    if record is None:
        return 0
    return sum(len(array.data) for array in record.values())


def reply_partition(msg: Any) -> int:
    """Partition id a reply reports (``-1`` when absent or on error)."""
    if msg.has_error() or P.METRICS_RECORD not in msg.content:
        return -1
    return int(msg.content[P.METRICS_RECORD].get(P.PARTITION_ID_KEY, -1))


def content_records(content: Any) -> dict[str, RecordContent]:
    """Every record of a message's content, signature record excepted, as signed.

    Parameters
    ----------
    content : RecordDict
        Read through ``array_records``, ``config_records`` and ``metric_records``.

    Raises
    ------
    SignatureError
        A record is of none of these kinds (it could not be signed).
    """
    records: dict[str, RecordContent] = {}
    for name, record in content.array_records.items():
        records[name] = RecordContent("arrays", record_arrays(record))
    for name, record in content.config_records.items():
        if name != P.SIGNATURE_RECORD:
            records[name] = RecordContent("config", dict(record))
    for name, record in content.metric_records.items():
        records[name] = RecordContent("metrics", dict(record))
    unknown = set(content) - set(records) - {P.SIGNATURE_RECORD}
    if unknown:
        raise SignatureError(
            f"Records {sorted(unknown)} are not ArrayRecord, ConfigRecord or "
            "MetricRecord; they cannot be signed. Refusing the message."
        )
    return records


def content_signature(
    key: Ed25519PrivateKey, content: Any, header: MessageHeader
) -> dict[str, bytes | int]:
    """Values of the ``signature`` record of one outgoing message.

    The signature covers ``header`` and every other record of ``content``; add it
    last, once the content is final.
    """
    return {
        P.SIGNATURE_ROUND_KEY: header.round,
        P.SIGNATURE_SEQUENCE_KEY: header.sequence,
        P.SIGNATURE_VALUE_KEY: sign_message(key, header, content_records(content)),
    }


def _signed_int(signature: Mapping[str, Any], key: str) -> int:
    value = signature.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignatureError(
            f"Signature record field `{key}` must be an integer, got {value!r}. "
            "Refusing the message."
        )
    return value


def verify_content(
    key: Ed25519PublicKey,
    content: Any,
    *,
    run_id: int,
    message_type: str,
    node_id: int,
    last: tuple[int, int] | None,
) -> tuple[int, int]:
    """Check a received message against this node's own view; nothing is changed.

    Parameters
    ----------
    key : Ed25519PublicKey
        The server's public key.
    content : RecordDict
        The received content, signature record included.
    run_id, message_type, node_id : int, str, int
        This node's run, the type the message is delivered as, this node's id.
    last : tuple[int, int] | None
        ``(round, sequence)`` last accepted in this run (None before the first).

    Returns
    -------
    tuple[int, int]
        The message's ``(round, sequence)``; the caller stores it as the new
        ``last`` once this returns.

    Raises
    ------
    SignatureError
        No or a malformed signature record, a signature that does not cover this
        exact content for this run, type and node, or a message not newer than
        ``last`` (replayed).
    """
    signature = content.config_records.get(P.SIGNATURE_RECORD)
    if signature is None:
        raise SignatureError(
            f"Message {message_type!r} of run {run_id} carries no "
            f"'{P.SIGNATURE_RECORD}' record, but this node requires the server's "
            "signature (verify key configured). Refusing it."
        )
    extra = sorted(set(signature) - SIGNATURE_FIELDS)
    if extra:
        raise SignatureError(
            f"Signature record has unexpected fields {extra} (allowed: "
            f"{sorted(SIGNATURE_FIELDS)}). Refusing the message."
        )
    value = signature.get(P.SIGNATURE_VALUE_KEY)
    if not isinstance(value, bytes) or len(value) != 64:
        raise SignatureError(
            f"Signature record field `{P.SIGNATURE_VALUE_KEY}` must be 64 bytes, got "
            f"{type(value).__name__}. Refusing the message."
        )
    header = MessageHeader(
        run_id=int(run_id),
        round=_signed_int(signature, P.SIGNATURE_ROUND_KEY),
        sequence=_signed_int(signature, P.SIGNATURE_SEQUENCE_KEY),
        message_type=str(message_type),
        dst_node=int(node_id),
    )
    verify_message(key, header, content_records(content), value)
    check_fresh(header, last)
    return header.position
