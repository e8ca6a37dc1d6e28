"""Ed25519 signatures over named arrays and over whole server messages.

Two signed forms, each under its own domain so a signature of one is never valid as
the other:

- ``sign_arrays``: ``DOMAIN || SHA-256(context, arrays)`` for named arrays (checkpoint
  tools, anything outside a message).
- ``sign_message``: ``MESSAGE_DOMAIN || SHA-256(header, records)`` for a server message:
  the header binds run id, round, sequence number, message type and destination node;
  the records are every record of the content (arrays, configs, metrics) in the typed
  canonical encoding of :mod:`fed_asr.security.canonical`. ``check_fresh`` is the
  replay rule: a node accepts a message only if its (round, sequence) is strictly
  greater than the last one it accepted in that run.

Any change of a value, key, type, name, dtype, shape, record, header field or key pair
breaks the signature.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fed_asr.security.canonical import encode_value, field, write_arrays, write_values

DOMAIN = b"fed-asr/signed-arrays/v1"
MESSAGE_DOMAIN = b"fed-asr/signed-message/v1"


class SignatureError(ValueError):
    """Raised when a signature does not verify or a key cannot be used."""


@dataclass(frozen=True)
class SigningContext:
    """What a signature is about, bound into the signed bytes.

    Parameters
    ----------
    run_id : str
        Identifier of the run.
    round : int
        Server round the arrays belong to.
    kind : str
        What is signed, e.g. ``"adapter"`` or ``"spectrum"``.
    """

    run_id: str
    round: int
    kind: str

    def to_bytes(self) -> bytes:
        """Unambiguous encoding of the context."""
        return (
            field(self.run_id.encode())
            + struct.pack(">q", self.round)
            + field(self.kind.encode())
        )


def canonical_digest(arrays: Mapping[str, object], context: SigningContext) -> bytes:
    """SHA-256 of the canonical encoding of ``arrays`` under ``context``.

    Parameters
    ----------
    arrays : Mapping[str, object]
        Named ``numpy.ndarray`` (or ``torch.Tensor``) values.
    context : SigningContext
        Run, round and kind.

    Returns
    -------
    bytes
        32-byte digest.
    """
    h = hashlib.sha256()
    h.update(field(context.to_bytes()))
    write_arrays(h, arrays)
    return h.digest()


def sign_arrays(
    private_key: Ed25519PrivateKey,
    arrays: Mapping[str, object],
    context: SigningContext,
) -> bytes:
    """Sign ``arrays`` under ``context``; returns the 64-byte Ed25519 signature."""
    return private_key.sign(DOMAIN + canonical_digest(arrays, context))


def verify_arrays(
    public_key: Ed25519PublicKey,
    arrays: Mapping[str, object],
    context: SigningContext,
    signature: bytes,
) -> None:
    """Check a signature made by :func:`sign_arrays`.

    Raises
    ------
    SignatureError
        If the arrays, the context or the key do not match the signature.
    """
    try:
        public_key.verify(signature, DOMAIN + canonical_digest(arrays, context))
    except InvalidSignature as err:
        raise SignatureError(
            f"Signature check failed for {context.kind!r} of run {context.run_id!r}, "
            f"round {context.round} ({len(arrays)} arrays): the arrays or context were "
            "altered, or they were signed by another key. Refusing them."
        ) from err


# ------------------------------------------------------------------ whole messages
RecordKind = Literal["arrays", "config", "metrics"]
_KIND_TAGS: dict[str, bytes] = {"arrays": b"A", "config": b"C", "metrics": b"M"}


@dataclass(frozen=True)
class MessageHeader:
    """Where and when a server message is valid, bound into its signature.

    Parameters
    ----------
    run_id : int
        Flower run id.
    round : int
        Server (global) round the message belongs to.
    sequence : int
        Position among the server's signed messages of the run, strictly increasing;
        orders the several messages of one round (train, evaluate, stage end, the
        secure-aggregation steps).
    message_type : str
        Flower message type, e.g. ``"train"`` or ``"query.secagg"``.
    dst_node : int
        Node id the message is addressed to.
    """

    run_id: int
    round: int
    sequence: int
    message_type: str
    dst_node: int

    @property
    def position(self) -> tuple[int, int]:
        """``(round, sequence)``: the order the replay rule compares."""
        return (self.round, self.sequence)

    def to_bytes(self) -> bytes:
        """Typed canonical encoding of the header fields."""
        fields = {
            "run-id": self.run_id,
            "round": self.round,
            "sequence": self.sequence,
            "message-type": self.message_type,
            "dst-node": self.dst_node,
        }
        return b"".join(
            field(name.encode()) + encode_value(value, f"header `{name}`")
            for name, value in fields.items()
        )


@dataclass(frozen=True)
class RecordContent:
    """One record of a message, without Flower types.

    Parameters
    ----------
    kind : RecordKind
        ``"arrays"`` (values are arrays), ``"config"`` or ``"metrics"`` (values are
        bool, int, float, str, bytes or lists of them).
    values : Mapping[str, object]
        The record's entries.
    """

    kind: RecordKind
    values: Mapping[str, object]


def message_digest(
    header: MessageHeader, records: Mapping[str, RecordContent]
) -> bytes:
    """SHA-256 of the header and every record of a message, in canonical form.

    Records are written in sorted-name order as name, kind tag and body, so adding,
    removing, renaming or retyping a record changes the digest.

    Raises
    ------
    TypeError
        A value of a type that cannot be encoded.
    """
    h = hashlib.sha256()
    h.update(field(header.to_bytes()))
    h.update(struct.pack(">Q", len(records)))
    for name in sorted(records):
        record = records[name]
        h.update(field(name.encode()) + _KIND_TAGS[record.kind])
        if record.kind == "arrays":
            write_arrays(h, record.values)
        else:
            write_values(h, record.values, f"{record.kind} record `{name}`")
    return h.digest()


def sign_message(
    private_key: Ed25519PrivateKey,
    header: MessageHeader,
    records: Mapping[str, RecordContent],
) -> bytes:
    """Sign a whole message (header and all records); 64-byte Ed25519 signature."""
    return private_key.sign(MESSAGE_DOMAIN + message_digest(header, records))


def verify_message(
    public_key: Ed25519PublicKey,
    header: MessageHeader,
    records: Mapping[str, RecordContent],
    signature: bytes,
) -> None:
    """Check a signature made by :func:`sign_message` against this node's view.

    Raises
    ------
    SignatureError
        A record, a value, the header (run, round, sequence, type, destination) or
        the key differs from what was signed.
    """
    try:
        digest = message_digest(header, records)
        public_key.verify(signature, MESSAGE_DOMAIN + digest)
    except (InvalidSignature, TypeError) as err:
        detail = f" ({err})" if isinstance(err, TypeError) else ""
        raise SignatureError(
            f"Signature check failed for message {header.message_type!r} to node "
            f"{header.dst_node} of run {header.run_id}, round {header.round}, sequence "
            f"{header.sequence}{detail}: its records were altered, or it was signed "
            "for another node, run, round or message type, or by another key. "
            "Refusing it."
        ) from err


def check_fresh(header: MessageHeader, last: tuple[int, int] | None) -> None:
    """The replay rule: ``(round, sequence)`` must exceed the last accepted one.

    Parameters
    ----------
    header : MessageHeader
        The verified message's header.
    last : tuple[int, int] | None
        ``(round, sequence)`` of the last message this node accepted in the run,
        or None before the first.

    Raises
    ------
    SignatureError
        The message is not newer than ``last`` (a replayed or reordered message).
    """
    if last is not None and header.position <= tuple(last):
        raise SignatureError(
            f"Message {header.message_type!r} of round {header.round}, sequence "
            f"{header.sequence} is not newer than round {last[0]}, sequence {last[1]} "
            "already accepted (replayed message). Refusing it."
        )


# --------------------------------------------------------------------------- keys
def generate_signing_key() -> Ed25519PrivateKey:
    """Generate a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted if ``password`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def save_private_key(
    key: Ed25519PrivateKey, path: str | Path, password: bytes | None = None
) -> None:
    """Write a private key as PEM, readable by the owner only."""
    path = Path(path)
    path.write_bytes(private_key_pem(key, password))
    path.chmod(0o600)


def save_public_key(key: Ed25519PublicKey, path: str | Path) -> None:
    """Write a public key as PEM."""
    Path(path).write_bytes(public_key_pem(key))


def load_private_key(
    path: str | Path, password: bytes | None = None
) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from PEM.

    Raises
    ------
    SignatureError
        If the file holds no Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"Cannot read a private key from `{path}`: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"`{path}` holds a {type(key).__name__}, expected an Ed25519 private key."
        )
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key from PEM.

    Raises
    ------
    SignatureError
        If the file holds no Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as err:
        raise SignatureError(f"Cannot read a public key from `{path}`: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"`{path}` holds a {type(key).__name__}, expected an Ed25519 public key."
        )
    return key
