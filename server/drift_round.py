"""The drift query at a stage end: every client's drift sums, pooled into rows.

Diagnostics only (``train.diagnostics``): it shows whether old skills' attention
spectra move in a federated run, the way the central engine shows it
(``fed_asr.drift``). Each client measures against prototypes of its own share of a
stage's training data; the server pools the sums (sample-weighted means). It is not
part of the learning protocol: its bytes are not counted in the round's
communication, and it is skipped when the run keeps client data private
(``privacy.dp`` or ``privacy.secure_spectrum``), since the sums are not privatised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.drift import DriftSums, drift_row

Sign = Callable[[RecordDict, str, int], None]  # (content, message type, node)


class DriftRound:
    """Asks every node for its drift sums after a stage and pools them."""

    def __init__(
        self, grid: Grid, skills: Sequence[str], sign: Sign, timeout: float
    ) -> None:
        self.grid = grid
        self.skills = tuple(skills)
        self.sign = sign
        self.timeout = timeout
        self.rows: list[dict[str, Any]] = []

    def run(self, arrays: ArrayRecord, stage: int) -> list[dict[str, Any]]:
        """Rows ``(after=stage, stage=i)`` for every seen stage ``i`` (appended)."""
        message_type = f"{MessageType.QUERY}.{P.DRIFT_ACTION}"
        messages = []
        for node in self.grid.get_node_ids():
            content = RecordDict(
                {
                    P.ARRAYS_RECORD: arrays,
                    P.CONFIG_RECORD: ConfigRecord({P.STAGE_KEY: stage}),
                }
            )
            self.sign(content, message_type, node)
            messages.append(
                Message(content=content, dst_node_id=node, message_type=message_type)
            )
        pooled = {i: DriftSums() for i in range(stage + 1)}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or P.METRICS_RECORD not in reply.content:
                reason = reply.error.reason if reply.has_error() else "no metrics"
                log(WARNING, "Drift reply from node %d ignored: %s", node, reason)
                continue
            metrics = reply.content.metric_records[P.METRICS_RECORD]
            try:
                parts = {
                    i: DriftSums.from_metrics(metrics, i, self.skills) for i in pooled
                }
            except ValueError as err:
                log(WARNING, "Drift reply from node %d ignored: %s", node, err)
                continue
            pooled = {i: pooled[i].add(parts[i]) for i in pooled}
        rows = [drift_row(stage, i, sums) for i, sums in pooled.items() if sums.count]
        self.rows.extend(rows)
        return rows
