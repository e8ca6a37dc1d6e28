"""What the ClientApp and a site worker say to each other over a local socket.

A *site worker* (``clients/site_worker.py``) is a long-lived process on a site's own
machine that keeps the base model loaded; the ClientApp process that Flower starts
for every message forwards the message and its context to it (``clients/entry.py``)
instead of importing torch and loading the model again.

The exchange is framed by :mod:`multiprocessing.connection` over a Unix socket
(file mode 0600, HMAC challenge with a key only the site's user can read), and
carries only bytes: a JSON header and Flower's own protobuf encodings of
``Message`` and ``Context``. Nothing is unpickled, so a peer that got onto the
socket could not run code through it.

Request: header ``{"protocol", "digest"}``, message, context.
Reply: header ``{"ok": true}``, reply message, context after the handler; or
header ``{"ok": false, "error": "<type>: <text>"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

PROTOCOL = 1
# Largest frame accepted (a 7B LoRA adapter at rank 64 is ~0.3 GiB in float32)
MAX_FRAME_BYTES = 2 << 30
# The packages whose source must be the same in the app and the worker
CODE_PACKAGES = ("fed_asr", "server", "clients")
# A worker's refusal that means "not handled": the app handles the message itself
UNAVAILABLE_PREFIX = "unavailable: "


class WorkerError(RuntimeError):
    """The site worker refused or failed a message (its reason is the text)."""


def key_path(socket_path: str | Path) -> Path:
    """The file holding the socket's HMAC key: ``<socket>.key`` beside it."""
    return Path(f"{socket_path}.key")


def read_or_create_key(socket_path: str | Path) -> bytes:
    """The socket's key, created (32 random bytes, mode 0600) when missing."""
    path = key_path(socket_path)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return read_key(socket_path)


def read_key(socket_path: str | Path) -> bytes:
    """The socket's key; refuses a key file other users can read."""
    path = key_path(socket_path)
    if os.stat(path).st_mode & 0o077:
        raise PermissionError(f"{path}: the site worker key must be mode 0600")
    key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path}: the site worker key is shorter than 16 bytes")
    return key


def code_digest(root: str | Path | None = None) -> str:
    """SHA-256 over the ``.py`` files of ``CODE_PACKAGES`` under ``root``.

    ``root`` defaults to the folder holding this package. The app (installed from
    the FAB) and the worker (the site's own install) must run the same code, or a
    message would be handled by other rules than the ones the server shipped.
    """
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            digest.update(str(path.relative_to(base)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def send_request(conn: Connection, digest: str, msg: Message, ctx: Context) -> None:
    """Send one message and its context to the worker."""
    conn.send_bytes(_header({"protocol": PROTOCOL, "digest": digest}))
    _send_message_and_context(conn, msg, ctx)


def receive_request(conn: Connection) -> tuple[dict[str, Any], Message, Context]:
    """The header, message and context of one request (the worker's side)."""
    header = _read_header(conn)
    return (header, *_receive_message_and_context(conn))


def send_reply(conn: Connection, reply: Message, ctx: Context) -> None:
    """Send the handler's reply and the context it left behind."""
    conn.send_bytes(_header({"ok": True}))
    _send_message_and_context(conn, reply, ctx)


def send_failure(conn: Connection, error: str) -> None:
    """Tell the app the message failed, and why (one line)."""
    conn.send_bytes(_header({"ok": False, "error": error}))


def receive_reply(conn: Connection) -> tuple[Message, Context]:
    """The reply and context from the worker; raises :class:`WorkerError`."""
    header = _read_header(conn)
    if not header.get("ok"):
        raise WorkerError(str(header.get("error", "the site worker failed")))
    return _receive_message_and_context(conn)


def _send_message_and_context(conn: Connection, msg: Message, ctx: Context) -> None:
    conn.send_bytes(message_to_proto(msg).SerializeToString())
    conn.send_bytes(context_to_proto(ctx).SerializeToString())


def _receive_message_and_context(conn: Connection) -> tuple[Message, Context]:
    msg = message_from_proto(_parse(ProtoMessage, conn))
    return msg, context_from_proto(_parse(ProtoContext, conn))


def _header(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True).encode()


def _read_header(conn: Connection) -> dict[str, Any]:
    header = json.loads(conn.recv_bytes(1 << 16).decode())
    if not isinstance(header, dict):
        raise WorkerError("malformed site worker header")
    return header


def _parse(kind: Any, conn: Connection) -> Any:
    proto = kind()
    proto.ParseFromString(conn.recv_bytes(MAX_FRAME_BYTES))
    return proto
