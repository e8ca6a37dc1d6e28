"""The stage schedule shared by the central engine and the federated run.

Both engines walk the stages the same way: train the stage, then, if the method's
:class:`~fed_asr.methods.StageEndPlan` says so, collect stage-end statistics (from the
one site, or from the clients), merge them and carry the result into the next stage.
What changes between engines is only *how* training, collection and evaluation run
(the :class:`StageEngine` an engine provides); the decisions and the merges live here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from fed_asr.config import FederationConfig, SpectrumConfig
from fed_asr.methods import ContinualMethod, MethodMemory
from fed_asr.spectrum import SkillSpectrum, SkillStats, blend
from fed_asr.spectrum_strategies import get_spectrum_strategy


def update_spectrum(
    previous: SkillSpectrum | None,
    parts: Sequence[SkillStats],
    spectrum_cfg: SpectrumConfig,
    cov_floor: float,
) -> SkillSpectrum | None:
    """Statistics -> prototypes (the configured strategy) -> blend with ``previous``.

    The one place where stage-end statistics become a spectrum: the server's global
    spectrum, a client's own spectrum (``asr_local``) and the central engine's.
    Statistics without any sample keep ``previous``.

    Parameters
    ----------
    previous : SkillSpectrum | None
        Spectrum before this stage end (None before the first).
    parts : Sequence[SkillStats]
        One site's statistics per contributor (or their secure sum, as one part).
    spectrum_cfg : SpectrumConfig
        ``strategy`` merges the parts, ``blend``/``alpha`` blend across stages.
    cov_floor : float
        Variance floor of the prototypes.
    """
    if not parts or not any(float(p.count.sum()) > 0 for p in parts):
        return previous
    merged = get_spectrum_strategy(spectrum_cfg.strategy).merge(
        list(parts), spectrum_cfg, cov_floor
    )
    return blend(previous, merged, mode=spectrum_cfg.blend, alpha=spectrum_cfg.alpha)


@dataclass(frozen=True)
class RoundDecision:
    """Whether a stage's training is over, and whether it ended underfit."""

    done: bool
    underfit: bool = False


def stage_rounds_decision(
    losses: Sequence[float], federation: FederationConfig
) -> RoundDecision:
    """Decide from a stage's pooled training losses (one per round so far).

    ``fixed``: done after ``rounds_per_stage`` rounds. ``plateau``: at least
    ``rounds_per_stage``; then done once the best loss of the last
    ``plateau_patience`` rounds improves on the best before them by less than
    ``plateau_rel_delta`` (relative); at ``max_rounds_per_stage`` done regardless,
    flagged ``underfit`` if the loss was still improving. The training loss is
    used, not a test accuracy, so stopping never sees evaluation data.
    """
    n, fed = len(losses), federation
    if fed.schedule == "fixed":
        return RoundDecision(done=n >= fed.rounds_per_stage)
    if n < max(fed.rounds_per_stage, fed.plateau_patience + 1):
        return RoundDecision(done=False)
    if not _still_improving(losses, fed):
        return RoundDecision(done=True)
    if n >= fed.max_rounds_per_stage:
        return RoundDecision(done=True, underfit=True)
    return RoundDecision(done=False)


def stage_outcome(
    losses: Sequence[float], federation: FederationConfig
) -> RoundDecision:
    """How a finished stage ended: ``underfit`` if its loss was still falling.

    Under either schedule, a stage whose last ``plateau_patience`` rounds still
    improved the loss by ``plateau_rel_delta`` or more is flagged underfit.
    """
    if len(losses) <= federation.plateau_patience:
        return RoundDecision(done=True, underfit=len(losses) > 0)
    return RoundDecision(done=True, underfit=_still_improving(losses, federation))


def _still_improving(losses: Sequence[float], federation: FederationConfig) -> bool:
    """Whether the best of the last ``plateau_patience`` losses beats the best before
    them by ``plateau_rel_delta`` or more (relative); needs more losses than that."""
    cut = len(losses) - federation.plateau_patience
    before, recent = min(losses[:cut]), min(losses[cut:])
    return before > 0 and (before - recent) / before >= federation.plateau_rel_delta


@dataclass
class ContinualState:
    """What the run carries from one stage to the next (checkpointed with it)."""

    spectrum: SkillSpectrum | None = None
    memory: MethodMemory = field(default_factory=dict)
    stage_end_done: int = -1  # last stage whose stage end has been executed


@dataclass
class StageEndInputs:
    """What one stage end collected: spectrum statistics and method statistics."""

    spectrum_parts: list[SkillStats] = field(default_factory=list)
    statistics: dict[str, list[tuple[Mapping[str, Tensor], int]]] = field(
        default_factory=dict
    )


class StageEngine(Protocol):
    """How an engine trains, collects and evaluates; the schedule decides when."""

    def train_stage(self, stage: int, state: ContinualState) -> None:
        """Train ``stage`` (all its rounds) from ``state``; evaluate as it goes."""

    def collect_stage_end(
        self, stage: int, state: ContinualState, query_clients: bool
    ) -> StageEndInputs:
        """Run the stage-end work the plan asks for; return what is to be merged."""

    def global_adapter(self) -> dict[str, Tensor]:
        """The current global adapter (exchanged keys)."""

    def stage_end_done(self, stage: int, state: ContinualState) -> None:
        """Called after ``state`` was updated for the end of ``stage`` (checkpoint)."""


class StageSchedule:
    """The stage loop and the stage-end decision, once for every engine.

    Parameters
    ----------
    method : ContinualMethod
        Its ``stage_end`` plan and its memory hooks drive the stage ends.
    num_stages : int
        Stages of the stream.
    spectrum_cfg : SpectrumConfig
        Strategy and blend of ``update_spectrum``.
    cov_floor : float
        Variance floor of the prototypes.
    """

    def __init__(
        self,
        method: ContinualMethod,
        num_stages: int,
        spectrum_cfg: SpectrumConfig,
        cov_floor: float,
    ) -> None:
        self.method = method
        self.plan = method.stage_end
        self.num_stages = num_stages
        self.spectrum_cfg = spectrum_cfg
        self.cov_floor = cov_floor

    def run(
        self, engine: StageEngine, state: ContinualState, first_stage: int = 0
    ) -> ContinualState:
        """Train every stage from ``first_stage`` and execute its stage end."""
        for stage in range(first_stage, self.num_stages):
            engine.train_stage(stage, state)
            if self.plan.is_needed(stage, self.num_stages) and (
                state.stage_end_done < stage
            ):
                query = self.plan.queries_clients(stage, self.num_stages)
                inputs = engine.collect_stage_end(stage, state, query)
                state = self.end_stage(stage, state, inputs, engine.global_adapter())
                engine.stage_end_done(stage, state)
        return state

    def end_stage(
        self,
        stage: int,
        state: ContinualState,
        inputs: StageEndInputs,
        adapter: Mapping[str, Tensor],
    ) -> ContinualState:
        """The state after the end of ``stage``: merged spectrum and method memory."""
        spectrum = state.spectrum
        if self.plan.spectrum != "none":
            spectrum = update_spectrum(
                spectrum, inputs.spectrum_parts, self.spectrum_cfg, self.cov_floor
            )
        memory = state.memory
        if stage < self.num_stages - 1:
            merged = {
                name: self.method.merge_statistics(
                    name, inputs.statistics.get(name, [])
                )
                for name in self.plan.statistics
            }
            memory = self.method.update_memory(memory, adapter, merged)
        return ContinualState(spectrum=spectrum, memory=memory, stage_end_done=stage)
