"""The ClientApp driven with real Flower messages (no simulation engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_helpers import (
    first_site,
    make_run_config,
    message,
    node_context,
    set_task_identity,
)
from flwr.app import MessageType
from helpers import record_threads

import clients.app as app_module
from clients.app import make_client_app, torch_threads_mod
from clients.site import site_from_context
from fed_asr import protocol as P
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.spectrum import SkillStats
from fed_asr.spectrum_strategies import get_spectrum_strategy
from fed_asr.train import spectrum_statistics
from fed_asr.wire import record_arrays as record_to_numpy


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


@pytest.fixture
def setup(run_overrides):  # type: ignore[no-untyped-def]
    overrides = run_overrides("client")
    run_config, _, arrays = first_site(overrides)
    return overrides, run_config, arrays


def test_spectrum_round_sum_equals_statistics_of_union(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    overrides, run_config, arrays = setup
    app = make_client_app()
    msg_type = f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"
    # Execute: both clients describe stage 0 under the same global adapter
    replies = [
        app(
            message(msg_type, {P.ARRAYS_RECORD: arrays}, {P.STAGE_KEY: 0}),
            node_context(run_config, p, 2),
        )
        for p in (0, 1)
    ]
    client_stats = [
        SkillStats.from_arrays(
            record_to_numpy(r.content[P.STATS_RECORD]),
            ("shape", "color", "existence", "negated_existence"),
        )
        for r in replies
    ]
    # Assert: pooled merge of the clients == statistics of the union, computed centrally
    cfg = compose_config("config", overrides)
    stream = build_stream(cfg.data, cfg.seed)
    site = site_from_context(
        run_config, {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 2}
    )
    union = spectrum_statistics(
        site.model,
        site.collator,
        stream.stages[0].train,
        stream.skills,
        cfg.regularizer,
        batch_size=32,
        capture_mode="selective",
    )
    summed = client_stats[0] + client_stats[1]
    torch.testing.assert_close(summed.count, union.count, atol=0, rtol=0)
    torch.testing.assert_close(summed.sum, union.sum, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(summed.sumsq, union.sumsq, atol=1e-6, rtol=1e-6)
    merged = get_spectrum_strategy("pooled").merge(
        client_stats, cfg.spectrum, cfg.regularizer.cov_floor
    )
    direct = union.to_prototypes(cfg.regularizer.cov_floor)
    torch.testing.assert_close(merged.mean, direct.mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged.var, direct.var, atol=1e-6, rtol=1e-6)
    assert sum(
        int(r.content[P.METRICS_RECORD][P.NUM_EXAMPLES_KEY]) for r in replies
    ) == len(stream.stages[0].train)


def test_train_client_without_stage_data_replies_zero_examples(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 24 samples over 64 partitions leaves some partitions empty
    _, run_config, arrays = setup
    app = make_client_app()
    empty = next(
        p
        for p in range(64)
        if not site_from_context(
            run_config, {P.NODE_PARTITION_ID: p, P.NODE_NUM_PARTITIONS: 64}
        )
        .stream.stages[0]
        .train
    )
    # Only the stage and round travel; epochs and loss weights are the node's config
    config = {P.STAGE_KEY: 0, P.GLOBAL_ROUND_KEY: 1}
    # Execute
    reply = app(
        message(MessageType.TRAIN, {P.ARRAYS_RECORD: arrays}, config),
        node_context(run_config, empty, 64),
    )
    # Assert
    assert not reply.has_error()
    assert reply.content[P.METRICS_RECORD][P.NUM_EXAMPLES_KEY] == 0
    sent = record_to_numpy(arrays)
    returned = record_to_numpy(reply.content[P.ARRAYS_RECORD])
    assert sent.keys() == returned.keys()
    for key in sent:
        np.testing.assert_array_equal(sent[key], returned[key])


def test_train_then_evaluate_reports_losses_and_counts(setup) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    _, run_config, arrays = setup
    app = make_client_app()
    # Only the stage and round travel; epochs and loss weights are the node's config
    config = {P.STAGE_KEY: 0, P.GLOBAL_ROUND_KEY: 1}
    # Execute
    reply = app(
        message(MessageType.TRAIN, {P.ARRAYS_RECORD: arrays}, config),
        node_context(run_config, 0, 2),
    )
    evaluation = app(
        message(
            MessageType.EVALUATE,
            {P.ARRAYS_RECORD: reply.content[P.ARRAYS_RECORD]},
            {P.NUM_SEEN_STAGES_KEY: 2},
        ),
        node_context(run_config, 0, 2),
    )
    # Assert
    metrics = reply.content[P.METRICS_RECORD]
    assert metrics[P.NUM_EXAMPLES_KEY] > 0
    assert np.isfinite(metrics[P.loss_key("task")])
    assert P.loss_key("geo") in metrics
    changed = any(
        not np.array_equal(a, b)
        for a, b in zip(
            record_to_numpy(arrays).values(),
            record_to_numpy(reply.content[P.ARRAYS_RECORD]).values(),
            strict=True,
        )
    )
    assert changed
    eval_metrics = evaluation.content[P.METRICS_RECORD]
    for stage in (0, 1):
        assert (
            0 <= eval_metrics[P.correct_key(stage)] <= eval_metrics[P.total_key(stage)]
        )
    assert eval_metrics[P.total_key(0)] > 0


def test_torch_threads_mod_pins_and_restores_the_thread_count() -> None:
    # Prepare: a count the process does not have
    run_config = make_run_config(["train.torch_threads=3"])
    before = torch.get_num_threads()
    seen: list[int] = []

    def handler(msg, context):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        raise RuntimeError("handler failed")

    # Execute: the count is restored also when the handler raises
    with pytest.raises(RuntimeError, match="handler failed"):
        torch_threads_mod(run_config)(
            message(MessageType.TRAIN, {}, {}),
            node_context(run_config, 0, 2),
            handler,
        )

    # Assert
    assert seen == [3]
    assert torch.get_num_threads() == before


def test_client_app_computes_on_torch_threads(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Prepare: spy on the evaluation the handler runs
    _, run_config, arrays = setup
    seen = record_threads(monkeypatch, app_module, "score_stage")
    torch.set_num_threads(2)

    # Execute
    make_client_app()(
        message(
            MessageType.EVALUATE, {P.ARRAYS_RECORD: arrays}, {P.NUM_SEEN_STAGES_KEY: 1}
        ),
        node_context(run_config, 0, 2),
    )

    # Assert: `train.torch_threads` (default 1), whatever the process has
    assert seen == [1]
    assert torch.get_num_threads() == 2
