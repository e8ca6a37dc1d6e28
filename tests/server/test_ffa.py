"""FFA-LoRA and the baselines through the real ClientApp and one small simulation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flower_helpers import (
    first_site,
    make_run_config,
    message,
    node_context,
    set_task_identity,
)
from flwr.app import ArrayRecord, MessageType
from helpers import simulation_metrics

from clients import site as site_module
from clients.app import make_client_app
from clients.site import site_from_context
from clients.spectrum_state import local_spectrum
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.methods.ewc import FISHER
from fed_asr.models import adapter_state, load_base_model, resolve_device
from fed_asr.wire import record_arrays as record_to_numpy

# Only the stage and round travel; epochs and loss weights are the node's own config
TRAIN_CONFIG = {P.STAGE_KEY: 0, P.GLOBAL_ROUND_KEY: 1}
Overrides = Callable[..., list[str]]
SPECTRUM_QUERY = f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


def _server_model(overrides: list[str]):  # type: ignore[no-untyped-def]
    """The server's model, built as ``FederatedRun`` builds it."""
    cfg = compose_config("config", overrides)
    stream = build_stream(cfg.data, cfg.seed)
    base, _ = load_base_model(cfg.model, stream.vocabulary(), resolve_device("cpu"))
    return get_lora_aggregation("ffa").attach(base, cfg.lora, cfg.seed)


def _lora_a(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v for k, v in adapter_state(model).items() if ".lora_A." in k}


def test_ffa_clients_send_only_b_and_keep_the_servers_a(
    run_overrides: Overrides,
) -> None:
    # Prepare: ASR (its geometry term toggles peft adapters) with FFA-LoRA. The
    # token-level L_geo (the pre-issue-13 preset) is positive from the second step
    # on; the paper's pooled B x B term is 0 for a last batch of one sample.
    overrides = run_overrides(
        "ffa",
        **{
            "lora.aggregation": "ffa",
            "regularizer.geometry": "token",
            "regularizer.gamma": 0.05,
            "regularizer.geo_temperature": 0.1,
        },
    )
    run_config = make_run_config(overrides)
    server = _server_model(overrides)
    initial = ArrayRecord(
        torch_state_dict=get_lora_aggregation("ffa").exchanged_state(server)
    )
    app = make_client_app()
    # Execute: two clients train twice (the second round reuses the cached model)
    replies = [
        app(
            message(MessageType.TRAIN, {P.ARRAYS_RECORD: initial}, TRAIN_CONFIG),
            node_context(run_config, p),
        )
        for p in (0, 1, 0, 1)
    ]
    client_model = site_from_context(
        run_config, {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 2}
    ).model
    site_module._MODELS.clear()  # a second, independently built client
    other_model = site_from_context(
        run_config, {P.NODE_PARTITION_ID: 1, P.NODE_NUM_PARTITIONS: 2}
    ).model
    # Assert: A never travels, only B (half the adapter) ...
    assert initial.keys() and all(".lora_B." in k for k in initial.keys())
    assert len(initial.keys()) == len(adapter_state(server)) // 2
    for reply in replies:
        assert not reply.has_error(), reply.error
        sent = record_to_numpy(reply.content[P.ARRAYS_RECORD])
        assert set(sent) == set(initial.keys())
        assert reply.content[P.METRICS_RECORD][P.loss_key("geo")] > 0
    # ... B was trained, and every A equals the server's seeded, frozen A
    assert any(
        not torch.equal(torch.as_tensor(v), initial.to_torch_state_dict()[k])
        for k, v in record_to_numpy(replies[0].content[P.ARRAYS_RECORD]).items()
    )
    for model in (client_model, other_model):
        a = _lora_a(model)
        assert a.keys() == _lora_a(server).keys()
        for key, value in _lora_a(server).items():
            torch.testing.assert_close(a[key], value, atol=0, rtol=0)
        assert not any(
            p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n
        )


def test_asr_local_never_receives_a_spectrum_and_keeps_its_own(
    run_overrides: Overrides,
) -> None:
    # Prepare
    overrides = run_overrides("local", method="asr_local")
    run_config, site, arrays = first_site(overrides)
    context = node_context(run_config, 0)
    app = make_client_app()
    # Execute: stage-end query of stage 0, then a train message of stage 1 (no spectrum)
    reply = app(
        message(SPECTRUM_QUERY, {P.ARRAYS_RECORD: arrays}, {P.STAGE_KEY: 0}), context
    )
    stored = local_spectrum(context, site.stream.skills)
    trained = app(
        message(
            MessageType.TRAIN,
            {P.ARRAYS_RECORD: arrays},
            {**TRAIN_CONFIG, P.STAGE_KEY: 1, P.GLOBAL_ROUND_KEY: 2},
        ),
        context,
    )
    # Assert: nothing spectral travels up, the own spectrum persists and is used
    assert not reply.has_error(), reply.error
    assert P.STATS_RECORD not in reply.content.array_records
    assert stored is not None and float(stored.count.sum()) > 0
    assert not trained.has_error(), trained.error
    assert trained.content[P.METRICS_RECORD][P.loss_key("spec")] > 0
    kept = local_spectrum(context, site.stream.skills)
    assert kept is not None and float(kept.count.sum()) > 0


def test_ewc_stage_end_reply_has_fisher_sums_and_count(
    run_overrides: Overrides,
) -> None:
    # Prepare
    overrides = run_overrides("ewc-client", method="ewc")
    run_config, site, arrays = first_site(overrides)
    # Execute
    reply = make_client_app()(
        message(SPECTRUM_QUERY, {P.ARRAYS_RECORD: arrays}, {P.STAGE_KEY: 0}),
        node_context(run_config, 0),
    )
    # Assert
    assert not reply.has_error(), reply.error
    fisher = record_to_numpy(reply.content[P.statistics_record(FISHER)])
    assert set(fisher) == set(arrays.keys())
    assert all((v >= 0).all() for v in fisher.values())
    assert any(v.sum() > 0 for v in fisher.values())
    count = reply.content[P.METRICS_RECORD][P.statistics_count_key(FISHER)]
    assert count == len(site.stream.stages[0].train) > 0
    assert P.STATS_RECORD not in reply.content.array_records


def test_simulation_ewc_with_ffa_sends_fisher_and_previous_adapter(
    run_overrides: Overrides,
) -> None:
    # Prepare: the one small simulation of this file (2 clients, 2 stages, 1 round each)
    overrides = run_overrides("sim-ewc", method="ewc", **{"lora.aggregation": "ffa"})
    # Execute
    metrics = simulation_metrics(overrides)
    # Assert
    first, second = metrics["rounds"]
    assert metrics["accuracy_matrix"][1][0] is not None
    assert "ewc" not in first["losses"] and second["losses"]["ewc"] > 0
    assert first["bytes_up_extra"] > 0  # Fisher sums at the end of stage 0 ...
    assert first["bytes_down_extra"] == 0  # ... sent with stage 1 (Fisher + anchor)
    assert second["bytes_down_extra"] == 2 * second["bytes_up_adapter"]
    assert second["bytes_down_spectrum"] == 0 and first["bytes_up_spectrum"] == 0
    # only B travels: exactly half of a full adapter per client
    server = _server_model(overrides)
    full = sum(v.numel() * 4 for v in adapter_state(server).values())
    data_bytes = sum(
        v.numel() * 4 for v in adapter_state(server, trainable_only=True).values()
    )
    assert data_bytes * 2 == full
    assert data_bytes * 2 <= first["bytes_up_adapter"] < full * 2 * 1.1
    assert metrics["lora_aggregation"] == "ffa"
