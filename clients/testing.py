"""Fault injection for robustness tests and drills (a Flower client mod)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message

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
