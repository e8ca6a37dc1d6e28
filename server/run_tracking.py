"""Per-round scalars of a federated run, sent to the run's tracker.

The run calls :meth:`RunTracking.round_done` after each global round,
:meth:`RunTracking.stage_end_done` after each stage-end round and
:meth:`RunTracking.drift_measured` after the drift round; the scalars come from
the round log (``server.ledger``) through ``fed_asr.tracking.round_scalars``, plus
the DP budget spent so far (``privacy/epsilon_spent``, when DP is on). The tracker
(``tracking=...``) is opened on the first call, so a run that never trains writes
nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fed_asr.config import ExperimentConfig
from fed_asr.tracking import Tracker, drift_scalars, open_tracker, round_scalars
from server.ledger import BYTE_FIELDS, RoundLog
from server.run_outputs import privacy_report


class RunTracking:
    """The tracker of one federated run and what it has logged so far.

    Parameters
    ----------
    cfg : ExperimentConfig
        The run's config (``tracking``, ``output_dir``, ``privacy``).
    stage_names : Sequence[str]
        Stage order (tags name stages, not indices).
    num_skills : int
        Skills of the stream (the DP accounting needs it).
    """

    def __init__(
        self, cfg: ExperimentConfig, stage_names: Sequence[str], num_skills: int
    ) -> None:
        self.cfg = cfg
        self.stage_names = list(stage_names)
        self.num_skills = num_skills
        self._tracker: Tracker | None = None
        self._logged_bytes: dict[str, int] = {}

    @property
    def tracker(self) -> Tracker:
        """The run's tracker, opened on first use."""
        if self._tracker is None:
            self._tracker = open_tracker(self.cfg)
        return self._tracker

    def round_done(
        self, entry: RoundLog | None, releases: Sequence[int], adapter_releases: int
    ) -> None:
        """Log a finished round: losses, accuracy, bytes, clients, epsilon spent.

        ``releases`` are the stages whose statistics were released and
        ``adapter_releases`` the rounds so far (``server.run_outputs.privacy_report``).
        """
        if entry is None:
            return
        scalars = round_scalars(dataclasses.asdict(entry), self.stage_names)
        scalars.update(self._privacy(releases, adapter_releases))
        self.tracker.log_scalars(scalars, step=entry.round)
        self._logged_bytes = {name: getattr(entry, name) for name in BYTE_FIELDS}

    def stage_end_done(
        self, entry: RoundLog | None, releases: Sequence[int], adapter_releases: int
    ) -> None:
        """Log what the stage-end round added to the last round (bytes, epsilon)."""
        if entry is None:
            return
        added = {
            name: getattr(entry, name) - self._logged_bytes.get(name, 0)
            for name in BYTE_FIELDS
        }
        scalars = {
            "bytes/stage_end_up": sum(v for k, v in added.items() if "_up_" in k),
            "bytes/stage_end_down": sum(v for k, v in added.items() if "_down_" in k),
            **self._privacy(releases, adapter_releases),
        }
        self.tracker.log_scalars(scalars, step=entry.round)
        self._logged_bytes = {name: getattr(entry, name) for name in BYTE_FIELDS}

    def drift_measured(
        self, rows: Sequence[Mapping[str, Any]], stage: int, step: int
    ) -> None:
        """Log the drift and grounding of earlier stages measured after ``stage``."""
        scalars = drift_scalars(rows, self.stage_names, stage)
        if scalars:
            self.tracker.log_scalars(scalars, step=step)

    def close(self) -> None:
        """Close the tracker, if it was opened."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def _privacy(
        self, releases: Sequence[int], adapter_releases: int
    ) -> dict[str, float]:
        if not self.cfg.privacy.dp:
            return {}
        report = privacy_report(
            self.cfg, list(releases), self.num_skills, adapter_releases=adapter_releases
        )
        spent = report.get("epsilon_spent")
        return {} if spent is None else {"privacy/epsilon_spent": float(spent)}
