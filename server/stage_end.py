"""The stage-end round: what the method's plan asks of the clients, collected.

Spectrum statistics arrive in clear (validated per reply) or, with
``privacy.secure_spectrum``, only as their secure sum (``server.secure_spectrum``);
a method's own statistics (e.g. EWC's Fisher) arrive in clear. Every part is checked
against the run's skills and the bounds of the descriptor (``ReplyGuard``) here,
before anything is merged or checkpointed: :class:`~fed_asr.schedule.StageSchedule`
merges what this returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.config import PrivacyConfig, SecurityConfig
from fed_asr.methods import StageEndPlan
from fed_asr.schedule import StageEndInputs
from fed_asr.security.dp import clamp_noisy_stats, suppress_small_counts
from fed_asr.spectrum import SkillStats
from fed_asr.wire import record_arrays, record_nbytes, reply_partition
from server.ledger import RoundLedger
from server.merge_bounds import bounded_statistics
from server.reply_validation import ReplyGuard
from server.secure_spectrum import SecureSpectrumRound

Sign = Callable[[RecordDict, str, int], None]  # (content, message type, node)
MethodStatistics = tuple[dict[str, torch.Tensor], int]  # one reply's sums, count
# (statistics name, one reply's sums, the adapter's shapes) -> reason to drop or None
StatisticsCheck = Callable[
    [str, Mapping[str, torch.Tensor], Mapping[str, tuple[int, ...]]], str | None
]


def shape_disagreement(
    sums: Mapping[str, torch.Tensor], received: Sequence[Mapping[str, torch.Tensor]]
) -> str | None:
    """Why ``sums`` disagrees in shape with the other replies' same keys, or None.

    For each key, the shape most replies that carry it agree on is the reference;
    when no shape has a strict majority, every reply that carries the key is
    refused (the server cannot tell the honest shape).
    """
    for key in sorted(sums):
        shapes = Counter(tuple(r[key].shape) for r in received if key in r)
        (top, votes), *rest = shapes.most_common()
        mine = tuple(sums[key].shape)
        if rest and votes == rest[0][1]:
            return f"`{key}`: the replies disagree on its shape ({dict(shapes)})"
        if mine != top:
            return f"`{key}` has shape {mine}, the other replies {top}"
    return None


class StageEndRound:
    """Queries the clients at a stage end and returns what is to be merged.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    skills : Sequence[str]
        Skill names, the rows of the statistics.
    privacy, security : PrivacyConfig, SecurityConfig
        Secure aggregation / DP of the statistics; bounds of clear-text replies.
    ledger : RoundLedger
        Bytes and drops are counted into its last round.
    sign : Sign
        Signs an outgoing content for its node (a no-op without a signing key).
    timeout : float
        Seconds to wait for replies.
    guard : ReplyGuard | None
        The run's bounds on statistics (data sizes, descriptor range, DP noise);
        None: bounds derived from the statistics' shapes and the per-site cap.
    """

    def __init__(
        self,
        grid: Grid,
        skills: Sequence[str],
        privacy: PrivacyConfig,
        security: SecurityConfig,
        ledger: RoundLedger,
        sign: Sign,
        timeout: float,
        *,
        guard: ReplyGuard | None = None,
    ) -> None:
        self.grid = grid
        self.skills = tuple(skills)
        self.privacy = privacy
        self.security = security
        self.guard = guard or ReplyGuard(security, privacy, skills)
        self.ledger = ledger
        self.sign = sign
        self.timeout = timeout
        self.releases: list[int] = []  # stages whose statistics were released (DP)

    def restore_releases(self, stages: list[int]) -> None:
        """The released stages of a checkpoint (resume)."""
        self.releases = [int(s) for s in stages]

    def run(
        self,
        arrays: ArrayRecord,
        stage: int,
        plan: StageEndPlan,
        round_: int,
        *,
        check: StatisticsCheck | None = None,
    ) -> StageEndInputs:
        """Run the stage-end work of ``plan`` under the global adapter ``arrays``.

        ``check`` (the method's ``statistics_reason``) vets each reply's own
        statistics; without it they are only checked to be finite and to agree in
        shape with the other replies.
        """
        if plan.spectrum == "shared" and self.privacy.secure_spectrum:
            inputs = self._secure(arrays, stage, round_)
            if plan.statistics:  # local ones too: the clients compute them here
                clear = self._clear(arrays, stage, False, plan, check)
                inputs.statistics = clear.statistics
            return inputs
        return self._clear(arrays, stage, plan.spectrum == "shared", plan, check)

    # -- clear-text round ------------------------------------------------------------
    def _clear(
        self,
        arrays: ArrayRecord,
        stage: int,
        spectrum: bool,
        plan: StageEndPlan,
        check: StatisticsCheck | None,
    ) -> StageEndInputs:
        node_ids = list(self.grid.get_node_ids())
        message_type = f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"
        messages = []
        for node in node_ids:  # one content per node: its signature names the node
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
        replies = sorted(
            self.grid.send_and_receive(messages, timeout=self.timeout),
            key=reply_partition,
        )
        self.ledger.add_bytes(bytes_down_adapter=record_nbytes(arrays) * len(messages))
        inputs = StageEndInputs()
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}  # no deserialising
        parts: dict[str, list[tuple[Message, MethodStatistics]]] = {}
        for msg in replies:
            if msg.has_error():
                self._drop(msg, f"client error: {msg.error.reason}", stage)
                continue
            if spectrum:
                parsed = self._parse_stats(msg, stage, len(node_ids))
                if isinstance(parsed, str):
                    self._drop(msg, f"stage-end statistics: {parsed}", stage)
                else:
                    inputs.spectrum_parts.append(parsed)
                    self.ledger.add_bytes(
                        bytes_up_spectrum=record_nbytes(
                            msg.content.array_records[P.STATS_RECORD]
                        )
                    )
            for name in plan.shared_statistics:
                part = self._parse_method_statistics(msg, name, stage, len(node_ids))
                if isinstance(part, str):
                    self._drop(msg, f"stage-end `{name}`: {part}", stage)
                    continue
                reason = check(name, part[0], shapes) if check else None
                if reason is not None:
                    self._drop(msg, f"stage-end `{name}`: {reason}", stage)
                    continue
                parts.setdefault(name, []).append((msg, part))
        for name, received in parts.items():
            agreeing = []
            for msg, part in received:
                reason = shape_disagreement(part[0], [p[0] for _, p in received])
                if reason is not None:
                    self._drop(msg, f"stage-end `{name}`: {reason}", stage)
                    continue
                agreeing.append((msg, part))
            if agreeing:
                inputs.statistics[name] = bounded_statistics(
                    name, agreeing, self.security.norm_bound_factor, self.ledger.last
                )
        if spectrum and self.privacy.dp and inputs.spectrum_parts:
            self.releases.append(stage)
        if spectrum and not any(
            float(s.count.sum()) > 0 for s in inputs.spectrum_parts
        ):
            log(WARNING, "Stage %d end: no statistics. Keeping the spectrum.", stage)
        return inputs

    def _parse_stats(
        self, msg: Message, stage: int, num_nodes: int
    ) -> SkillStats | str:
        if P.STATS_RECORD not in msg.content.array_records:
            return f"missing ArrayRecord '{P.STATS_RECORD}'"
        metrics = msg.content.metric_records.get(P.METRICS_RECORD)
        if metrics is None or P.NUM_EXAMPLES_KEY not in metrics:
            return f"missing metric '{P.NUM_EXAMPLES_KEY}'"
        arrays = record_arrays(msg.content.array_records[P.STATS_RECORD])
        config = msg.content.config_records.get(P.CONFIG_RECORD)
        reason = self.guard.stats_reason(arrays, metrics, config, stage, num_nodes)
        if reason is not None:
            return reason
        if self.privacy.dp:
            arrays = suppress_small_counts(arrays)
        try:
            return SkillStats.from_arrays(arrays, self.skills)
        except (ValueError, KeyError) as err:
            return str(err)

    def _parse_method_statistics(
        self, msg: Message, name: str, stage: int, num_nodes: int
    ) -> MethodStatistics | str:
        record = msg.content.array_records.get(P.statistics_record(name))
        metrics = msg.content.metric_records.get(P.METRICS_RECORD)
        count_key = P.statistics_count_key(name)
        if record is None or metrics is None or count_key not in metrics:
            return f"missing ArrayRecord '{P.statistics_record(name)}' or its count"
        sums = {
            k: torch.from_numpy(np.array(v)) for k, v in record_arrays(record).items()
        }
        if not all(bool(torch.isfinite(v).all()) for v in sums.values()):
            return "non-finite values"
        count = int(metrics[count_key])  # type: ignore[call-overload]
        if not 0 <= count <= self.security.max_num_examples:
            return f"count {count} outside [0, {self.security.max_num_examples}]"
        # No site holds more samples of a stage than its split (the spectrum's cap)
        reason = self.guard.count_reason(
            "stage_end", count_key, metrics, stage, num_nodes
        )
        if reason is not None:
            return reason
        self.ledger.add_bytes(bytes_up_extra=record_nbytes(record))
        return sums, count

    def _drop(self, msg: Message, reason: str, stage: int) -> None:
        node = msg.metadata.src_node_id
        log(
            WARNING, "Stage %d end: reply from node %d dropped: %s", stage, node, reason
        )
        self.ledger.record_drop(
            node, reply_partition(msg), reason, failure=msg.has_error()
        )

    # -- secure round ------------------------------------------------------------------
    def _secure(self, arrays: ArrayRecord, stage: int, round_: int) -> StageEndInputs:
        """Secure aggregation: only the sum of the statistics is ever seen."""
        session = f"{self.grid.run.run_id}/{stage}/{round_}"
        secure = SecureSpectrumRound(
            self.grid,
            self.privacy,
            session,
            self.timeout,
            self.sign,
            site_keys=self.security.site_keys,
            skills=self.skills,
        )
        num_nodes = len(list(self.grid.get_node_ids()))
        result = secure.run(
            arrays,
            stage,
            self.guard.coarse_cap(
                self.guard.caps.any_site("stage_end", stage, num_nodes)
            ),
        )
        adapter = record_nbytes(arrays) * num_nodes
        self.ledger.add_bytes(
            bytes_down_adapter=adapter,
            bytes_down_spectrum=max(result.bytes_down - adapter, 0),
            bytes_up_spectrum=result.bytes_up,
        )
        for d in result.dropped:
            self.ledger.record_drop(
                d["node"], -1, f"secure round, step {d['step']}: {d['reason']}"
            )
        inputs = StageEndInputs()
        if result.arrays is None:
            log(WARNING, "Stage %d end: no secure sum. Keeping the spectrum.", stage)
            return inputs
        summed = result.arrays
        if self.privacy.dp:
            summed = clamp_noisy_stats(summed)
        reason = self.guard.secure_sum_reason(
            summed, result.num_examples, len(result.contributors), num_nodes
        )
        if reason is not None:
            log(WARNING, "Stage %d end: secure sum refused: %s", stage, reason)
            self.ledger.record_drop(-1, -1, f"secure sum: {reason}")
            return inputs
        if self.privacy.dp:
            summed = suppress_small_counts(summed)
        try:
            total = SkillStats.from_arrays(summed, self.skills)
        except (KeyError, ValueError) as err:
            log(WARNING, "Stage %d end: secure sum unusable: %s", stage, err)
            return inputs
        if float(total.count.sum()) > 0:
            if self.privacy.dp:
                self.releases.append(stage)
            inputs.spectrum_parts.append(total)
        return inputs
