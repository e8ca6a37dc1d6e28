"""The inner Flower strategy picked by ``federation.strategy``."""

from __future__ import annotations

import dataclasses
from unittest.mock import Mock

import pytest
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg

from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import FederationConfig, compose_config
from server.adapter_strategies import (
    ADAPTER_STRATEGIES,
    ExactLoRAFedAvg,
    build_adapter_strategy,
)
from server.run import FederatedRun

FEDAVG = get_lora_aggregation("fedavg")


@pytest.mark.parametrize("name", sorted(ADAPTER_STRATEGIES))
def test_build_adapter_strategy_every_name_uses_the_protocol_keys(name: str) -> None:
    # Execute
    strategy = build_adapter_strategy(
        FederationConfig(strategy=name, num_clients=3), FEDAVG
    )
    # Assert
    assert isinstance(strategy, ADAPTER_STRATEGIES[name])
    assert strategy.weighted_by_key == P.NUM_EXAMPLES_KEY
    assert strategy.arrayrecord_key == P.ARRAYS_RECORD
    assert strategy.configrecord_key == P.CONFIG_RECORD
    assert strategy.min_train_nodes == 2


def test_build_adapter_strategy_passes_strategy_options() -> None:
    # Execute
    strategy = build_adapter_strategy(
        FederationConfig(strategy="fedadam", strategy_options={"eta": 0.05}), FEDAVG
    )
    # Assert
    assert isinstance(strategy, FedAdam) and strategy.eta == 0.05


def test_build_adapter_strategy_options_the_strategy_lacks_raise_naming_field() -> None:
    with pytest.raises(
        ValueError,
        match="`federation.strategy_options` do not fit strategy 'fedmedian'",
    ):
        build_adapter_strategy(
            FederationConfig(strategy="fedmedian", strategy_options={"eta": 0.1}),
            FEDAVG,
        )


def test_build_adapter_strategy_exact_lora_needs_fedavg() -> None:
    # Execute
    exact = build_adapter_strategy(FederationConfig(), get_lora_aggregation("exact"))
    # Assert
    assert isinstance(exact, ExactLoRAFedAvg) and isinstance(exact, FedAvg)
    with pytest.raises(ValueError, match=r"needs `federation.strategy=fedavg`"):
        build_adapter_strategy(
            FederationConfig(strategy="krum"), get_lora_aggregation("exact")
        )


def test_federated_run_unknown_strategy_is_refused_at_start_listing_choices(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the name composes (a plain string), so the run refuses it
    cfg = compose_config("config", run_overrides("bogus"))
    cfg = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, strategy="bogus")
    )
    assert (
        compose_config("config", [*run_overrides("bogus"), "federation.strategy=bogus"])
        == cfg
    )
    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"`federation.strategy` must be one of \[.*'fedavg'.*'krum'.*\], "
        r"got 'bogus'",
    ):
        FederatedRun(cfg, Mock(spec=Grid))
