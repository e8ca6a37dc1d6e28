"""A long-lived task executor for a SuperNode in process isolation mode.

With ``flower-supernode --isolation process`` the SuperNode launches nothing itself:
an executor acquires its tasks over the SuperNode's Runtime API. Flower's own
(``flower-superexec``) starts one ``flwr-clientapp`` process per task, which costs
about a second per message before any of our code runs (interpreter, Flower's
imports, FAB extraction). This executor runs every task in *its own* process:

    flower-supernode ... --isolation process --port 9094
    fed-asr-site-executor --runtime-api-address 127.0.0.1:9094 --insecure

Each task goes through the same steps as ``flwr-clientapp`` (pull the message,
context, run and FAB; run the app; push the reply and the context; heartbeats while
it runs) using Flower's own functions for each; the FAB is installed and its
ClientApp loaded once per FAB hash, and the ClientApp's per-process caches keep the
base model loaded between messages. Tasks run one at a time, in the order acquired.
Flower's task protocol is internal to Flower: this module targets the pinned
``flwr>=1.41,<1.42`` and is checked end to end by the loopback deployment test.
"""

from __future__ import annotations

import argparse
import sys
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

POLL_SECONDS = 0.2
# Flower waits 1 s before retrying an object the SuperNode has not received yet
# (then 2, 4, ... s): most messages with arrays paid that second. Retry sooner.
PULL_BACKOFF_SECONDS = 0.02
PULL_BACKOFF_CAP_SECONDS = 1.0


class SiteExecutor:
    """Acquires ClientApp tasks from one SuperNode and runs them in this process."""

    def __init__(
        self,
        runtime_api_address: str,
        insecure: bool = True,
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.insecure = insecure
        self.root_certificates = root_certificates
        self._apps: dict[str, ClientApp] = {}
        self._load = get_load_client_app_fn(
            default_app_ref="", app_path=None, multi_app=True
        )

    def _client(self, component: str, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until stopped (or ``max_tasks``); returns the count."""
        client = self._client("SuperExec")
        done = 0
        try:
            while max_tasks is None or done < max_tasks:
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                )
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    done += 1
                else:
                    time.sleep(POLL_SECONDS)
        finally:
            client.close()
        return done

    def run_task(self, token: str) -> None:
        """Run one task: pull its inputs, run the ClientApp, push reply and context."""
        started = time.monotonic()
        client = self._client("flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            app = self._app(run.fab_id, run.fab_version, fab.hash_str, fab.content)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # as flwr-clientapp: the error travels back
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            if isinstance(err, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            reason = f"{type(err)}:<'{err}'>"
            log(ERROR, "[fed-asr] site executor: the ClientApp raised", exc_info=err)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(
                    client=client, context=context, sub_status=status, details=details
                )
            finally:
                heartbeat.stop()
                client.close()
        kind = message.metadata.message_type if message is not None else "?"
        log(
            INFO,
            "[fed-asr] site executor: %s %s in %.3f s",
            kind,
            "done" if status == SubStatus.COMPLETED else "failed",
            time.monotonic() - started,
        )

    def _app(
        self, fab_id: str, version: str, fab_hash: str, content: bytes
    ) -> ClientApp:
        """The ClientApp of this FAB, installed and loaded on its first task."""
        if fab_hash not in self._apps:
            install_from_fab(content, skip_prompt=True)
            self._apps[fab_hash] = self._load(fab_id, version, fab_hash)
        return self._apps[fab_hash]


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and FAB, as ``flwr-clientapp`` pulls them.

    The same Runtime API calls and Flower's own object inflation, with a short
    initial retry delay for objects the SuperNode is still receiving.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from the Runtime API")
    node = Node(node_id=context.node_id)
    tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=PULL_BACKOFF_SECONDS,
        backoff_cap=PULL_BACKOFF_CAP_SECONDS,
    )
    # The inflated message does not carry its own id (its object id): set it
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run_from_proto(res.run), fab_from_proto(res.fab)


def main(argv: list[str] | None = None) -> int:
    """``fed-asr-site-executor``: run a SuperNode's ClientApp tasks in one process."""
    parser = argparse.ArgumentParser(
        prog="fed-asr-site-executor",
        description="Run a SuperNode's ClientApp tasks (--isolation process) in one "
        "long-lived process, keeping the base model loaded.",
    )
    parser.add_argument("--runtime-api-address", required=True)
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true")
    security.add_argument("--root-certificates", type=Path)
    args = parser.parse_args(argv)
    certificates = (
        args.root_certificates.read_bytes() if args.root_certificates else None
    )
    executor = SiteExecutor(args.runtime_api_address, args.insecure, certificates)
    log(INFO, "[fed-asr] site executor on %s", args.runtime_api_address)
    try:
        executor.serve()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
