"""Hand-made replies, a fake grid and small FedASRs shared by the strategy tests."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flower_helpers import set_task_identity
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import FederationConfig, SpectrumConfig
from fed_asr.schedule import update_spectrum
from fed_asr.spectrum import SkillSpectrum, SkillStats
from server.adapter_strategies import build_adapter_strategy
from server.ledger import RoundLedger
from server.strategy import FedASR

RUN_ID = 7
SENT = {"m.lora_A.weight": np.zeros((2, 3), np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(RUN_ID)


def make_grid(nodes: list[int]) -> Mock:
    """A grid that only knows its node ids and run (no message is delivered)."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(nodes)
    grid.run.run_id = RUN_ID
    return grid


def make_reply(
    node: int,
    partition: int = 0,
    arrays: dict[str, np.ndarray] | None = None,
    metrics: dict[str, float | int] | None = None,
    error: str | None = None,
) -> Message:
    """A client's reply: adapter arrays and metrics, or an error."""
    reply = Mock(spec=Message)
    reply.metadata.src_node_id = node
    reply.has_error.return_value = error is not None
    reply.error = Error(code=0, reason=error) if error is not None else None
    content = RecordDict()
    if error is None:
        if arrays is not None:
            content[P.ARRAYS_RECORD] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
            )
        content[P.METRICS_RECORD] = MetricRecord(
            {P.PARTITION_ID_KEY: partition, **(metrics or {})}
        )
    reply.content = content
    return reply


def make_strategy(
    num_clients: int = 2, ledger: RoundLedger | None = None, **kwargs: object
) -> FedASR:
    """FedASR around the FedAvg of ``federation.strategy=fedavg``."""
    federation = FederationConfig(num_clients=num_clients, min_available_clients=2)
    inner = build_adapter_strategy(federation, get_lora_aggregation("fedavg"))
    return FedASR(inner, ledger=ledger or RoundLedger(), **kwargs)  # type: ignore[arg-type]


def make_spectrum(scale: float = 1.0) -> SkillSpectrum:
    """A two-skill spectrum with one present skill."""
    stats = SkillStats.empty(("a", "b"), 2, 1)
    stats.count[0] = 2
    stats.sum[0] = torch.tensor([2.0, 4.0], dtype=torch.float64) * scale
    stats.sumsq[0] = 10.0 * scale**2
    stats.angular_sum[0] = 2.0
    spectrum = update_spectrum(None, [stats], SpectrumConfig(), 1e-4)
    assert spectrum is not None
    return spectrum


def _train(
    strategy: FedASR, grid: Mock, global_round: int, spectrum: SkillSpectrum | None
) -> list[Message]:
    strategy.begin_round(1, global_round, spectrum, {})
    arrays = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    return list(strategy.configure_train(1, arrays, ConfigRecord(), grid))


def _ok(node: int) -> Message:
    return make_reply(node, node, SENT, {P.NUM_EXAMPLES_KEY: 1})
