"""Ed25519 signatures over the global state carried by a message (``security.sign``).

The server signs the adapter (``arrays``) and the global spectrum (``spectrum``) of
every message it sends, bound to the run id, the global round and the message type,
so a signature cannot be replayed in another run, round or kind of message. Clients
holding the server's public key verify before they use anything and refuse a
message whose signature is missing, forged or older than one they already accepted.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from flwr.app import ConfigRecord, Message, RecordDict

from fed_asr import protocol as P
from fed_asr.security.signing import (
    SignatureError,
    SigningContext,
    sign_arrays,
    verify_arrays,
)
from server.records import record_to_numpy

_SIGNED = ((P.ARRAYS_RECORD, P.SIGNATURE_ADAPTER_KEY), (P.SPECTRUM_RECORD, "spectrum"))


def _context(run_id: int, round_: int, message_type: str, kind: str) -> SigningContext:
    return SigningContext(str(run_id), int(round_), f"{kind}@{message_type}")


def sign_content(
    key: Ed25519PrivateKey,
    content: RecordDict,
    run_id: int,
    round_: int,
    message_type: str,
) -> None:
    """Add a ``signature`` record signing the content's adapter and spectrum."""
    signatures: dict[str, bytes | int] = {P.SIGNATURE_ROUND_KEY: int(round_)}
    for record_name, kind in _SIGNED:
        if record_name in content.array_records:
            arrays = record_to_numpy(content.array_records[record_name])
            ctx = _context(run_id, round_, message_type, kind)
            signatures[kind] = sign_arrays(key, arrays, ctx)
    content[P.SIGNATURE_RECORD] = ConfigRecord(signatures)


def verify_message(key: Ed25519PublicKey, msg: Message, last_round: int) -> int:
    """Check the signatures of a received message; returns the signed round.

    Raises
    ------
    SignatureError
        If the signature record is missing, a signed record has no signature, a
        signature does not verify, or the round is older than ``last_round``
        (a replayed message).
    """
    content = msg.content
    record = content.config_records.get(P.SIGNATURE_RECORD)
    if record is None:
        raise SignatureError(
            f"Message {msg.metadata.message_type!r} of run {msg.metadata.run_id} "
            f"carries no '{P.SIGNATURE_RECORD}' record, but this node requires the "
            "server's signature (verify key configured). Refusing it."
        )
    round_ = int(record[P.SIGNATURE_ROUND_KEY])  # type: ignore[arg-type]
    if round_ < last_round:
        raise SignatureError(
            f"Signed round {round_} is older than round {last_round} already accepted "
            "(replayed message). Refusing it."
        )
    for record_name, kind in _SIGNED:
        if record_name not in content.array_records:
            continue
        if kind not in record:
            raise SignatureError(f"Record '{record_name}' is not signed. Refusing it.")
        arrays = record_to_numpy(content.array_records[record_name])
        ctx = _context(msg.metadata.run_id, round_, msg.metadata.message_type, kind)
        verify_arrays(key, arrays, ctx, bytes(record[kind]))  # type: ignore[arg-type]
    return round_
