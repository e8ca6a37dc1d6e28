"""Flower ClientApp of FedASR: local training, stage-end spectrum statistics, evaluation.

Message contents are described in ``docs/protocol.md``; record keys come from
``fed_asr.protocol``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site import Site, site_from_context
from fed_asr import protocol as P
from fed_asr.models import adapter_state, load_adapter_state
from fed_asr.spectrum import SkillSpectrum
from fed_asr.train import evaluate_samples, spectrum_statistics, train_stage
from server.records import numpy_record, record_to_numpy


def _prepare(msg: Message, context: Context, run_config: Mapping[str, Any] | None) -> Site:
    """Site of this node with the message's adapter weights loaded."""
    site = site_from_context(run_config or context.run_config, context.node_config)
    state = msg.content[P.ARRAYS_RECORD].to_torch_state_dict()
    load_adapter_state(site.model, state)
    return site


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
        spectrum = None
        if P.SPECTRUM_RECORD in msg.content:
            arrays = record_to_numpy(msg.content[P.SPECTRUM_RECORD])
            spectrum = SkillSpectrum.from_arrays(arrays, tuple(site.stream.skills))
        site.method.configure_stage(
            spectrum, float(config[P.BETA_KEY]), float(config[P.GAMMA_KEY])
        )
        samples = site.stream.stages[stage].train
        torch.manual_seed(_seed(site, config))
        result = train_stage(
            site.model, site.collator, samples, site.stream.skills, site.method,
            site.cfg.train, site.cfg.regularizer, capture_mode=site.cfg.model.attn_capture,
            epochs=int(config[P.LOCAL_EPOCHS_KEY]), seed=_seed(site, config),
        )
        metrics = {
            P.NUM_EXAMPLES_KEY: result.num_examples,
            P.PARTITION_ID_KEY: site.partition_id,
            P.TRAIN_SECONDS_KEY: result.seconds,
            **{P.loss_key(k): v for k, v in result.losses.items()},
        }
        content = RecordDict({
            P.ARRAYS_RECORD: ArrayRecord(torch_state_dict=adapter_state(site.model)),
            P.METRICS_RECORD: MetricRecord(metrics),
        })
        return Message(content=content, reply_to=msg)

    @app.query(P.SPECTRUM_ACTION)
    def spectrum(msg: Message, context: Context) -> Message:
        site = _prepare(msg, context, run_config)
        stage = int(msg.content[P.CONFIG_RECORD][P.STAGE_KEY])
        samples = site.stream.stages[stage].train
        stats = spectrum_statistics(
            site.model, site.collator, samples, site.stream.skills, site.cfg.regularizer,
            site.cfg.train.eval_batch_size, site.cfg.model.attn_capture,
        )
        metrics = {P.NUM_EXAMPLES_KEY: len(samples), P.PARTITION_ID_KEY: site.partition_id}
        content = RecordDict({
            P.STATS_RECORD: numpy_record(stats.to_arrays()),
            P.METRICS_RECORD: MetricRecord(metrics),
        })
        return Message(content=content, reply_to=msg)

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
