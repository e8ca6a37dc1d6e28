"""The ClientApp Flower loads (``clients.entry:app``): in-process or via a site worker.

On the Deployment Engine a SuperNode starts a fresh ``flwr-clientapp`` process for
every message. Handling it in that process means importing torch, transformers and
peft and loading the base model every time (seconds for the tiny model, a full
checkpoint read for a 7B one). A site that runs a *site worker*
(``fed-asr-site-worker --socket PATH``, a long-lived process that keeps the model
loaded) names its socket in the node config (``site-worker=PATH``); this app then
only forwards the message and its context there and hands back the worker's reply,
importing nothing but Flower.

Without ``site-worker`` (simulation, tests, small sites) the message is handled here
by ``clients.app``, imported on first use. If the worker cannot be reached, or runs
other code than this app, the message is handled here too, with a WARNING: the round
is never lost because a helper process is down. A message the worker *handled* and
refused (a bad signature, a failed check) is refused here as well.

Every message logs one timing line (``[fed-asr] timing ...``): how long the process
had been up when the handler started, and how long handling took; at INFO with a site
worker or ``FED_ASR_LOG_TIMING=1`` in the SuperNode's environment, else at DEBUG (a
simulation would print one per client and round).
"""

from __future__ import annotations

import functools
import os
import time
from logging import DEBUG, INFO, WARNING
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients.worker_protocol import (
    UNAVAILABLE_PREFIX,
    WorkerError,
    code_digest,
    read_key,
    receive_reply,
    send_request,
)
from fed_asr.protocol import NODE_SITE_WORKER

# Set to 1 to log every message's timing at INFO also without a site worker
TIMING_ENV = "FED_ASR_LOG_TIMING"


class SiteClientApp(ClientApp):
    """A ClientApp that hands messages to this site's worker when it has one."""

    def __call__(self, message: Message, context: Context) -> Message:
        """Handle ``message``: by the site worker if configured, else in-process."""
        started = time.monotonic()
        age = process_age()
        socket_path = context.node_config.get(NODE_SITE_WORKER)
        where = "in-process"
        reply = None
        if socket_path:
            try:
                reply = forward(str(socket_path), message, context)
                where = "site worker"
            except WorkerUnavailable as err:
                log(
                    WARNING,
                    "[fed-asr] site worker %s not used (%s); handling %s in this "
                    "process (start it with `fed-asr-site-worker --socket %s`)",
                    socket_path,
                    err,
                    message.metadata.message_type,
                    socket_path,
                )
        if reply is None:
            reply = _local_app()(message, context)
        log(
            INFO if socket_path or os.environ.get(TIMING_ENV) == "1" else DEBUG,
            "[fed-asr] timing %s: process up %.3f s before the handler, "
            "handler %.3f s (%s)",
            message.metadata.message_type,
            age if age is not None else float("nan"),
            time.monotonic() - started,
            where,
        )
        return reply


class WorkerUnavailable(RuntimeError):
    """The worker cannot serve this app (other code, other protocol)."""


def forward(socket_path: str, message: Message, context: Context) -> Message:
    """Have the site worker at ``socket_path`` handle ``message``.

    The context the worker's handler left behind (replay counter, secure
    aggregation state, ...) replaces ``context.state`` so that the SuperNode
    stores it as if the handler had run here.

    Raises
    ------
    WorkerUnavailable
        The worker cannot be reached, died, or runs other code: nothing was
        handled (or nothing came back), and the caller handles the message.
    RuntimeError
        The worker handled the message and refused it (its reason).
    """
    try:
        conn = Client(socket_path, family="AF_UNIX", authkey=read_key(socket_path))
    except (OSError, ValueError, AuthenticationError) as err:
        raise WorkerUnavailable(f"{type(err).__name__}: {err}") from None
    with conn:
        try:
            send_request(conn, _digest(), message, context)
            reply, after = receive_reply(conn)
        except (OSError, EOFError) as err:  # the worker died: nothing came back
            raise WorkerUnavailable(f"{type(err).__name__}: {err}") from None
        except WorkerError as err:
            text = str(err)
            if text.startswith(UNAVAILABLE_PREFIX):
                raise WorkerUnavailable(text[len(UNAVAILABLE_PREFIX) :]) from None
            raise RuntimeError(text) from None
    context.state = after.state
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)


@functools.cache
def _digest() -> str:
    return code_digest()


@functools.cache
def _local_app() -> ClientApp:
    from clients.app import app  # torch, transformers, peft: only when used

    return app


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            # Field 22 (after the parenthesised command name): start time in ticks
            fields = handle.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started


app = SiteClientApp()
