"""FedASR: FedAvg over LoRA adapters plus a global skill spectrum."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_asr import protocol as P
from fed_asr.aggregation import get_spectrum_strategy
from fed_asr.config import PrivacyConfig, SecurityConfig, SpectrumConfig
from fed_asr.security.dp import clamp_noisy_stats, suppress_small_counts
from fed_asr.spectrum import SkillSpectrum, SkillStats, blend
from server.records import numpy_record, partition_of, record_bytes, record_to_numpy
from server.reply_validation import check_stats_reply
from server.secure_spectrum import SecureSpectrumRound
from server.signatures import sign_content

ReplyCheck = Callable[[Message, ArrayRecord | None], str | None]


def spectrum_wire_record(spectrum: SkillSpectrum) -> ArrayRecord:
    """The global spectrum as sent to clients: prototypes in float32.

    Prototypes only steer a regularizer; float32 halves the bytes of float64 at a
    relative precision of 6e-8. (Client statistics stay float64: they are summed.)
    """
    return numpy_record(
        {k: v.astype(np.float32) for k, v in spectrum.to_arrays().items()}
    )


def spectrum_version(record: ArrayRecord) -> str:
    """Digest naming one global spectrum (16 hex digits of SHA-256 of its arrays)."""
    digest = hashlib.sha256()
    for name in sorted(record):
        digest.update(name.encode())
        digest.update(record[name].data)
    return digest.hexdigest()[:16]


# Replaces FedAvg's per-array mean: (client adapters, num-examples) -> merged adapter
ArraysAggregator = Callable[
    [list[dict[str, np.ndarray]], list[float]], dict[str, np.ndarray]
]


def aggregate_losses(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of the ``loss-*`` metrics and summed training time."""
    weights = [float(r[P.METRICS_RECORD][weight_key]) for r in records]  # type: ignore[arg-type]
    total = sum(weights) or 1.0
    out: dict[str, float] = {P.NUM_EXAMPLES_KEY: sum(weights)}
    for record, weight in zip(records, weights, strict=True):
        metrics = record[P.METRICS_RECORD]
        for key, value in metrics.items():  # type: ignore[union-attr]
            if key.startswith(P.LOSS_PREFIX):
                out[key] = out.get(key, 0.0) + float(value) * weight / total
            elif key == P.TRAIN_SECONDS_KEY:
                out[key] = out.get(key, 0.0) + float(value)
    return MetricRecord(out)


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
    bytes_down_extra: int = 0  # method records (previous adapter, Fisher)
    bytes_up_extra: int = 0  # method records (Fisher sums, stage-end round)
    accuracy: dict[str, float] = field(default_factory=dict)
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


class FedASR(FedAvg):
    """Federated Attention-Spectrum Regularization on LoRA adapters.

    FedAvg of the LoRA weights (by ``num-examples``), a global skill spectrum sent with
    every train message, a stage-end spectrum round that merges per-skill sufficient
    statistics with a registered spectrum strategy, and per-stage evaluation.
    Method: ASR, https://arxiv.org/abs/2606.23063.

    Parameters
    ----------
    skills : Sequence[str]
        Skill names, the rows of the spectrum.
    spectrum_cfg : SpectrumConfig
        Merge strategy (``pooled``, ``mean``, ...) and temporal blending.
    cov_floor : float
        Variance floor of prototypes.
    send_spectrum : bool
        Whether train messages carry the global spectrum (methods that use it).
    seed : int
        Seeds node sampling per global round (reproducible, also after resume).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes : see ``FedAvg``.
    reply_check : Callable | None
        Extra validation of each train reply; returns a reason to drop it, or None.
    arrays_aggregator : Callable | None
        Replaces FedAvg's per-array mean of the adapters (e.g. ``lora.aggregation``
        ``exact``); called with the kept replies' arrays and ``num-examples``.
    privacy : PrivacyConfig | None
        ``secure_spectrum``: the stage-end round runs secure aggregation and the
        server sees only the sum of the statistics; ``dp``: statistics carry noise.
    security : SecurityConfig | None
        Bounds used to validate clear-text statistics replies.
    signing_key : Ed25519PrivateKey | None
        Signs the adapter and spectrum of every outgoing message (``security.sign``).
    """

    def __init__(
        self,
        *,
        skills: Sequence[str],
        spectrum_cfg: SpectrumConfig,
        cov_floor: float = 1e-4,
        send_spectrum: bool = True,
        seed: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        reply_check: ReplyCheck | None = None,
        arrays_aggregator: ArraysAggregator | None = None,
        privacy: PrivacyConfig | None = None,
        security: SecurityConfig | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=P.NUM_EXAMPLES_KEY,
            arrayrecord_key=P.ARRAYS_RECORD,
            configrecord_key=P.CONFIG_RECORD,
            train_metrics_aggr_fn=aggregate_losses,
        )
        self.skills = tuple(skills)
        self.spectrum_cfg = spectrum_cfg
        self.spectrum_strategy = get_spectrum_strategy(spectrum_cfg.strategy)
        self.cov_floor = cov_floor
        self.send_spectrum = send_spectrum
        self.seed = seed
        self.reply_check = reply_check
        self.arrays_aggregator = arrays_aggregator
        self.privacy = privacy or PrivacyConfig()
        self.security = security or SecurityConfig()
        self.signing_key = signing_key
        if (
            self.privacy.secure_spectrum
            and not self.spectrum_strategy.secure_compatible
        ):
            raise ValueError(
                f"`spectrum.strategy={spectrum_cfg.strategy}` needs each client's "
                "statistics, but `privacy.secure_spectrum=true` reveals only their "
                "sum. Use a secure-compatible strategy (pooled)."
            )
        # Stage-end statistics released to the server (DP accounting): one per stage
        self.releases: list[int] = []
        # Spectrum version each node confirmed, and what this round sent (node -> ver)
        self._spectrum_delivered: dict[int, str] = {}
        self._spectrum_sent: dict[int, str] = {}
        # Arrays sent in the current train round (reference of the reply checks)
        self.sent_arrays: ArrayRecord | None = None
        # Method records added to every train message (set per stage by the run)
        self.extra_train_records: dict[str, ArrayRecord] = {}
        # Replies (without errors) of the last stage-end round
        self.stage_end_replies: list[Message] = []
        self.global_spectrum: SkillSpectrum | None = None
        self.current_arrays: ArrayRecord | None = None
        self.stage = 0
        self.round_offset = 0
        self.rounds: list[RoundLog] = []
        self.on_round_end: Callable[[int], None] | None = None
        self._round_start = time.perf_counter()
        if not send_spectrum:
            log(
                INFO,
                "FedASR: the global spectrum is not sent (method does not use it).",
            )

    # -- helpers -------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        """Round number across stages (1-based)."""
        return self.round_offset + server_round

    def _log(self, server_round: int) -> RoundLog:
        number = self.global_round(server_round)
        if not self.rounds or self.rounds[-1].round != number:
            self.rounds.append(RoundLog(round=number, stage=self.stage))
        return self.rounds[-1]

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages plus the global round, stage and global spectrum.

        The spectrum changes only at stage ends, so it travels to a node only when
        the node has not yet confirmed the current version (a successful reply to a
        message that carried it); the config always names the version
        (``spectrum-version``, a digest of its content) and nodes keep the last one
        they received in their own state.
        """
        self._round_start = time.perf_counter()
        random.seed(self.seed * 100_003 + self.global_round(server_round))
        config[P.GLOBAL_ROUND_KEY] = self.global_round(server_round)
        config[P.STAGE_KEY] = self.stage
        spectrum_record, version = None, None
        if self.send_spectrum and self.global_spectrum is not None:
            spectrum_record = spectrum_wire_record(self.global_spectrum)
            version = spectrum_version(spectrum_record)
            config[P.SPECTRUM_VERSION_KEY] = version
        shared = list(super().configure_train(server_round, arrays, config, grid))
        # One content per node: the spectrum (and so the signatures) may differ
        messages = [
            Message(
                content=RecordDict(dict(m.content.items())),
                dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type,
            )
            for m in shared
        ]
        entry = self._log(server_round)
        entry.clients_sampled = len(messages)
        entry.bytes_down_adapter = record_bytes(arrays) * len(messages)
        self._spectrum_sent = {}
        if spectrum_record is not None and version is not None:
            for message in messages:
                node = message.metadata.dst_node_id
                if self._spectrum_delivered.get(node) != version:
                    message.content[P.SPECTRUM_RECORD] = spectrum_record
                    entry.bytes_down_spectrum += record_bytes(spectrum_record)
                    self._spectrum_sent[node] = version
        for name, record in self.extra_train_records.items():
            for message in messages:
                message.content[name] = record
            entry.bytes_down_extra += record_bytes(record) * len(messages)
        self.sent_arrays = arrays
        self._sign(messages, grid, self.global_round(server_round))
        return messages

    def _sign(self, messages: Iterable[Message], grid: Grid, round_: int) -> None:
        """Sign each message's adapter and spectrum (no-op without a signing key)."""
        if self.signing_key is None:
            return
        for message in messages:
            sign_content(
                self.signing_key,
                message.content,
                grid.run.run_id,
                round_,
                message.metadata.message_type,
            )

    def _decorator(self, grid: Grid, round_: int) -> Callable[[RecordDict, str], None]:
        """Signs contents built outside ``Message`` objects (secure round)."""

        def decorate(content: RecordDict, message_type: str) -> None:
            if self.signing_key is not None:
                sign_content(
                    self.signing_key, content, grid.run.run_id, round_, message_type
                )

        return decorate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed, empty or invalid replies, then FedAvg the rest (by node id)."""
        entry = self._log(server_round)
        replies = sorted(replies, key=partition_of)
        kept: list[Message] = []
        for msg in replies:
            reason = self._reject_reason(msg)
            if reason is None:
                kept.append(msg)
                continue
            if msg.has_error():
                entry.failures += 1
            else:
                entry.dropped.append(
                    {
                        "node": msg.metadata.src_node_id,
                        "partition": partition_of(msg),
                        "reason": reason,
                    }
                )
            log(
                WARNING,
                "Round %d: reply from node %d dropped: %s",
                self.global_round(server_round),
                msg.metadata.src_node_id,
                reason,
            )
        entry.clients_answered = sum(not m.has_error() for m in replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # it may have lost its state: send the spectrum again
                self._spectrum_delivered.pop(node, None)
            elif node in self._spectrum_sent:
                self._spectrum_delivered[node] = self._spectrum_sent[node]
        entry.bytes_up_adapter = sum(
            record_bytes(m.content.array_records.get(P.ARRAYS_RECORD))
            for m in replies
            if not m.has_error()
        )
        with_data = [m for m in kept if self._num_examples(m) > 0]
        if not with_data:
            log(
                WARNING,
                "Round %d: no reply with training data. Skipping aggregation.",
                self.global_round(server_round),
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, with_data)
        if arrays is not None and self.arrays_aggregator is not None:
            arrays = numpy_record(
                self.arrays_aggregator(
                    [record_to_numpy(m.content[P.ARRAYS_RECORD]) for m in with_data],
                    [float(self._num_examples(m)) for m in with_data],
                )
            )
        if arrays is not None:
            self.current_arrays = arrays
        if metrics is not None:
            entry.losses = {
                k[len(P.LOSS_PREFIX) :]: float(v)  # type: ignore[arg-type]
                for k, v in metrics.items()
                if k.startswith(P.LOSS_PREFIX)
            }
        return arrays, metrics

    @staticmethod
    def _num_examples(msg: Message) -> int:
        return int(msg.content[P.METRICS_RECORD][P.NUM_EXAMPLES_KEY])

    def _reject_reason(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        content = msg.content
        if P.ARRAYS_RECORD not in content.array_records:
            return f"missing ArrayRecord '{P.ARRAYS_RECORD}'"
        if P.METRICS_RECORD not in content.metric_records:
            return f"missing MetricRecord '{P.METRICS_RECORD}'"
        metrics = content.metric_records[P.METRICS_RECORD]
        if P.NUM_EXAMPLES_KEY not in metrics:
            return f"missing metric '{P.NUM_EXAMPLES_KEY}'"
        if self.reply_check is not None:
            return self.reply_check(msg, self.sent_arrays)
        return None

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluate messages with the number of stages seen so far."""
        config[P.NUM_SEEN_STAGES_KEY] = self.stage + 1
        config[P.GLOBAL_ROUND_KEY] = self.global_round(server_round)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sign(messages, grid, self.global_round(server_round))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pool correct/total counts per stage over clients; keep per-client scores."""
        valid, _ = self._check_and_log_replies(
            list(replies), is_train=False, validate=False
        )
        entry = self._log(server_round)
        correct = [0] * (self.stage + 1)
        total = [0] * (self.stage + 1)
        for msg in sorted(valid, key=partition_of):
            metrics = msg.content[P.METRICS_RECORD]
            row: dict[str, float] = {}
            for i in range(self.stage + 1):
                c = int(metrics.get(P.correct_key(i), 0))
                n = int(metrics.get(P.total_key(i), 0))
                correct[i] += c
                total[i] += n
                if n:
                    row[str(i)] = c / n
            entry.per_client[str(partition_of(msg))] = row
        pooled = {str(i): correct[i] / total[i] for i in range(len(total)) if total[i]}
        entry.accuracy = pooled
        entry.seconds = time.perf_counter() - self._round_start
        if self.on_round_end is not None:
            self.on_round_end(self.global_round(server_round))
        if not pooled:
            return None
        return MetricRecord({f"acc-{k}": v for k, v in pooled.items()})

    # -- stage-end spectrum round ----------------------------------------------------
    def spectrum_round(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        stage: int,
        timeout: float,
        merge: bool = True,
    ) -> SkillSpectrum | None:
        """Collect per-skill statistics from every node and update the global spectrum.

        Returns the new global spectrum (also kept on ``self``), or None when no node
        answered with statistics (the previous spectrum is kept). With ``merge=False``
        (methods whose clients keep their own spectrum or only send a Fisher) the
        round only queries the nodes; the replies are kept in ``stage_end_replies``.
        With ``privacy.secure_spectrum`` the statistics arrive only as their sum
        (``server.secure_spectrum``).
        """
        round_ = self.rounds[-1].round if self.rounds else self.round_offset
        if merge and self.privacy.secure_spectrum:
            return self._secure_spectrum_round(grid, arrays, stage, timeout, round_)
        node_ids = list(grid.get_node_ids())
        config = ConfigRecord({P.STAGE_KEY: stage})
        record = RecordDict({P.ARRAYS_RECORD: arrays, P.CONFIG_RECORD: config})
        messages = [
            Message(
                content=record,
                dst_node_id=node,
                message_type=(f"{MessageType.QUERY}.{P.SPECTRUM_ACTION}"),
            )
            for node in node_ids
        ]
        self._sign(messages, grid, round_)
        replies = sorted(
            grid.send_and_receive(messages, timeout=timeout), key=partition_of
        )
        self.stage_end_replies = [m for m in replies if not m.has_error()]
        if self.rounds:
            self.rounds[-1].bytes_down_adapter += record_bytes(arrays) * len(messages)
        if not merge:
            return None
        stats: list[SkillStats] = []
        up = 0
        for msg in replies:
            parsed = self._parse_stats(msg)
            if isinstance(parsed, str):
                self._record_drop(msg, f"stage-end statistics: {parsed}", stage)
                continue
            up += record_bytes(msg.content.array_records[P.STATS_RECORD])
            stats.append(parsed)
        if self.rounds:
            self.rounds[-1].bytes_up_spectrum += up
        if not stats or not any(float(s.count.sum()) > 0 for s in stats):
            log(
                WARNING,
                "Spectrum round, stage %d: no statistics. Keeping the spectrum.",
                stage,
            )
            return None
        if self.privacy.dp:
            self.releases.append(stage)
        merged = self.spectrum_strategy.merge(stats, self.spectrum_cfg, self.cov_floor)
        return self._update_spectrum(merged, stage, len(stats))

    def _update_spectrum(
        self, merged: SkillSpectrum, stage: int, num_clients: int
    ) -> SkillSpectrum:
        self.global_spectrum = blend(
            self.global_spectrum,
            merged,
            mode=self.spectrum_cfg.blend,
            alpha=self.spectrum_cfg.alpha,
        )
        log(
            INFO,
            "Spectrum round, stage %d: merged %d clients with '%s' (%s blend).",
            stage,
            num_clients,
            self.spectrum_cfg.strategy,
            self.spectrum_cfg.blend,
        )
        return self.global_spectrum

    def _record_drop(self, msg: Message, reason: str, stage: int) -> None:
        """Log a dropped stage-end reply and count it in the round log."""
        node = msg.metadata.src_node_id
        log(
            WARNING, "Stage %d end: reply from node %d dropped: %s", stage, node, reason
        )
        if not self.rounds:
            return
        if msg.has_error():
            self.rounds[-1].failures += 1
        else:
            self.rounds[-1].dropped.append(
                {"node": node, "partition": partition_of(msg), "reason": reason}
            )

    def _secure_spectrum_round(
        self, grid: Grid, arrays: ArrayRecord, stage: int, timeout: float, round_: int
    ) -> SkillSpectrum | None:
        """Stage-end round with secure aggregation: only the sum is ever seen."""
        session = f"{grid.run.run_id}/{stage}/{round_}"
        secure = SecureSpectrumRound(
            grid, self.privacy, session, timeout, self._decorator(grid, round_)
        )
        result = secure.run(arrays, stage, self.security.max_num_examples)
        self.stage_end_replies = []
        if self.rounds:
            entry = self.rounds[-1]
            adapter = record_bytes(arrays) * len(list(grid.get_node_ids()))
            entry.bytes_down_adapter += adapter
            entry.bytes_down_spectrum += max(result.bytes_down - adapter, 0)
            entry.bytes_up_spectrum += result.bytes_up
            entry.dropped.extend(
                {
                    "node": d["node"],
                    "partition": -1,
                    "reason": f"secure round, step {d['step']}: {d['reason']}",
                }
                for d in result.dropped
            )
        if result.arrays is None:
            log(WARNING, "Stage %d end: no secure sum. Keeping the spectrum.", stage)
            return None
        summed = result.arrays
        if self.privacy.dp:
            summed = suppress_small_counts(clamp_noisy_stats(summed))
        else:
            count = np.asarray(summed["count"])
            if count.size and float(count.max()) > result.num_examples + 0.5:
                reason = (
                    f"summed `count` max {float(count.max()):.1f} exceeds the "
                    f"contributors' num-examples {result.num_examples}"
                )
                log(WARNING, "Stage %d end: secure sum refused: %s", stage, reason)
                if self.rounds:
                    self.rounds[-1].dropped.append(
                        {"node": -1, "partition": -1, "reason": reason}
                    )
                return None
        try:
            total = SkillStats.from_arrays(summed, self.skills)
        except (KeyError, ValueError) as err:
            log(WARNING, "Stage %d end: secure sum unusable: %s", stage, err)
            return None
        if float(total.count.sum()) <= 0:
            return None
        if self.privacy.dp:
            self.releases.append(stage)
        merged = self.spectrum_strategy.merge(
            [total], self.spectrum_cfg, self.cov_floor
        )
        return self._update_spectrum(merged, stage, len(result.contributors))

    def _parse_stats(self, msg: Message) -> SkillStats | str:
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if P.STATS_RECORD not in msg.content.array_records:
            return f"missing ArrayRecord '{P.STATS_RECORD}'"
        metrics = msg.content.metric_records.get(P.METRICS_RECORD)
        if metrics is None or P.NUM_EXAMPLES_KEY not in metrics:
            return f"missing metric '{P.NUM_EXAMPLES_KEY}'"
        arrays = record_to_numpy(msg.content.array_records[P.STATS_RECORD])
        reason = check_stats_reply(
            arrays, dict(metrics), self.security, noisy=self.privacy.dp
        )
        if reason is not None:
            return reason
        if self.privacy.dp:
            arrays = suppress_small_counts(arrays)
        try:
            return SkillStats.from_arrays(arrays, self.skills)
        except (ValueError, KeyError) as err:
            return str(err)

    def summary(self) -> None:
        """Log FedASR's settings, then FedAvg's."""
        log(
            INFO,
            "\t├──> FedASR: stage %d, spectrum strategy '%s', blend '%s' (alpha %.2f)",
            self.stage,
            self.spectrum_cfg.strategy,
            self.spectrum_cfg.blend,
            self.spectrum_cfg.alpha,
        )
        log(INFO, "\t├──> Skills: %s", ", ".join(self.skills))
        super().summary()
