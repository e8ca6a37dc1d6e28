"""A method registered from a test runs in both engines without engine changes.

``stage_mean`` declares one stage-end statistic: the mean number of answer characters
of a stage (times ``scale``). Both engines must collect it at the end of stage 0,
merge it into the method's memory and hand that memory to the method in stage 1.
The federated run is in process (``LoopbackGrid``: real ServerApp run and
ClientApps, protobuf on the wire), so the method registered here exists on the
clients too; Ray's simulation workers would import ``fed_asr`` afresh without it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from flower_helpers import set_task_identity

from clients.app import make_client_app
from clients.testing import LoopbackGrid, node_contexts
from fed_asr.central import run_central
from fed_asr.config import ExperimentConfig, MethodConfig, compose_config
from fed_asr.data import VQASample, build_stream
from fed_asr.methods import (
    ContinualMethod,
    MethodMemory,
    StageEndPlan,
    register_method,
    unregister_method,
)
from server.run import FederatedRun

NAME = "stage_mean"
MEAN = "mean"  # the statistics' name, and the memory group it becomes
CHARS = "answer-chars"


@dataclass
class StageMeanOptions:
    """Options of ``stage_mean``: a factor on the character counts."""

    scale: float = 1.0


class StageMean(ContinualMethod):
    """Remembers the mean answer length of earlier stages; trains like vanilla."""

    stage_end = StageEndPlan(statistics=(MEAN,))
    received: ClassVar[list[MethodMemory]] = []  # every memory set, in call order

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Record what the engine hands over."""
        StageMean.received.append(
            {n: {k: v.clone() for k, v in g.items()} for n, g in memory.items()}
        )

    def stage_end_statistics(
        self, name: str, model: Any, collator: Any, samples: Sequence[VQASample]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Sum of ``scale * len(answer)`` over ``samples``, and their number."""
        assert name == MEAN
        total = sum(self.options.scale * len(s.answer) for s in samples)
        return {CHARS: torch.tensor([float(total)])}, len(samples)


@pytest.fixture
def stage_mean() -> Iterator[type[StageMean]]:
    """``stage_mean`` registered for one test."""
    register_method(NAME, StageMean, StageMeanOptions)
    StageMean.received = []
    yield StageMean
    unregister_method(NAME)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def _small(run_overrides, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    return run_overrides(
        name,
        **{
            "data.max_train_per_stage": 16,
            "data.max_test_per_stage": 8,
            "train.max_steps_per_stage": 2,
        },
    )


def _with_method(cfg: ExperimentConfig, scale: float) -> ExperimentConfig:
    """``cfg`` running ``stage_mean`` (built in Python: it has no YAML)."""
    options = StageMeanOptions(scale=scale)
    return dataclasses.replace(cfg, method=MethodConfig(name=NAME, options=options))


def _expected_mean(cfg: ExperimentConfig, scale: float) -> torch.Tensor:
    """scale * mean answer length over all of stage 0's training samples."""
    train = build_stream(cfg.data, cfg.seed).stages[0].train
    return torch.tensor([scale * sum(len(s.answer) for s in train) / len(train)])


def test_registered_method_gets_merged_stage_end_mean_in_central_engine(
    stage_mean: type[StageMean], run_overrides
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    cfg = _with_method(compose_config("config", _small(run_overrides, "c")), 2.0)
    # Execute
    metrics = json.loads(run_central(cfg).read_text())
    # Assert: nothing in stage 0, the stage-0 mean in stage 1, then dropped
    first, second, final = stage_mean.received
    assert first == {} and final == {}
    assert set(second) == {MEAN} and set(second[MEAN]) == {CHARS}
    torch.testing.assert_close(
        second[MEAN][CHARS], _expected_mean(cfg, 2.0), atol=1e-6, rtol=1e-6
    )
    assert metrics["method"] == NAME
    matrix = metrics["accuracy_matrix"]
    assert matrix[0][0] is not None and None not in matrix[1]


def test_registered_method_gets_merged_stage_end_mean_over_two_clients(
    stage_mean: type[StageMean], run_overrides
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the clients compose the same method from overrides (it is registered
    # now, so `method/options=stage_mean` composes); the server gets it in Python
    overrides = [
        *_small(run_overrides, "f"),
        f"method.name={NAME}",
        f"method/options={NAME}",
        "method.options.scale=3.0",
    ]
    cfg = _with_method(compose_config("config", overrides), 3.0)
    assert compose_config("config", overrides) == cfg
    run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
    app = make_client_app()
    contexts = node_contexts(run_config, 2, 7, first_node=101)
    grid = LoopbackGrid(dict.fromkeys(contexts, app), contexts)
    # Execute
    path = FederatedRun(cfg, grid, engine="simulation").run()
    # Assert: each client got nothing in stage 0, the pooled stage-0 mean in stage 1
    metrics = json.loads(Path(path).read_text())
    assert len(stage_mean.received) == 4
    assert stage_mean.received[:2] == [{}, {}]
    for memory in stage_mean.received[2:]:
        assert set(memory) == {MEAN}
        torch.testing.assert_close(
            memory[MEAN][CHARS], _expected_mean(cfg, 3.0), atol=1e-6, rtol=1e-6
        )
    first, second = metrics["rounds"]
    assert first["bytes_up_extra"] > 0 and first["bytes_down_extra"] == 0
    assert second["bytes_down_extra"] > 0
    assert first["bytes_up_spectrum"] == second["bytes_down_spectrum"] == 0
    assert metrics["dropped_replies"] == metrics["failed_replies"] == 0
    matrix = metrics["accuracy_matrix"]
    assert matrix[0][0] is not None and None not in matrix[1]
