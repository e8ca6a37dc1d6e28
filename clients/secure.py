"""Client side of the secure spectrum round (``privacy.secure_spectrum=true``).

The server drives four ``query.secagg`` exchanges per stage end (``docs/security.md``
section 1); the step is named in the config record. This node computes its
statistics at the first step, keeps them and its protocol secrets in its own
``context.state`` (which never leaves the node) and sends only public keys,
encrypted shares, one masked vector and, at the end, the shares the server needs to
remove the masks. ``fed_asr.security.secagg`` holds the protocol itself.
"""

from __future__ import annotations

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from clients.records import numpy_record
from clients.site import Site
from fed_asr import protocol as P
from fed_asr.security.dp import max_skills_per_sample, noise_generator, privatize_stats
from fed_asr.security.secagg import (
    AdvertiseKeys,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    UnmaskRequest,
)
from fed_asr.spectrum import SkillStats
from fed_asr.train import spectrum_statistics
from fed_asr.wire import record_arrays

_CLIENT_STATE = "secagg-client"  # ConfigRecord in context.state: serialised secrets
_INPUT_STATE = "secagg-input"  # ArrayRecord in context.state: this node's statistics


def secagg_config(config: ConfigRecord) -> SecAggConfig:
    """Protocol parameters sent by the server with every step."""
    return SecAggConfig(
        threshold=int(config[P.SECAGG_THRESHOLD_KEY]),
        bits=int(config[P.SECAGG_BITS_KEY]),
        scale=float(config[P.SECAGG_SCALE_KEY]),
    )


def _load_client(context: Context, session: bytes) -> SecAggClient:
    record = context.state.config_records.get(_CLIENT_STATE)
    if record is None:
        raise SecAggError("No secure-aggregation state on this node; was step 0 lost?")
    client = SecAggClient.from_bytes(bytes(record["blob"]))  # type: ignore[arg-type]
    if client.session != session:
        raise SecAggError(
            f"Secure-aggregation session mismatch: this node holds "
            f"{client.session!r}, the server asks for {session!r}."
        )
    return client


def _store_client(context: Context, client: SecAggClient) -> None:
    context.state[_CLIENT_STATE] = ConfigRecord({"blob": client.to_bytes()})


def _forget(context: Context) -> None:
    for name in (_CLIENT_STATE, _INPUT_STATE):
        if name in context.state:
            del context.state[name]


def stage_statistics(site: Site, stage: int) -> SkillStats:
    """This node's spectrum statistics of ``stage``'s training data.

    Each sample's contribution is clipped to ``privacy.dp_clip`` when DP is on.
    """
    cfg = site.cfg
    return spectrum_statistics(
        site.model,
        site.collator,
        site.stream.stages[stage].train,
        site.stream.skills,
        cfg.regularizer,
        cfg.train.eval_batch_size,
        cfg.model.attn_capture,
        dp_clip=cfg.privacy.dp_clip if cfg.privacy.dp else None,
    )


def privatized(
    site: Site, stage: int, arrays: dict[str, np.ndarray], num_shares: int = 1
) -> dict[str, np.ndarray]:
    """``arrays`` with this node's DP noise for ``stage`` (as they are if DP is off).

    ``num_shares`` as in ``privatize_stats`` (the secagg threshold, else 1).
    """
    cfg = site.cfg
    if not cfg.privacy.dp:
        return arrays
    m = max_skills_per_sample(cfg.regularizer.tau_skill, len(site.stream.skills))
    rng = noise_generator(cfg.privacy, stage, site.partition_id)
    return privatize_stats(arrays, cfg.privacy, m, rng, num_shares=num_shares)


def _private_statistics(
    site: Site, stage: int, threshold: int
) -> dict[str, np.ndarray]:
    """This node's statistics for ``stage``, clipped and noised when DP is on."""
    arrays = stage_statistics(site, stage).to_arrays()
    return privatized(site, stage, arrays, num_shares=threshold)


def handle_secagg(msg: Message, context: Context, site: Site) -> RecordDict:
    """Answer one step of the secure spectrum round."""
    config = msg.content[P.CONFIG_RECORD]
    step = str(config[P.SECAGG_STEP_KEY])
    session = str(config[P.SECAGG_SESSION_KEY]).encode()
    node = int(context.node_id)
    payload = msg.content.config_records.get(P.SECAGG_RECORD, ConfigRecord())
    if step == P.SECAGG_ADVERTISE:
        _forget(context)
        params = secagg_config(config)
        stage = int(config[P.STAGE_KEY])
        arrays = _private_statistics(site, stage, params.threshold)
        client = SecAggClient(node, params, session)
        advert = client.advertise()
        context.state[_INPUT_STATE] = numpy_record(arrays)
        _store_client(context, client)
        samples = len(site.stream.stages[stage].train)
        return RecordDict(
            {
                P.SECAGG_RECORD: ConfigRecord(
                    {
                        "mask-pk": advert.mask_public_key,
                        "enc-pk": advert.encryption_public_key,
                    }
                ),
                P.METRICS_RECORD: MetricRecord(
                    {
                        P.NUM_EXAMPLES_KEY: samples,
                        P.PARTITION_ID_KEY: site.partition_id,
                    }
                ),
            }
        )
    client = _load_client(context, session)
    if step == P.SECAGG_SHARE:
        ids = [int(i) for i in payload["ids"]]  # type: ignore[union-attr]
        book = {
            cid: AdvertiseKeys(cid, bytes(m), bytes(e))
            for cid, m, e in zip(
                ids,
                payload["mask-pks"],  # type: ignore[arg-type]
                payload["enc-pks"],  # type: ignore[arg-type]
                strict=True,
            )
        }
        outbox = client.share_keys(book)
        _store_client(context, client)
        recipients = sorted(outbox)
        reply = ConfigRecord(
            {
                "recipients": [str(r) for r in recipients],
                "ciphertexts": [outbox[r] for r in recipients],
            }
        )
        return RecordDict({P.SECAGG_RECORD: reply})
    if step == P.SECAGG_MASK:
        senders = [int(i) for i in payload.get("senders", [])]  # type: ignore[union-attr]
        blobs = list(payload.get("ciphertexts", []))  # type: ignore[arg-type]
        inbox = dict(zip(senders, (bytes(b) for b in blobs), strict=True))
        arrays = record_arrays(context.state.array_records[_INPUT_STATE])
        masked = client.mask_input(arrays, inbox)
        _store_client(context, client)
        layout = masked.layout.to_json() if masked.layout else "[]"
        return RecordDict(
            {
                P.SECAGG_MASKED_RECORD: numpy_record({"vector": masked.vector}),
                P.SECAGG_RECORD: ConfigRecord({"layout": layout}),
            }
        )
    if step == P.SECAGG_UNMASK:
        request = UnmaskRequest(
            survivors=tuple(int(i) for i in payload.get("survivors", [])),  # type: ignore[union-attr]
            dropped=tuple(int(i) for i in payload.get("dropped", [])),  # type: ignore[union-attr]
        )
        response = client.unmask(request)
        _forget(context)
        return RecordDict(
            {
                P.SECAGG_RECORD: ConfigRecord(
                    {
                        "seed-owners": [str(k) for k in response.seed_shares],
                        "seed-shares": list(response.seed_shares.values()),
                        "key-owners": [str(k) for k in response.mask_key_shares],
                        "key-shares": list(response.mask_key_shares.values()),
                    }
                )
            }
        )
    raise SecAggError(f"Unknown secure-aggregation step {step!r}.")
