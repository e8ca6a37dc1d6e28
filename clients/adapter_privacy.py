"""Client side of adapter DP: privatise a train reply before it leaves the node.

With ``privacy.dp`` the reply's adapter becomes the received global adapter plus the
clipped, noised update (``fed_asr.security.adapter_dp``) and its ``num-examples`` is
rounded up to a multiple of ``privacy.num_examples_granularity``. Without DP the
reply is returned as it is.

Flower's own DP mods (``fixedclipping_mod``, ``LocalDpMod``) are not used: they
accept only messages with exactly one ``ArrayRecord`` (ours also carry the spectrum,
the method's memory and the signature) and their accounting cannot be composed with
the statistics releases (``docs/security.md``, section 2).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from clients.site import Site
from fed_asr import protocol as P
from fed_asr.security.adapter_dp import (
    adapter_noise_generator,
    calibrate_adapter_noise,
    coarse_num_examples,
    privatize_update,
)


def privatize_train_reply(site: Site, msg: Message, content: RecordDict) -> RecordDict:
    """The train reply ``content`` as this node may send it under its privacy config.

    Parameters
    ----------
    site : Site
        This node's site (its config and partition).
    msg : Message
        The train message; its ``arrays`` are the global adapter training started
        from.
    content : RecordDict
        The reply: ``arrays`` (the trained adapter) and the metrics record.

    Returns
    -------
    RecordDict
        ``content``, with the adapter and ``num-examples`` replaced when DP is on.
    """
    privacy = site.cfg.privacy
    if not privacy.dp:
        return content
    config = msg.content[P.CONFIG_RECORD]
    global_round = int(
        config.get(P.GLOBAL_ROUND_KEY, config.get(P.SERVER_ROUND_KEY, 0))
    )
    received = msg.content[P.ARRAYS_RECORD].to_torch_state_dict()
    trained = content[P.ARRAYS_RECORD].to_torch_state_dict()
    rng = adapter_noise_generator(privacy, global_round, site.partition_id)
    private = privatize_update(received, trained, calibrate_adapter_noise(privacy), rng)
    content[P.ARRAYS_RECORD] = ArrayRecord(torch_state_dict=private)
    metrics = dict(content[P.METRICS_RECORD])
    count = int(metrics[P.NUM_EXAMPLES_KEY])  # type: ignore[call-overload]
    metrics[P.NUM_EXAMPLES_KEY] = coarse_num_examples(
        count, privacy.num_examples_granularity
    )
    content[P.METRICS_RECORD] = MetricRecord(metrics)
    return content
