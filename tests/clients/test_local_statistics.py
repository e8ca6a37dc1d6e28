"""Statistics a client keeps to itself: ``ewc_local`` through the real ClientApp."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flower_helpers import first_site, message, node_context, set_task_identity
from flwr.app import MessageType
from helpers import simulation_metrics

from clients.app import make_client_app
from clients.local_memory import held_local_memory
from fed_asr import protocol as P
from fed_asr.methods import PREVIOUS_ADAPTER
from fed_asr.methods.ewc import FISHER, fisher_sums

Overrides = Callable[..., list[str]]
SPECTRUM_QUERY = f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


def test_ewc_local_keeps_its_fisher_accumulates_it_and_trains_against_it(
    run_overrides: Overrides,
) -> None:
    # Prepare: partition 0's site and its stage-0 Fisher as EWC would send it
    overrides = run_overrides("ewc-local", method="ewc_local")
    run_config, site, arrays = first_site(overrides)
    samples = site.stream.stages[0].train
    sums, count = fisher_sums(site.model, site.collator, samples)
    context, fresh = node_context(run_config, 0), node_context(run_config, 0)
    app = make_client_app()
    query = message(SPECTRUM_QUERY, {P.ARRAYS_RECORD: arrays}, {P.STAGE_KEY: 0})

    # Execute: two stage-end queries (decay 1: the Fisher sums), then stage-1 training
    # under the anchor the server sends, on the node that holds a Fisher and on one
    # that does not
    replies = [app(query, context) for _ in range(2)]
    held = held_local_memory(context, [FISHER])
    train = message(
        MessageType.TRAIN,
        {P.ARRAYS_RECORD: arrays, P.memory_record(PREVIOUS_ADAPTER): arrays},
        {P.STAGE_KEY: 1, P.GLOBAL_ROUND_KEY: 2},
    )
    trained, without = app(train, context), app(train, fresh)

    # Assert: nothing of the Fisher leaves the node ...
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert P.statistics_record(FISHER) not in reply.content.array_records
        assert P.statistics_count_key(FISHER) not in reply.content[P.METRICS_RECORD]
    # ... the node holds twice its own mean Fisher ...
    assert set(held[FISHER]) == set(arrays.keys()) and count == len(samples) > 0
    for key, value in sums.items():
        torch.testing.assert_close(held[FISHER][key], 2 * value / count)
    # ... and trains against it; a node without one has no EWC term
    assert not trained.has_error(), trained.error
    assert trained.content[P.METRICS_RECORD][P.loss_key("ewc")] > 0
    assert P.loss_key("ewc") not in without.content[P.METRICS_RECORD]


def test_simulation_ewc_local_sends_only_the_anchor(run_overrides: Overrides) -> None:
    # Prepare: 2 clients, 2 stages, 1 round each
    overrides = run_overrides("sim-ewc-local", method="ewc_local")

    # Execute
    metrics = simulation_metrics(overrides)

    # Assert: no statistics travel up; stage 1 brings down the anchor alone (EWC
    # sends anchor + Fisher, twice the adapter: test_ffa) and trains under EWC
    first, second = metrics["rounds"]
    assert first["bytes_up_extra"] == 0 and first["bytes_up_spectrum"] == 0
    assert second["bytes_down_extra"] == second["bytes_up_adapter"] > 0
    assert "ewc" not in first["losses"] and second["losses"]["ewc"] > 0
    assert metrics["dropped_replies"] == 0


def test_ewc_local_needs_no_clear_text_exemption_under_dp(
    run_overrides: Overrides,
) -> None:
    # Prepare / Execute: EWC's pooled Fisher would travel in clear text beside a DP
    # release; the local Fisher never travels, so the config is accepted
    from fed_asr.config import compose_config

    with pytest.raises(ValueError, match="method=ewc.*in clear text"):
        compose_config(
            "config", run_overrides("dp", method="ewc", **{"privacy.dp": True})
        )
    cfg = compose_config(
        "config", run_overrides("dp", method="ewc_local", **{"privacy.dp": True})
    )

    # Assert
    assert cfg.method.name == "ewc_local"
