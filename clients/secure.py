"""Client side of the secure spectrum round (``privacy.secure_spectrum=true``).

The server drives five ``query.secagg`` exchanges per stage end (``docs/security.md``
section 1); the step is named in the config record. This node computes its
statistics at the first step, keeps them and its protocol secrets in its own
``context.state`` (which never leaves the node) and sends only public keys (signed
with its site identity key), encrypted shares, one masked vector, its signature of
the survivor set and, at the end, the shares the server needs to remove the masks.

What the server may not choose: this node's threshold is at least its own
``privacy.secagg_threshold`` of the pinned sites (``federation.num_clients`` without
site identities), its DP noise share is computed from that minimum, ``bits`` and
``scale`` are its own, and it masks its statistics of a stage once per run (two sums
over different survivor sets would differ by single inputs).
``fed_asr.security.secagg`` holds the protocol itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from logging import WARNING

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import log

from clients.records import numpy_record
from clients.site import Site
from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig
from fed_asr.security.adapter_dp import coarse_num_examples_up
from fed_asr.security.dp import max_skills_per_sample, noise_generator, privatize_stats
from fed_asr.security.secagg import (
    AdvertiseKeys,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    UnmaskRequest,
)
from fed_asr.security.site_identity import SiteIdentity, load_site_identity
from fed_asr.spectrum import SkillStats
from fed_asr.train import spectrum_statistics
from fed_asr.wire import record_arrays

_CLIENT_STATE = "secagg-client"  # ConfigRecord in context.state: serialised secrets
_INPUT_STATE = "secagg-input"  # ArrayRecord in context.state: this node's statistics
_STAGE_STATE = "secagg-stage"  # ConfigRecord in context.state: the session's stage
# ConfigRecord in context.state: stage -> session whose masked input left this node
_RELEASED_STATE = "secagg-released"


@functools.cache
def _load_identity(identity_key: str, site_keys: str) -> SiteIdentity:
    return load_site_identity(identity_key, site_keys)


@functools.cache
def _warn_unauthenticated() -> None:
    log(
        WARNING,
        "Secure aggregation without site identity keys (node config `%s`/`%s` or "
        "`security.identity_key`/`security.site_keys`): the server is trusted to "
        "relay the key book and survivor sets honestly.",
        P.NODE_IDENTITY_KEY,
        P.NODE_SITE_KEYS,
    )


def site_identity(context: Context, cfg: ExperimentConfig) -> SiteIdentity | None:
    """This node's site identity, from its node config or ``security.*`` (or None).

    Raises
    ------
    SecAggError
        If only one of the identity key and the pinned site list is configured.
    SiteIdentityError
        If either file cannot be used.
    """
    node, security = context.node_config, cfg.security
    key = node.get(P.NODE_IDENTITY_KEY) or security.identity_key
    pinned = node.get(P.NODE_SITE_KEYS) or security.site_keys
    if not key and not pinned:
        _warn_unauthenticated()
        return None
    if not key or not pinned:
        raise SecAggError(
            f"A site identity needs both `{P.NODE_IDENTITY_KEY}` (node config) or "
            f"`security.identity_key`, and `{P.NODE_SITE_KEYS}` or "
            f"`security.site_keys`; got identity key {key!r}, site list {pinned!r}."
        )
    return _load_identity(str(key), str(pinned))


def own_secagg_config(
    cfg: ExperimentConfig, identity: SiteIdentity | None
) -> SecAggConfig:
    """This node's own minimum parameters, from its config alone.

    The threshold is ``privacy.secagg_threshold`` of the pinned sites (of
    ``federation.num_clients`` without site identities).
    """
    sites = len(identity.sites) if identity is not None else cfg.federation.num_clients
    return SecAggConfig.from_privacy_config(cfg.privacy, sites)


def _load_client(
    context: Context, session: bytes, identity: SiteIdentity | None
) -> SecAggClient:
    record = context.state.config_records.get(_CLIENT_STATE)
    if record is None:
        raise SecAggError("No secure-aggregation state on this node; was step 0 lost?")
    blob = bytes(record["blob"])  # type: ignore[arg-type]
    client = SecAggClient.from_bytes(blob, identity)
    if client.session != session:
        raise SecAggError(
            f"Secure-aggregation session mismatch: this node holds "
            f"{client.session!r}, the server asks for {session!r}."
        )
    return client


def _store_client(context: Context, client: SecAggClient) -> None:
    context.state[_CLIENT_STATE] = ConfigRecord({"blob": client.to_bytes()})


def _forget(context: Context) -> None:
    for name in (_CLIENT_STATE, _INPUT_STATE, _STAGE_STATE):
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


def _ids(values: object) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # type: ignore[attr-defined]


def _advertise(
    config: ConfigRecord, context: Context, site: Site, identity: SiteIdentity | None
) -> RecordDict:
    """Step 0: check the parameters, compute the (noised) statistics, send keys."""
    rows = list(config.get(P.SKILLS_KEY, []))  # type: ignore[arg-type]
    if rows != list(site.stream.skills):
        # a sum has no names: rows in another order would merge into wrong skills
        raise SecAggError(
            f"The secure round sums statistics with skill rows {rows}, but this site's "
            f"skills are {list(site.stream.skills)}; refusing to take part."
        )
    own = own_secagg_config(site.cfg, identity)
    params = own.for_session(
        int(config[P.SECAGG_THRESHOLD_KEY]),  # type: ignore[call-overload]
        int(config[P.SECAGG_BITS_KEY]),  # type: ignore[call-overload]
        float(config[P.SECAGG_SCALE_KEY]),  # type: ignore[arg-type]
    )
    stage = int(config[P.STAGE_KEY])  # type: ignore[call-overload]
    session = str(config[P.SECAGG_SESSION_KEY]).encode()
    released = context.state.config_records.get(_RELEASED_STATE, ConfigRecord())
    if str(stage) in released:
        # Two sums over different survivor sets would differ by single inputs
        raise SecAggError(
            f"This node already sent its masked statistics of stage {stage} (session "
            f"{released[str(stage)]!r}); refusing session {session.decode()!r} for "
            "the same stage."
        )
    # The DP share divides the noise by this node's own minimum threshold, whatever
    # larger threshold the server asks for: any t' >= t survivors carry >= sigma^2.
    arrays = _private_statistics(site, stage, own.threshold)
    _forget(context)
    client = SecAggClient(int(context.node_id), params, session, identity)
    advert = client.advertise()
    context.state[_INPUT_STATE] = numpy_record(arrays)
    context.state[_STAGE_STATE] = ConfigRecord({"stage": stage})
    _store_client(context, client)
    samples = len(site.stream.stages[stage].train)
    if site.cfg.privacy.dp:  # no exact data size beside a DP release
        samples = coarse_num_examples_up(
            samples, site.cfg.privacy.num_examples_granularity
        )
    keys = {
        "mask-pk": advert.mask_public_key,
        "enc-pk": advert.encryption_public_key,
        "site": advert.site,
        "signature": advert.signature,
    }
    metrics = {P.NUM_EXAMPLES_KEY: samples, P.PARTITION_ID_KEY: site.partition_id}
    return RecordDict(
        {
            P.SECAGG_RECORD: ConfigRecord(keys),  # type: ignore[arg-type]
            P.METRICS_RECORD: MetricRecord(metrics),
        }
    )


def _step(
    step: str, payload: ConfigRecord, context: Context, client: SecAggClient
) -> RecordDict:
    """Steps 1-4 of a session this node advertised for."""
    if step == P.SECAGG_SHARE:
        ids = _ids(payload["ids"])
        book = {
            cid: AdvertiseKeys(cid, bytes(m), bytes(e), str(site), bytes(sig))
            for cid, m, e, site, sig in zip(
                ids,
                payload["mask-pks"],  # type: ignore[arg-type]
                payload["enc-pks"],  # type: ignore[arg-type]
                payload["sites"],  # type: ignore[arg-type]
                payload["signatures"],  # type: ignore[arg-type]
                strict=True,
            )
        }
        outbox = client.share_keys(book)
        recipients = sorted(outbox)
        reply = {
            "recipients": [str(r) for r in recipients],
            "ciphertexts": [outbox[r] for r in recipients],
        }
        return RecordDict({P.SECAGG_RECORD: ConfigRecord(reply)})  # type: ignore[arg-type]
    if step == P.SECAGG_MASK:
        senders = _ids(payload.get("senders", []))
        blobs = list(payload.get("ciphertexts", []))  # type: ignore[call-overload]
        inbox = dict(zip(senders, (bytes(b) for b in blobs), strict=True))
        arrays = record_arrays(context.state.array_records[_INPUT_STATE])
        masked = client.mask_input(arrays, inbox)
        stage = str(context.state.config_records[_STAGE_STATE]["stage"])
        released = context.state.config_records.get(_RELEASED_STATE, ConfigRecord())
        released[stage] = client.session.decode()
        context.state[_RELEASED_STATE] = released
        layout = masked.layout.to_json() if masked.layout else "[]"
        return RecordDict(
            {
                P.SECAGG_MASKED_RECORD: numpy_record({"vector": masked.vector}),
                P.SECAGG_RECORD: ConfigRecord({"layout": layout}),
            }
        )
    request = UnmaskRequest(
        survivors=_ids(payload.get("survivors", [])),
        dropped=_ids(payload.get("dropped", [])),
    )
    if step == P.SECAGG_CONFIRM:
        signature = client.confirm(request)
        return RecordDict({P.SECAGG_RECORD: ConfigRecord({"signature": signature})})
    if step == P.SECAGG_UNMASK:
        signers = _ids(payload.get("signers", []))
        blobs = list(payload.get("signatures", []))  # type: ignore[call-overload]
        signatures = dict(zip(signers, (bytes(b) for b in blobs), strict=True))
        response = client.unmask(request, signatures)
        reply = {
            "seed-owners": [str(k) for k in response.seed_shares],
            "seed-shares": list(response.seed_shares.values()),
            "key-owners": [str(k) for k in response.mask_key_shares],
            "key-shares": list(response.mask_key_shares.values()),
        }
        return RecordDict({P.SECAGG_RECORD: ConfigRecord(reply)})  # type: ignore[arg-type]
    raise SecAggError(f"Unknown secure-aggregation step {step!r}.")


def handle_secagg(
    msg: Message,
    context: Context,
    cfg: ExperimentConfig,
    load_site: Callable[[], Site],
) -> RecordDict:
    """Answer one step of the secure spectrum round.

    ``load_site`` is called only at the first step (advertise), the one that computes
    this node's statistics; steps 1-4 need the config and the node state alone, so
    a ClientApp started per message does not load the model and data for them.
    Any refusal (a bad key book, a lowered threshold, an unconfirmed survivor set)
    ends this node's session: its secrets are forgotten and the error is the reply.
    """
    config = msg.content[P.CONFIG_RECORD]
    step = str(config[P.SECAGG_STEP_KEY])
    identity = site_identity(context, cfg)
    if step == P.SECAGG_ADVERTISE:
        return _advertise(config, context, load_site(), identity)
    session = str(config[P.SECAGG_SESSION_KEY]).encode()
    client = _load_client(context, session, identity)
    payload = msg.content.config_records.get(P.SECAGG_RECORD, ConfigRecord())
    try:
        reply = _step(step, payload, context, client)
    except (SecAggError, ValueError, KeyError):
        _forget(context)
        raise
    if step == P.SECAGG_UNMASK:
        _forget(context)
    else:
        _store_client(context, client)
    return reply
