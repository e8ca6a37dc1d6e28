"""Flower ClientApp of FedASR: local training, stage-end work, evaluation.

Message contents are described in ``docs/protocol.md``; record keys come from
``fed_asr.protocol``. What the server sends (stage, round, spectrum, the method's
memory) is read from the message; everything else (epochs, loss weights, the
method's options) from this node's own config.
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
from flwr.clientapp.typing import ClientAppCallable, Mod

from clients.adapter_privacy import privatize_train_reply
from clients.drift import drift_reply
from clients.local_memory import fold_local_statistics, held_local_memory
from clients.records import numpy_record
from clients.secure import handle_secagg, privatized, stage_statistics
from clients.site import Site, site_config, site_from_context
from clients.spectrum_state import local_spectrum, received_spectrum, store_local
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig
from fed_asr.evaluation import score_stage
from fed_asr.methods import MethodMemory
from fed_asr.models import torch_threads
from fed_asr.schedule import update_spectrum
from fed_asr.security.adapter_dp import coarse_num_examples_up
from fed_asr.security.signing import load_public_key
from fed_asr.train import train_stage
from fed_asr.wire import verify_content

# ConfigRecord in context.state: run id -> [round, sequence] last accepted
_SIGNATURE_STATE = "signature-state"


@functools.cache
def _verify_key(path: str) -> Ed25519PublicKey:
    return load_public_key(path)


def _check_signature(msg: Message, context: Context, cfg: ExperimentConfig) -> None:
    """Verify the whole message when this node holds the server's public key.

    The key path comes from the node config (``verify-key``) or
    ``security.verify_key``. The signature must cover every record of the message
    for this run, this node and the type it is delivered as, and its (round,
    sequence) must be newer than the last one accepted in this run. Only then is
    the replay counter advanced; no other state is touched here, and handlers run
    only after this returns.

    Raises
    ------
    SignatureError
        Missing, forged, misaddressed or replayed message: it is refused.
    """
    path = context.node_config.get(P.NODE_VERIFY_KEY) or cfg.security.verify_key
    if not path:
        return
    run = str(context.run_id)
    accepted = context.state.config_records.get(_SIGNATURE_STATE, ConfigRecord())
    last = accepted.get(run)
    position = verify_content(
        _verify_key(str(path)),
        msg.content,
        run_id=context.run_id,
        message_type=msg.metadata.message_type,
        node_id=context.node_id,
        last=(int(last[0]), int(last[1])) if isinstance(last, list) else None,
    )
    context.state[_SIGNATURE_STATE] = ConfigRecord({**accepted, run: list(position)})


def _verified_config(
    msg: Message, context: Context, run_config: Mapping[str, Any] | None
) -> ExperimentConfig:
    """This run's config, after checking the message's signature (nothing loaded)."""
    cfg = site_config(run_config or context.run_config)
    _check_signature(msg, context, cfg)
    return cfg


def _loaded_site(
    msg: Message,
    context: Context,
    run_config: Mapping[str, Any] | None,
    arrays_required: bool = True,
) -> Site:
    """This node's site with the message's adapter weights loaded.

    Call only after the signature was checked (``_verified_config``). A message
    without weights is refused unless ``arrays_required`` is false.
    """
    site = site_from_context(run_config or context.run_config, context.node_config)
    if arrays_required or P.ARRAYS_RECORD in msg.content.array_records:
        state = msg.content[P.ARRAYS_RECORD].to_torch_state_dict()
        get_lora_aggregation(site.cfg.lora.aggregation).load(site.model, state)
    return site


def _prepare(
    msg: Message, context: Context, run_config: Mapping[str, Any] | None
) -> Site:
    """Site of this node with the message's (verified) adapter weights loaded."""
    _verified_config(msg, context, run_config)
    return _loaded_site(msg, context, run_config)


def _memory(msg: Message) -> MethodMemory:
    """The method's memory sent with a train message (``memory-<name>`` records)."""
    return {
        name[len(P.MEMORY_PREFIX) :]: record.to_torch_state_dict()
        for name, record in msg.content.array_records.items()
        if name.startswith(P.MEMORY_PREFIX)
    }


def _stage_end(site: Site, context: Context, stage: int) -> RecordDict:
    """Stage-end reply: what the method's plan asks for (spectrum, statistics)."""
    samples = site.stream.stages[stage].train
    n = len(samples)
    if site.cfg.privacy.dp:  # no exact data size beside a DP release
        n = coarse_num_examples_up(n, site.cfg.privacy.num_examples_granularity)
    metrics = {P.NUM_EXAMPLES_KEY: n, P.PARTITION_ID_KEY: site.partition_id}
    content = RecordDict()
    plan, cfg = site.method.stage_end, site.cfg
    # Under secure aggregation a shared spectrum travels only in the secure round
    secure = plan.spectrum == "shared" and cfg.privacy.secure_spectrum
    if plan.spectrum != "none" and not secure:
        stats = stage_statistics(site, stage)
        if plan.spectrum == "shared":
            # local DP: this release alone is (epsilon, delta)-DP
            arrays = privatized(site, stage, stats.to_arrays())
            content[P.STATS_RECORD] = numpy_record(arrays)
            # The rows' skills travel with them: the server refuses another order
            content[P.CONFIG_RECORD] = ConfigRecord({P.SKILLS_KEY: list(stats.skills)})
        else:
            own = update_spectrum(
                local_spectrum(context, site.stream.skills),
                [stats],
                cfg.spectrum,
                cfg.regularizer.cov_floor,
            )
            store_local(context, own)
    computed = {
        name: site.method.stage_end_statistics(name, site.model, site.collator, samples)
        for name in plan.statistics
    }
    if plan.local_statistics:  # kept in this node's state, never sent
        fold_local_statistics(context, site.method, computed)
    else:
        for name, (sums, count) in computed.items():
            content[P.statistics_record(name)] = ArrayRecord(torch_state_dict=sums)
            metrics[P.statistics_count_key(name)] = count
    content[P.METRICS_RECORD] = MetricRecord(metrics)
    return content


def _evaluation_counts(site: Site, stage: int, samples: Any) -> dict[str, int]:
    """Counts of ``stage``'s test data: both protocols, overall and per skill."""
    scores = score_stage(
        site.model,
        site.collator,
        samples,
        site.cfg.train.eval_batch_size,
        site.skill_answers,
    )
    counts = {P.total_key(stage): scores.total}
    for protocol, correct in scores.correct.items():
        counts[P.correct_key(stage, protocol)] = correct
        for skill, (hit, total) in scores.per_skill[protocol].items():
            counts[P.correct_key(stage, protocol, skill)] = hit
            counts[P.total_key(stage, skill)] = total
    return counts


def _seed(site: Site, config: ConfigRecord) -> int:
    """Seed of this client's data order in this round (deterministic on resume)."""
    round_ = int(config.get(P.GLOBAL_ROUND_KEY, config.get(P.SERVER_ROUND_KEY, 0)))
    return site.cfg.seed * 1_000_003 + round_ * 1009 + site.partition_id


def torch_threads_mod(run_config: Mapping[str, Any] | None = None) -> Mod:
    """A Flower mod handling every message on ``train.torch_threads`` threads.

    The CPU thread count changes results in their last bits, and Ray hands each
    ClientApp its own reservation as its thread count (``fed-asr engine=simulation``:
    ``federation.client_cpus``; ``flwr run``: the federation's
    ``client-resources-num-cpus``, 2 by default), so without this one config gives
    different runs under the two launchers.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = site_config(run_config or context.run_config)
        with torch_threads(cfg.train.torch_threads):
            return call_next(msg, context)

    return mod


def make_client_app(
    run_config: Mapping[str, Any] | None = None, mods: list[Any] | None = None
) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    run_config : Mapping[str, Any] | None
        Overrides the context's run config (Python API runs, where it is empty).
    mods : list | None
        Flower client mods applied to every message, outside
        ``torch_threads_mod`` (always applied, innermost).
    """
    app = ClientApp(mods=[*(mods or []), torch_threads_mod(run_config)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        config = msg.content[P.CONFIG_RECORD]
        stage = int(config[P.STAGE_KEY])
        shared = site.method.stage_end.spectrum == "shared"
        site.method.configure_stage(
            received_spectrum(msg, context, site.stream.skills)
            if shared
            else local_spectrum(context, site.stream.skills)
        )
        memory = _memory(msg)
        local = site.method.stage_end.local_statistics
        memory.update(held_local_memory(context, local))  # this node's own
        site.method.set_memory(site.model, memory)
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
            epochs=site.cfg.federation.local_epochs,
            seed=_seed(site, config),
        )
        metrics = {
            P.NUM_EXAMPLES_KEY: result.num_examples,
            P.PARTITION_ID_KEY: site.partition_id,
            P.TRAIN_SECONDS_KEY: result.seconds,
            **{P.loss_key(k): v for k, v in result.losses.items()},
        }
        lora = get_lora_aggregation(site.cfg.lora.aggregation)
        content = RecordDict(
            {
                P.ARRAYS_RECORD: ArrayRecord(
                    torch_state_dict=lora.exchanged_state(site.model)
                ),
                P.METRICS_RECORD: MetricRecord(metrics),
            }
        )
        content = privatize_train_reply(site, msg, content)  # adapter DP, if on
        return Message(content=content, reply_to=msg)

    @app.query(P.SPECTRUM_ACTION)
    def stage_end(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        stage = int(msg.content[P.CONFIG_RECORD][P.STAGE_KEY])
        return Message(content=_stage_end(site, context, stage), reply_to=msg)

    @app.query(P.SECAGG_ACTION)
    def secagg(msg: Message, context: Context) -> Message:
        # Only the first step needs the model and data: the site is built lazily
        cfg = _verified_config(msg, context, run_config)
        content = handle_secagg(
            msg,
            context,
            cfg,
            lambda: _loaded_site(msg, context, run_config, arrays_required=False),
        )
        return Message(content=content, reply_to=msg)

    @app.query(P.DRIFT_ACTION)
    def drift(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        stage = int(msg.content[P.CONFIG_RECORD][P.STAGE_KEY])
        return Message(content=drift_reply(site, context, stage), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        seen = int(msg.content[P.CONFIG_RECORD][P.NUM_SEEN_STAGES_KEY])
        metrics: dict[str, int] = {P.PARTITION_ID_KEY: site.partition_id}
        for i, stage in enumerate(site.stream.stages[:seen]):
            metrics.update(_evaluation_counts(site, i, stage.test))
        metrics[P.NUM_EXAMPLES_KEY] = sum(metrics[P.total_key(i)] for i in range(seen))
        content = RecordDict({P.METRICS_RECORD: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
