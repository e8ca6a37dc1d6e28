"""A site's long-lived worker: keeps the base model loaded between Flower messages.

Run it beside the SuperNode, on the same machine and as the same user::

    fed-asr-site-worker --socket /srv/fed-asr/worker.sock
    flower-supernode ... --node-config "site-worker='/srv/fed-asr/worker.sock' ..."

Every ``flwr-clientapp`` process the SuperNode starts then forwards its message here
(``clients/entry.py``) and exits; this process runs the same ClientApp
(``clients.app``) with its per-process caches, so the model is loaded on the first
message of a model config and reused for every later one: in the next round, the
next stage, and the next run of the same model. Put it on the GPU as usual
(``model.device``, ``model.load_in_4bit`` ... in the run's config).

The socket is created with mode 0600 and guarded by an HMAC key in
``<socket>.key`` (mode 0600, created on first start); messages whose app code
differs from this worker's (another FAB version) are declined, and the app then
handles them itself. One message is handled at a time.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from flwr.app import Context, Message

from clients.worker_protocol import (
    PROTOCOL,
    UNAVAILABLE_PREFIX,
    code_digest,
    read_or_create_key,
    receive_request,
    send_failure,
    send_reply,
)

LOG = logging.getLogger("fed_asr.site_worker")

Handler = Callable[[Message, Context], Message]


def serve(
    socket_path: str | Path,
    handler: Handler | None = None,
    max_connections: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve messages on ``socket_path`` until stopped (or ``max_messages``).

    Parameters
    ----------
    socket_path : str | Path
        Unix socket to listen on; a stale socket file there is replaced.
    handler : Callable | None
        The ClientApp to run (default: ``clients.app.app``).
    max_connections : int | None
        Stop after this many connections, refused ones included (tests);
        ``None`` serves forever.
    on_ready : Callable | None
        Called once the socket accepts connections.

    Returns
    -------
    int
        Number of connections taken.
    """
    path = Path(socket_path)
    if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
        path.unlink()  # left behind by a worker that was killed
    key = read_or_create_key(path)
    if handler is None:
        from clients.app import app as handler  # the heavy imports, once

    digest = code_digest()
    served = 0
    old_umask = os.umask(0o177)  # the socket file is born 0600
    try:
        listener = Listener(str(path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)
    with listener:
        LOG.info("site worker listening on %s (code %s)", path, digest[:12])
        if on_ready is not None:
            on_ready()
        while max_connections is None or served < max_connections:
            served += 1
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, OSError) as err:
                LOG.warning("refused a connection: %s", err)
                continue
            with conn:
                _handle(conn, handler, digest)
    return served


def _handle(conn: Connection, handler: Handler, digest: str) -> None:
    """One request: decline other code, run the handler, send what it returned."""
    started = time.monotonic()
    try:
        header, msg, ctx = receive_request(conn)
    except Exception as err:  # malformed request: nothing to answer
        LOG.warning("malformed request: %s: %s", type(err).__name__, err)
        return
    if header.get("protocol") != PROTOCOL or header.get("digest") != digest:
        send_failure(
            conn,
            f"{UNAVAILABLE_PREFIX}the worker runs other code (protocol {PROTOCOL}, "
            f"code {digest[:12]}) than the app (protocol {header.get('protocol')}, "
            f"code {str(header.get('digest'))[:12]}); restart it from the app's code",
        )
        return
    kind = msg.metadata.message_type
    try:
        reply = handler(msg, ctx)
    except Exception as err:  # the app refused it: so does the ClientApp process
        LOG.warning("%s from node %s refused: %s", kind, ctx.node_id, err)
        send_failure(conn, f"{type(err).__name__}: {err}")
        return
    LOG.info(
        "%s for node %s handled in %.3f s",
        kind,
        ctx.node_id,
        time.monotonic() - started,
    )
    send_reply(conn, reply, ctx)


def main(argv: list[str] | None = None) -> int:
    """``fed-asr-site-worker``: serve this site's ClientApp messages."""
    parser = argparse.ArgumentParser(
        prog="fed-asr-site-worker",
        description="Keep the base model loaded between Flower messages "
        "(node config `site-worker=<socket>`).",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [site-worker] %(message)s"
    )
    folder = Path(args.socket).resolve().parent
    if not folder.is_dir():
        print(f"fed-asr-site-worker: --socket {args.socket}: no folder {folder}")
        return 2
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
