"""The wire layout both Flower apps share, without importing Flower.

Record contents are read through the small duck-typed surface of Flower's records
(``ArrayRecord.items()`` of arrays with ``.numpy()`` and ``.data``), so the server and
the clients use one definition and never import each other. Message signatures cover
the canonical bytes defined in ``fed_asr.security.signing``; this module says which
records they cover.
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
    SignatureError,
    SigningContext,
    sign_arrays,
    verify_arrays,
)

# Signature keys of the adapter and the spectrum; every other ArrayRecord of a
# server message (a method's memory) is signed under its own record name.
SIGNATURE_KEYS = {
    P.ARRAYS_RECORD: P.SIGNATURE_ADAPTER_KEY,
    P.SPECTRUM_RECORD: P.SIGNATURE_SPECTRUM_KEY,
}


def _signed_records(array_records: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(record name, signature key) of every ArrayRecord of a message."""
    return [(name, SIGNATURE_KEYS.get(name, name)) for name in sorted(array_records)]


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


def _context(run_id: int, round_: int, message_type: str, kind: str) -> SigningContext:
    return SigningContext(str(run_id), int(round_), f"{kind}@{message_type}")


def content_signatures(
    key: Ed25519PrivateKey,
    array_records: Mapping[str, Any],
    run_id: int,
    round_: int,
    message_type: str,
) -> dict[str, bytes | int]:
    """Values of the ``signature`` record: every ArrayRecord of the message."""
    signatures: dict[str, bytes | int] = {P.SIGNATURE_ROUND_KEY: int(round_)}
    for record_name, kind in _signed_records(array_records):
        arrays = record_arrays(array_records[record_name])
        ctx = _context(run_id, round_, message_type, kind)
        signatures[kind] = sign_arrays(key, arrays, ctx)
    return signatures


def verify_content(
    key: Ed25519PublicKey,
    array_records: Mapping[str, Any],
    signatures: Mapping[str, Any] | None,
    run_id: int,
    message_type: str,
    last_round: int,
) -> int:
    """Check a received message's signatures; returns the signed round.

    Raises
    ------
    SignatureError
        The signature record is missing, a signed record has no signature, a
        signature does not verify, or the round is older than ``last_round``
        (a replayed message).
    """
    if signatures is None:
        raise SignatureError(
            f"Message {message_type!r} of run {run_id} carries no "
            f"'{P.SIGNATURE_RECORD}' record, but this node requires the server's "
            "signature (verify key configured). Refusing it."
        )
    round_ = int(signatures[P.SIGNATURE_ROUND_KEY])
    if round_ < last_round:
        raise SignatureError(
            f"Signed round {round_} is older than round {last_round} already accepted "
            "(replayed message). Refusing it."
        )
    for record_name, kind in _signed_records(array_records):
        if kind not in signatures:
            raise SignatureError(f"Record '{record_name}' is not signed. Refusing it.")
        arrays = record_arrays(array_records[record_name])
        ctx = _context(run_id, round_, message_type, kind)
        verify_arrays(key, arrays, ctx, bytes(signatures[kind]))
    return round_
