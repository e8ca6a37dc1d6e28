"""Flower ClientApp of FedASR: local training, stage-end statistics, evaluation.

Message contents are described in ``docs/protocol.md``; record keys come from
``fed_asr.protocol``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients.secure import handle_secagg
from clients.site import Site, site_from_context
from fed_asr import protocol as P
from fed_asr.baselines import (
    FISHER_COUNT_KEY,
    FISHER_RECORD,
    LOCAL_SPECTRUM_STATE,
    PREVIOUS_ADAPTER_RECORD,
    fisher_sums,
    update_local_spectrum,
)
from fed_asr.lora_aggregation import get_lora_aggregation
from fed_asr.methods import StageMemory
from fed_asr.security.dp import max_skills_per_sample, noise_generator, privatize_stats
from fed_asr.security.signing import load_public_key
from fed_asr.spectrum import SkillSpectrum
from fed_asr.train import evaluate_samples, spectrum_statistics, train_stage
from server.records import numpy_record, record_to_numpy
from server.signatures import verify_message

_SIGNATURE_STATE = "signature-state"  # ConfigRecord in context.state: last round
_SPECTRUM_STATE = "global-spectrum"  # ArrayRecord in context.state: last one received
_SPECTRUM_VERSION_STATE = "global-spectrum-version"  # ConfigRecord: its version


@functools.cache
def _verify_key(path: str) -> Ed25519PublicKey:
    return load_public_key(path)


def _check_signature(msg: Message, context: Context, site: Site) -> None:
    """Verify the server's signature when this node holds its public key.

    The key path comes from the node config (``verify-key``) or
    ``security.verify_key``. The signed round must not go backwards (replay).

    Raises
    ------
    SignatureError
        Missing, forged or replayed signature: the message is refused.
    """
    path = context.node_config.get(P.NODE_VERIFY_KEY) or site.cfg.security.verify_key
    if not path:
        return
    state = context.state.config_records.get(_SIGNATURE_STATE)
    last = int(state["round"]) if state is not None else 0  # type: ignore[arg-type]
    round_ = verify_message(_verify_key(str(path)), msg, last)
    context.state[_SIGNATURE_STATE] = ConfigRecord({"round": round_})


def _site(msg: Message, context: Context, run_config: Mapping[str, Any] | None) -> Site:
    """This node's site, after checking the message's signature."""
    site = site_from_context(run_config or context.run_config, context.node_config)
    _check_signature(msg, context, site)
    return site


def _prepare(
    msg: Message, context: Context, run_config: Mapping[str, Any] | None
) -> Site:
    """Site of this node with the message's (verified) adapter weights loaded."""
    site = _site(msg, context, run_config)
    state = msg.content[P.ARRAYS_RECORD].to_torch_state_dict()
    get_lora_aggregation(site.cfg.lora.aggregation).load(site.model, state)
    return site


def _local_spectrum(context: Context, site: Site) -> SkillSpectrum | None:
    """This node's own spectrum (``asr_local``), persisted in ``context.state``."""
    if LOCAL_SPECTRUM_STATE not in context.state:
        return None
    arrays = record_to_numpy(context.state[LOCAL_SPECTRUM_STATE])
    return SkillSpectrum.from_arrays(arrays, tuple(site.stream.skills))


def _spectrum(msg: Message, context: Context, site: Site) -> SkillSpectrum | None:
    """The global spectrum of this round, or this node's own one (``asr_local``).

    The server sends the global spectrum only when it changed since this node last
    received it (``spectrum-version``); the node keeps it in its own state.

    Raises
    ------
    RuntimeError
        The named version was never received here (e.g. the node restarted and lost
        its state): the reply is an error, and the server sends it again next round.
    """
    skills = tuple(site.stream.skills)
    config = msg.content[P.CONFIG_RECORD]
    if P.SPECTRUM_RECORD in msg.content.array_records:
        record = msg.content.array_records[P.SPECTRUM_RECORD]
        spectrum = SkillSpectrum.from_arrays(record_to_numpy(record), skills)
        context.state[_SPECTRUM_STATE] = record
        version = str(config.get(P.SPECTRUM_VERSION_KEY, ""))
        context.state[_SPECTRUM_VERSION_STATE] = ConfigRecord({"version": version})
        return spectrum
    if P.SPECTRUM_VERSION_KEY in config:
        wanted = str(config[P.SPECTRUM_VERSION_KEY])
        held = context.state.config_records.get(_SPECTRUM_VERSION_STATE)
        if held is None or str(held["version"]) != wanted:
            raise RuntimeError(
                f"Global spectrum {wanted} was never received by this node (state "
                "lost?); the server sends it again in the next round."
            )
        arrays = record_to_numpy(context.state.array_records[_SPECTRUM_STATE])
        return SkillSpectrum.from_arrays(arrays, skills)
    if site.method.keeps_local_spectrum:
        return _local_spectrum(context, site)
    return None


def _memory(msg: Message) -> StageMemory:
    """Method memory sent with a train message (previous adapter, Fisher)."""
    records = msg.content.array_records
    previous, fisher = records.get(PREVIOUS_ADAPTER_RECORD), records.get(FISHER_RECORD)
    return StageMemory(
        previous=previous.to_torch_state_dict() if previous is not None else None,
        fisher=fisher.to_torch_state_dict() if fisher is not None else None,
    )


def _stage_end(site: Site, context: Context, stage: int) -> RecordDict:
    """Stage-end reply: statistics (shared or kept locally) and/or Fisher sums."""
    samples = site.stream.stages[stage].train
    metrics = {P.NUM_EXAMPLES_KEY: len(samples), P.PARTITION_ID_KEY: site.partition_id}
    content = RecordDict()
    method = site.method
    if method.shares_spectrum or method.keeps_local_spectrum:
        privacy = site.cfg.privacy
        stats = spectrum_statistics(
            site.model,
            site.collator,
            samples,
            site.stream.skills,
            site.cfg.regularizer,
            site.cfg.train.eval_batch_size,
            site.cfg.model.attn_capture,
            dp_clip=privacy.dp_clip if privacy.dp else None,
        )
        if method.shares_spectrum:
            arrays = stats.to_arrays()
            if privacy.dp:  # local DP: this release alone is (epsilon, delta)-DP
                m = max_skills_per_sample(
                    site.cfg.regularizer.tau_skill, len(site.stream.skills)
                )
                rng = noise_generator(privacy, stage, site.partition_id)
                arrays = privatize_stats(arrays, privacy, m, rng)
            content[P.STATS_RECORD] = numpy_record(arrays)
        if method.keeps_local_spectrum:
            own = update_local_spectrum(
                _local_spectrum(context, site),
                stats,
                site.cfg.spectrum,
                site.cfg.regularizer.cov_floor,
            )
            if own is not None:
                context.state[LOCAL_SPECTRUM_STATE] = numpy_record(own.to_arrays())
    if method.needs_fisher:
        sums, count = fisher_sums(
            site.model, site.collator, samples, site.cfg.method.ewc_fisher_batch_size
        )
        content[FISHER_RECORD] = ArrayRecord(torch_state_dict=sums)
        metrics[FISHER_COUNT_KEY] = count
    content[P.METRICS_RECORD] = MetricRecord(metrics)
    return content


def _seed(site: Site, config: ConfigRecord) -> int:
    """Seed of this client's data order in this round (deterministic on resume)."""
    round_ = int(config.get(P.GLOBAL_ROUND_KEY, config.get(P.SERVER_ROUND_KEY, 0)))
    return site.cfg.seed * 1_000_003 + round_ * 1009 + site.partition_id


def make_client_app(
    run_config: Mapping[str, Any] | None = None, mods: list[Any] | None = None
) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    run_config : Mapping[str, Any] | None
        Overrides the context's run config (Python API runs, where it is empty).
    mods : list | None
        Flower client mods applied to every message.
    """
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        config = msg.content[P.CONFIG_RECORD]
        stage = int(config[P.STAGE_KEY])
        site.method.configure_stage(
            _spectrum(msg, context, site),
            float(config[P.BETA_KEY]),
            float(config[P.GAMMA_KEY]),
        )
        site.method.set_memory(site.model, _memory(msg))
        samples = site.method.training_samples(site.stream.stages, stage)
        torch.manual_seed(_seed(site, config))
        result = train_stage(
            site.model,
            site.collator,
            samples,
            site.stream.skills,
            site.method,
            site.cfg.train,
            site.cfg.regularizer,
            capture_mode=site.cfg.model.attn_capture,
            epochs=int(config[P.LOCAL_EPOCHS_KEY]),
            seed=_seed(site, config),
        )
        metrics = {
            P.NUM_EXAMPLES_KEY: result.num_examples,
            P.PARTITION_ID_KEY: site.partition_id,
            P.TRAIN_SECONDS_KEY: result.seconds,
            **{P.loss_key(k): v for k, v in result.losses.items()},
        }
        content = RecordDict(
            {
                P.ARRAYS_RECORD: ArrayRecord(
                    torch_state_dict=get_lora_aggregation(
                        site.cfg.lora.aggregation
                    ).exchanged_state(site.model)
                ),
                P.METRICS_RECORD: MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.query(P.SPECTRUM_ACTION)
    def spectrum(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        stage = int(msg.content[P.CONFIG_RECORD][P.STAGE_KEY])
        return Message(content=_stage_end(site, context, stage), reply_to=msg)

    @app.query(P.SECAGG_ACTION)
    def secagg(msg: Message, context: Context) -> Message:
        if P.ARRAYS_RECORD in msg.content.array_records:
            site = _prepare(msg, context, run_config)
        else:
            site = _site(msg, context, run_config)
        return Message(content=handle_secagg(msg, context, site), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        seen = int(msg.content[P.CONFIG_RECORD][P.NUM_SEEN_STAGES_KEY])
        metrics: dict[str, int] = {P.PARTITION_ID_KEY: site.partition_id}
        for i, stage in enumerate(site.stream.stages[:seen]):
            correct, total = evaluate_samples(
                site.model, site.collator, stage.test, site.cfg.train.eval_batch_size
            )
            metrics[P.correct_key(i)], metrics[P.total_key(i)] = correct, total
        metrics[P.NUM_EXAMPLES_KEY] = sum(metrics[P.total_key(i)] for i in range(seen))
        content = RecordDict({P.METRICS_RECORD: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
