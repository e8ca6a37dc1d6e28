"""The stage schedule: stage-end decisions from the plan, merges, memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fed_asr.config import FederationConfig, RegularizerConfig, SpectrumConfig
from fed_asr.methods import (
    PREVIOUS_ADAPTER,
    ContinualMethod,
    NoOptions,
    StageEndPlan,
)
from fed_asr.schedule import (
    ContinualState,
    StageEndInputs,
    StageSchedule,
    stage_outcome,
    stage_rounds_decision,
    update_spectrum,
)
from fed_asr.spectrum import SkillStats


class _Mean(ContinualMethod):
    stage_end = StageEndPlan(statistics=("mean",), keep_adapter=True)


@dataclass
class _Engine:
    """Records the calls; each stage end contributes one part per client."""

    parts: dict[int, list[tuple[dict[str, torch.Tensor], int]]]
    calls: list[tuple[str, int]] = field(default_factory=list)
    states: list[ContinualState] = field(default_factory=list)

    def train_stage(self, stage: int, state: ContinualState) -> None:
        self.calls.append(("train", stage))
        self.states.append(state)

    def collect_stage_end(
        self, stage: int, state: ContinualState, query_clients: bool
    ) -> StageEndInputs:
        self.calls.append(("collect", stage))
        return StageEndInputs(statistics={"mean": self.parts.get(stage, [])})

    def global_adapter(self) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor([float(len(self.calls))])}

    def stage_end_done(self, stage: int, state: ContinualState) -> None:
        self.calls.append(("done", stage))


def _stats(values: list[list[float]]) -> SkillStats:
    x = torch.tensor(values, dtype=torch.float64)  # (N, D)
    stats = SkillStats.empty(("a",), x.shape[1], 2)
    stats.count[0] = x.shape[0]
    stats.sum[0] = x.sum(0)
    stats.sumsq[0] = x.square().sum(0)
    stats.angular_sum[0] = torch.tensor([1.0, 1.0]) * x.shape[0]
    return stats


@pytest.mark.parametrize(
    ("plan", "needed"),
    [
        (StageEndPlan(), [False, False, False]),
        (StageEndPlan(spectrum="shared"), [True, True, True]),
        (StageEndPlan(spectrum="local"), [True, True, False]),
        (StageEndPlan(statistics=("f",)), [True, True, False]),
        (StageEndPlan(keep_adapter=True), [True, True, False]),
    ],
)
def test_stage_end_plan_is_needed_per_stage(plan: StageEndPlan, needed: list[bool]):
    # Execute / Assert
    assert [plan.is_needed(t, 3) for t in range(3)] == needed


def test_stage_end_plan_keep_adapter_only_queries_no_client() -> None:
    # Execute / Assert
    assert not StageEndPlan(keep_adapter=True).queries_clients(0, 3)
    assert StageEndPlan(statistics=("f",)).queries_clients(0, 3)


def test_stage_end_plan_bad_spectrum_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`StageEndPlan.spectrum` must be one of"):
        StageEndPlan(spectrum="global")  # type: ignore[arg-type]


def test_schedule_merges_statistics_by_count_into_memory() -> None:
    # Prepare: two clients at the end of stage 0: sums 2 (1 sample), 10 (4 samples)
    method = _Mean(NoOptions(), RegularizerConfig())
    parts = {0: [({"m": torch.tensor([2.0])}, 1), ({"m": torch.tensor([10.0])}, 4)]}
    engine = _Engine(parts)
    schedule = StageSchedule(method, 2, SpectrumConfig(), 1e-4)

    # Execute
    final = schedule.run(engine, ContinualState())

    # Assert: the stage-1 training saw the pooled mean 12 / 5 and the adapter
    assert engine.calls == [("train", 0), ("collect", 0), ("done", 0), ("train", 1)]
    memory = engine.states[1].memory
    torch.testing.assert_close(memory["mean"]["m"], torch.tensor([2.4]))
    assert PREVIOUS_ADAPTER in memory
    assert final.stage_end_done == 0


def test_schedule_skips_stage_ends_already_done() -> None:
    # Prepare: resumed after the end of stage 0
    method = _Mean(NoOptions(), RegularizerConfig())
    engine = _Engine({})
    schedule = StageSchedule(method, 2, SpectrumConfig(), 1e-4)

    # Execute
    schedule.run(engine, ContinualState(stage_end_done=0))

    # Assert
    assert ("collect", 0) not in engine.calls


def test_update_spectrum_pools_parts_like_one_site() -> None:
    # Prepare
    one, two = _stats([[0.0, 1.0], [2.0, 3.0]]), _stats([[4.0, 5.0]])
    both = _stats([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    cfg = SpectrumConfig(blend="replace")

    # Execute
    split = update_spectrum(None, [one, two], cfg, 1e-4)
    whole = update_spectrum(None, [both], cfg, 1e-4)

    # Assert
    assert split is not None and whole is not None
    torch.testing.assert_close(split.mean, whole.mean)
    torch.testing.assert_close(split.var, whole.var)


def test_update_spectrum_without_samples_keeps_previous() -> None:
    # Prepare
    previous = update_spectrum(None, [_stats([[1.0, 2.0]])], SpectrumConfig(), 1e-4)
    empty = SkillStats.empty(("a",), 2, 2)

    # Execute / Assert
    assert update_spectrum(previous, [empty], SpectrumConfig(), 1e-4) is previous


def _fed(**kw: object) -> FederationConfig:
    base = {"rounds_per_stage": 2, "max_rounds_per_stage": 5, "plateau_rel_delta": 0.1}
    return FederationConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("losses", "done", "underfit"),
    [
        ([1.0], False, False),  # below the minimum
        ([1.0, 0.5], False, False),  # still falling fast
        ([1.0, 0.5, 0.48], True, False),  # < 10% better: plateau
        ([1.0, 0.5, 0.3, 0.2, 0.1], True, True),  # at the cap, still falling
    ],
)
def test_plateau_schedule_stops_on_plateau_or_cap(
    losses: list[float], done: bool, underfit: bool
) -> None:
    # Execute
    decision = stage_rounds_decision(losses, _fed())
    # Assert
    assert (decision.done, decision.underfit) == (done, underfit)


def test_fixed_schedule_runs_rounds_per_stage_and_outcome_flags_falling_loss() -> None:
    # Prepare
    fed = _fed(schedule="fixed")
    # Execute / Assert
    assert not stage_rounds_decision([1.0], fed).done
    assert stage_rounds_decision([1.0, 0.2], fed).done
    assert stage_outcome([1.0, 0.2], fed).underfit
    assert not stage_outcome([1.0, 0.99], fed).underfit


def test_federation_schedule_fields_are_checked() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`federation.schedule` must be one of"):
        _fed(schedule="adaptive")
    with pytest.raises(ValueError, match="`federation.max_rounds_per_stage` must be"):
        _fed(max_rounds_per_stage=1)
    with pytest.raises(ValueError, match="`federation.plateau_rel_delta` must be"):
        _fed(plateau_rel_delta=-0.5)
