"""The round log of a federated run: clients, drops, losses, bytes, accuracy.

One :class:`RoundLedger` per run. The strategy and the stage-end round *record* into
it through its methods; the run reads it for progress lines, checkpoints and
``metrics.json``. Nothing else keeps round bookkeeping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BYTE_FIELDS = (
    "bytes_down_adapter",
    "bytes_down_spectrum",
    "bytes_up_adapter",
    "bytes_up_spectrum",
    "bytes_down_extra",
    "bytes_up_extra",
    "bytes_down_evaluate",
)


@dataclass
class RoundLog:
    """What happened in one global round (one entry of ``metrics.json``'s rounds)."""

    round: int
    stage: int
    clients_sampled: int = 0
    clients_answered: int = 0
    failures: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    bytes_down_adapter: int = 0
    bytes_down_spectrum: int = 0
    bytes_up_adapter: int = 0
    bytes_up_spectrum: int = 0
    bytes_down_extra: int = 0  # method memory (previous adapter, Fisher, ...)
    bytes_up_extra: int = 0  # method statistics of the stage-end round
    # The global adapter sent with every evaluate message (replies carry only counts)
    bytes_down_evaluate: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    # Pooled evaluation counts: correct-<stage>, correct-type-<stage>, per skill
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Poisoning bounds that bit: (node, partition, kind, value, bound) per reply
    clipped: list[dict[str, Any]] = field(default_factory=list)
    # Clients whose accuracy was an outlier: (node, partition, stage, accuracy, z)
    flagged: list[dict[str, Any]] = field(default_factory=list)


class RoundLedger:
    """The ordered round logs of a run, with the operations that fill them."""

    def __init__(self, rounds: list[RoundLog] | None = None) -> None:
        self.rounds: list[RoundLog] = list(rounds or [])

    def entry(self, global_round: int, stage: int) -> RoundLog:
        """The log of ``global_round``, created on first use."""
        if not self.rounds or self.rounds[-1].round != global_round:
            self.rounds.append(RoundLog(round=global_round, stage=stage))
        return self.rounds[-1]

    @property
    def last(self) -> RoundLog | None:
        """The most recent round's log (stage-end rounds count into it)."""
        return self.rounds[-1] if self.rounds else None

    def of_stage(self, stage: int) -> list[RoundLog]:
        """The round logs of ``stage``, in order."""
        return [r for r in self.rounds if r.stage == stage]

    def task_losses(self, stage: int) -> list[float]:
        """Pooled task loss of each round of ``stage`` that aggregated something."""
        return [r.losses["task"] for r in self.of_stage(stage) if "task" in r.losses]

    def add_bytes(self, **amounts: int) -> None:
        """Add byte counts (``BYTE_FIELDS`` names) to the last round."""
        if self.last is None:
            return
        for name, amount in amounts.items():
            if name not in BYTE_FIELDS:
                raise KeyError(f"Unknown byte counter {name!r}: {BYTE_FIELDS}.")
            setattr(self.last, name, getattr(self.last, name) + int(amount))

    def record_drop(
        self, node: int, partition: int, reason: str, failure: bool = False
    ) -> None:
        """Count a failed reply or record a dropped one (with its reason)."""
        if self.last is None:
            return
        if failure:
            self.last.failures += 1
        else:
            self.last.dropped.append(
                {"node": node, "partition": partition, "reason": reason}
            )

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready round logs."""
        return [dataclasses.asdict(r) for r in self.rounds]

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Replace the logs by ``to_list`` output of a checkpoint (resume)."""
        self.rounds = [RoundLog(**r) for r in rounds]

    def totals(self) -> dict[str, int]:
        """Bytes per counter over the whole run."""
        return {k: sum(getattr(r, k) for r in self.rounds) for k in BYTE_FIELDS}
