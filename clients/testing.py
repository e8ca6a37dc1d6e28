"""Fault injection and an in-process grid for robustness tests and drills."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fed_asr import protocol as P

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def failing_mod(partition_id: int, global_round: int) -> Mod:
    """A mod that makes one partition raise in one global training round.

    Parameters
    ----------
    partition_id : int
        Node config ``partition-id`` of the client that fails.
    global_round : int
        Global round (``global-round`` in the train config) in which it fails.
    """

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        config = msg.content.config_records.get(P.CONFIG_RECORD)
        is_train = msg.metadata.message_type.startswith("train")
        if (
            is_train
            and config is not None
            and int(config.get(P.GLOBAL_ROUND_KEY, -1)) == global_round
            and int(context.node_config.get(P.NODE_PARTITION_ID, -1)) == partition_id
        ):
            raise RuntimeError(
                f"injected failure: partition {partition_id}, round {global_round}"
            )
        return call_next(msg, context)

    return mod


# A hook that may rewrite (or drop, by returning None) a client's reply in a drill
ReplyHook = Callable[[int, Message, Message], Message | None]


class LoopbackGrid(Grid):
    """A ``Grid`` that delivers messages to in-process ClientApps, one per node.

    Every message and reply goes through Flower's protobuf serialisation, as on the
    wire; each node keeps its own ``Context`` (and so its ``context.state``) across
    messages, as a SuperNode does. For protocol tests and drills without Ray: a node
    can be made to drop out (``drop``) or its replies rewritten (``on_reply``).

    Parameters
    ----------
    apps : dict[int, ClientApp]
        ClientApp per node id.
    contexts : dict[int, Context]
        Context per node id (node config with the partition).
    run_id : int
        Run id stamped on every message.
    """

    def __init__(
        self,
        apps: dict[int, ClientApp],
        contexts: dict[int, Context],
        run_id: int = 7,
    ) -> None:
        self.apps = apps
        self.contexts = contexts
        self._run = Run.create_empty(run_id)
        # Called with each node's own copy of a message: may alter it; True drops it
        self.drop: Callable[[int, Message], bool] = lambda node, msg: False
        self.on_reply: ReplyHook | None = None
        self._replies: dict[str, Message] = {}
        self._count = 0

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to one node."""
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            group_id=group_id,
        )

    def get_node_ids(self) -> list[int]:
        """Node ids, sorted."""
        return sorted(self.apps)

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node not in self.apps:
            return None
        self._count += 1
        msg.metadata.__dict__["_run_id"] = self._run.run_id
        msg.metadata.__dict__["_message_id"] = f"m{self._count}"
        wire = message_from_proto(message_to_proto(msg))  # this node's own copy
        if self.drop(node, wire):
            return None
        try:
            reply = self.apps[node](wire, self.contexts[node])
        except Exception as err:  # as a SuperNode: the error travels back as a reply
            reason = f"{type(err).__name__}: {err}"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=wire,
            )
        reply = message_from_proto(message_to_proto(reply))
        if self.on_reply is not None:
            return self.on_reply(node, wire, reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; keep the replies for ``pull_messages``."""
        ids = []
        for msg in messages:
            reply = self._deliver(msg)
            self._count += 1
            key = f"r{self._count}"
            if reply is not None:
                self._replies[key] = reply
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies of the given message ids (dropped nodes have none)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
    ) -> list[Message]:
        """Deliver and return the replies that came back."""
        return self.pull_messages(self.push_messages(messages))


def nan_reply_mod(partition_id: int, global_round: int) -> Mod:
    """A mod that puts a NaN into one partition's train reply in one global round."""

    def mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        reply = call_next(msg, context)
        config = msg.content.config_records.get(P.CONFIG_RECORD)
        if (
            msg.metadata.message_type.startswith("train")
            and not reply.has_error()
            and config is not None
            and int(config.get(P.GLOBAL_ROUND_KEY, -1)) == global_round
            and int(context.node_config.get(P.NODE_PARTITION_ID, -1)) == partition_id
        ):
            record = reply.content.array_records[P.ARRAYS_RECORD]
            arrays = {name: array.numpy().copy() for name, array in record.items()}
            first = sorted(arrays)[0]
            arrays[first].flat[0] = float("nan")
            reply.content[P.ARRAYS_RECORD] = ArrayRecord(
                {name: Array(value) for name, value in arrays.items()}
            )
        return reply

    return mod


def node_contexts(
    run_config: dict[str, str],
    num_partitions: int,
    run_id: int,
    node_config: Callable[[int], dict[str, str]] | None = None,
    first_node: int = 1000,
) -> dict[int, Context]:
    """One fresh ``Context`` per partition for a ``LoopbackGrid``, keyed by node id.

    Node ``first_node + p`` holds partition ``p``; ``node_config(p)`` adds entries
    to its node config (site identities, keys).
    """
    return {
        first_node + p: Context(
            run_id=run_id,
            node_id=first_node + p,
            node_config={
                P.NODE_PARTITION_ID: p,
                P.NODE_NUM_PARTITIONS: num_partitions,
                **(node_config(p) if node_config else {}),
            },
            state=RecordDict(),
            run_config=run_config,
        )
        for p in range(num_partitions)
    }
