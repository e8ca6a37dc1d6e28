"""Three ClientApps over a loopback grid, shared by the security wiring tests."""

from __future__ import annotations

import dataclasses
import shlex

import numpy as np
import pytest
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, Message

from clients.app import make_client_app
from clients.secure import stage_statistics
from clients.site import site_from_context
from clients.testing import LoopbackGrid, node_contexts
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig, compose_config
from fed_asr.methods import StageEndPlan
from fed_asr.models import adapter_state, load_adapter_state
from fed_asr.schedule import StageEndInputs, update_spectrum
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays as record_to_numpy
from server.adapter_strategies import build_adapter_strategy
from server.ledger import RoundLedger, RoundLog
from server.stage_end import StageEndRound
from server.strategy import FedASR

NUM_NODES = 3


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


class Federation:
    """Three in-process nodes over a loopback grid, plus the config and adapter."""

    def __init__(self, overrides: list[str], node_config: dict | None = None) -> None:
        self.cfg: ExperimentConfig = compose_config("config", overrides)
        run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        self.run_config = run_config
        app = make_client_app()
        self.nodes = {1000 + p: p for p in range(NUM_NODES)}
        contexts = node_contexts(run_config, NUM_NODES, 7, lambda p: node_config or {})
        self.grid = LoopbackGrid({node: app for node in self.nodes}, contexts)
        site = site_from_context(
            run_config, {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: NUM_NODES}
        )
        self.skills = site.stream.skills
        self.arrays = ArrayRecord(torch_state_dict=adapter_state(site.model))

    def _local_stats(self, partition: int) -> dict[str, np.ndarray]:
        site = site_from_context(
            self.run_config,
            {P.NODE_PARTITION_ID: partition, P.NODE_NUM_PARTITIONS: NUM_NODES},
        )
        load_adapter_state(site.model, self.arrays.to_torch_state_dict())
        return stage_statistics(site, 0).to_arrays()

    def strategy(self, **kwargs) -> FedASR:  # type: ignore[no-untyped-def]
        """FedASR around the configured FedAvg, sampling every node."""
        inner = build_adapter_strategy(
            self.cfg.federation, get_lora_aggregation(self.cfg.lora.aggregation)
        )
        return FedASR(inner, ledger=RoundLedger(), **kwargs)

    def stage_end(
        self, ledger: RoundLedger | None = None, secure: bool | None = None
    ) -> StageEndInputs:
        """The stage-end round of stage 0 (shared spectrum) over the grid."""
        privacy = self.cfg.privacy
        if secure is not None:
            privacy = dataclasses.replace(privacy, secure_spectrum=secure)
        ledger = ledger or RoundLedger([RoundLog(round=1, stage=0)])
        round_ = StageEndRound(
            self.grid,
            self.skills,
            privacy,
            self.cfg.security,
            ledger,
            lambda content, message_type, node: None,
            60.0,
        )
        return round_.run(self.arrays, 0, StageEndPlan(spectrum="shared"), 1)

    def spectrum(self, secure: bool | None = None) -> SkillSpectrum | None:
        """The global spectrum merged from the stage-end round of stage 0."""
        parts = self.stage_end(secure=secure).spectrum_parts
        return update_spectrum(
            None, parts, self.cfg.spectrum, self.cfg.regularizer.cov_floor
        )

    def clear_stats(self) -> list[dict[str, np.ndarray]]:
        """Each node's clear-text statistics of stage 0 (node order).

        As sent in a clear stage-end round; nodes configured for secure aggregation
        never send them in clear, so for them they are computed on the node's site.
        """
        if self.cfg.privacy.secure_spectrum:
            return [self._local_stats(p) for _, p in sorted(self.nodes.items())]
        sent: dict[int, dict[str, np.ndarray]] = {}

        def capture(node: int, msg: Message, reply: Message) -> Message:
            if P.STATS_RECORD in reply.content.array_records:
                record = reply.content.array_records[P.STATS_RECORD]
                sent[node] = record_to_numpy(record)
            return reply

        hook, self.grid.on_reply = self.grid.on_reply, capture
        try:
            self.stage_end(secure=False)
        finally:
            self.grid.on_reply = hook
        return [sent[node] for node in sorted(sent)]


@pytest.fixture
def federation(run_overrides):  # type: ignore[no-untyped-def]
    def make(node_config: dict | None = None, **extra: object) -> Federation:
        overrides = run_overrides(
            "sec", **{"federation.num_clients": NUM_NODES, **extra}
        )
        return Federation(overrides, node_config)

    return make
