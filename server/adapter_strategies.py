"""The Flower strategies that can aggregate the adapters (``federation.strategy``).

Every entry is one of Flower's own Message-API strategies, built with the record keys
of ``fed_asr.protocol``; FedASR wraps whichever is picked (``server.strategy``).
``lora.aggregation=exact`` replaces FedAvg's per-matrix mean by the exact merge of
the LoRA products (``fed_asr.adapter_aggregation``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fed_asr import protocol as P
from fed_asr.adapter_aggregation import LoraAggregation
from fed_asr.config import FederationConfig
from fed_asr.wire import record_arrays
from server.records import numpy_record
from server.strategy import aggregate_losses, pool_stage_accuracy

ADAPTER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}


class ExactLoRAFedAvg(FedAvg):
    """FedAvg whose adapter merge is a ``LoraAggregation`` (e.g. ``exact``)."""

    def __init__(self, lora: LoraAggregation, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lora = lora

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The LoRA aggregation's merge, weighted by ``num-examples``."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        weights = [
            float(m.content[P.METRICS_RECORD][self.weighted_by_key]) for m in valid
        ]
        merged = self.lora.aggregate(
            [record_arrays(m.content[P.ARRAYS_RECORD]) for m in valid], weights
        )
        metrics = self.train_metrics_aggr_fn(
            [m.content for m in valid], self.weighted_by_key
        )
        return numpy_record(merged), metrics


def build_adapter_strategy(
    federation: FederationConfig,
    lora: LoraAggregation,
    options: Mapping[str, Any] | None = None,
) -> Strategy:
    """The inner strategy named by ``federation.strategy``.

    Raises
    ------
    ValueError
        Unknown name (the choices are listed), options the strategy does not take,
        or ``lora.aggregation`` needing its own merge with a strategy other than
        ``fedavg``.
    """
    name = federation.strategy
    if name not in ADAPTER_STRATEGIES:
        raise ValueError(
            f"`federation.strategy` must be one of {sorted(ADAPTER_STRATEGIES)}, "
            f"got {name!r}."
        )
    nodes = min(federation.min_available_clients, federation.num_clients)
    kwargs: dict[str, Any] = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": nodes,
        "min_evaluate_nodes": nodes,
        "min_available_nodes": nodes,
        "weighted_by_key": P.NUM_EXAMPLES_KEY,
        "arrayrecord_key": P.ARRAYS_RECORD,
        "configrecord_key": P.CONFIG_RECORD,
        "train_metrics_aggr_fn": aggregate_losses,
        "evaluate_metrics_aggr_fn": pool_stage_accuracy,
        **dict(options or federation.strategy_options),
    }
    if lora.server_merges:
        if name != "fedavg":
            raise ValueError(
                f"`lora.aggregation={lora.name}` merges the adapters itself and "
                f"needs `federation.strategy=fedavg`, got {name!r}."
            )
        return ExactLoRAFedAvg(lora, **kwargs)
    try:
        return ADAPTER_STRATEGIES[name](**kwargs)
    except TypeError as err:
        raise ValueError(
            f"`federation.strategy_options` do not fit strategy {name!r}: {err}"
        ) from None
