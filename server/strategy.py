"""FedASR around any Flower Message-API strategy.

The adapters are aggregated by the inner strategy the user picks (FedAvg, FedAdam,
FedMedian, Krum, ...; ``server.adapter_strategies``). FedASR adds, the way Flower's
DP wrappers add clipping: the stage and round keys and the global spectrum on the way
out, reply validation on the way in, and per-stage pooled evaluation. With a
:class:`~server.reply_validation.ReplyGuard` no single reply can dominate a merge:
``num-examples`` is capped by what the client can hold, each share of the weight
optionally capped, each update clipped to ``security.norm_bound_factor`` times the
round's median norm, and evaluation counts validated and outliers flagged
(``docs/security.md``, "Poisoning"). Bookkeeping goes to the run's
:class:`~server.ledger.RoundLedger`; the stage-end round is ``server.stage_end``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_asr import protocol as P
from fed_asr.security.signing import MessageHeader
from fed_asr.security.validation import check_float32_range
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import content_signature, record_nbytes, reply_partition
from server.evaluation_pool import (
    accepted_evaluations,
    client_results,
    flag_outliers,
    pool_evaluation_counts,
    pool_stage_accuracy,
    stage_accuracy,
)
from server.ledger import RoundLedger
from server.merge_bounds import bounded_replies, num_examples
from server.records import numpy_record
from server.reply_validation import ReplyGuard

__all__ = [
    "FedASR",
    "aggregate_losses",
    "keep_dtypes",
    "pool_evaluation_counts",
    "pool_stage_accuracy",
    "spectrum_version",
    "spectrum_wire_record",
    "stage_accuracy",
]

ReplyCheck = Callable[[Message, ArrayRecord | None], str | None]


def spectrum_wire_record(spectrum: SkillSpectrum) -> ArrayRecord:
    """The global spectrum as sent to clients: prototypes in float32.

    Prototypes only steer a regularizer; float32 halves the bytes of float64 at a
    relative precision of 6e-8. (Client statistics stay float64: they are summed.)

    Raises
    ------
    ValueError
        If a value would overflow float32 (the cast would send inf).
    """
    arrays = spectrum.to_arrays()
    result = check_float32_range(arrays)
    if not result:
        raise ValueError(
            f"The global spectrum cannot travel in float32: {result.reason}"
        )
    return numpy_record({k: v.astype(np.float32) for k, v in arrays.items()})


def spectrum_version(record: ArrayRecord) -> str:
    """Digest naming one global spectrum (16 hex digits of SHA-256 of its arrays)."""
    digest = hashlib.sha256()
    for name in sorted(record):
        digest.update(name.encode())
        digest.update(record[name].data)
    return digest.hexdigest()[:16]


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


def keep_dtypes(arrays: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``arrays`` with the dtype of each array ``sent`` under the same name.

    The FedOpt family (FedAdam, FedYogi, FedAdagrad) returns float64 updates of the
    float32 adapter; the global adapter keeps the dtype it travels in, so replies
    validate against it and the bytes per round stay the same.
    """
    if all(
        name not in sent or array.dtype == sent[name].dtype
        for name, array in arrays.items()
    ):
        return arrays
    return numpy_record(
        {
            name: array.numpy().astype(sent[name].numpy().dtype)
            if name in sent
            else array.numpy()
            for name, array in arrays.items()
        }
    )


class FedASR(Strategy):
    """Federated Attention-Spectrum Regularization around an adapter strategy.

    Method: ASR, https://arxiv.org/abs/2606.23063.

    Parameters
    ----------
    strategy : Strategy
        The Message-API strategy that samples nodes and aggregates the adapters
        (built with ``weighted_by_key="num-examples"`` and the record keys of
        ``fed_asr.protocol``).
    ledger : RoundLedger
        Where each round's clients, drops, losses, bytes and accuracy are recorded.
    seed : int
        Seeds node sampling per global round (reproducible, also after resume).
    reply_check : ReplyCheck | None
        Extra validation of each train reply; returns a reason to drop it, or None.
    signing_key : Ed25519PrivateKey | None
        Signs every outgoing message whole (``security.sign``).
    guard : ReplyGuard | None
        The run's bounds on replies (caps of ``num-examples`` and test totals,
        update-norm clipping, weight shares, evaluation outliers); None: only
        ``reply_check``.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        ledger: RoundLedger,
        seed: int = 0,
        reply_check: ReplyCheck | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        guard: ReplyGuard | None = None,
    ) -> None:
        self.strategy = strategy
        self.ledger = ledger
        self.seed = seed
        self.reply_check = reply_check
        self.signing_key = signing_key
        self.guard = guard
        self._num_nodes = 0  # nodes of the grid, as of the last configure call
        self._signed_sequence = 0  # sequence of the last signed message
        self.stage = 0
        self.global_round = 0
        self._spectrum: ArrayRecord | None = None
        self._spectrum_version: str | None = None
        self._memory: dict[str, ArrayRecord] = {}
        # Spectrum version each node confirmed, and what this round sent (node -> ver)
        self._delivered: dict[int, str] = {}
        self._sent_to: dict[int, str] = {}
        self._sent_arrays: ArrayRecord | None = None
        self._round_start = time.perf_counter()

    def begin_round(
        self,
        stage: int,
        global_round: int,
        spectrum: SkillSpectrum | None,
        memory: dict[str, ArrayRecord],
    ) -> None:
        """Set what the next round's messages carry besides the adapter.

        Parameters
        ----------
        stage, global_round : int
            The stage (0-based) and the round number across stages (1-based).
        spectrum : SkillSpectrum | None
            Global spectrum for train messages (None: the method uses none).
        memory : dict[str, ArrayRecord]
            The method's memory records, carried by every train message.
        """
        self.stage, self.global_round = stage, global_round
        self._memory = dict(memory)
        if spectrum is None:
            self._spectrum = self._spectrum_version = None
        else:
            self._spectrum = spectrum_wire_record(spectrum)
            self._spectrum_version = spectrum_version(self._spectrum)

    def _round(self, server_round: int) -> int:
        """Round number for the inner strategy: the global round once one is set.

        The run calls ``start(num_rounds=1)`` per round, so Flower's ``server_round``
        is always 1; round-dependent strategies (FedAdam's bias correction) and the
        ``server-round`` config key need the round across stages.
        """
        return self.global_round if self.global_round > 0 else server_round

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages with the round, stage and global spectrum.

        The spectrum changes only at stage ends, so it travels only while a sampled
        node has not confirmed the current version (a successful reply to a message
        that carried it); the config always names the version and nodes keep the
        last one they received in their own state.
        """
        self._round_start = time.perf_counter()
        self._num_nodes = len(list(grid.get_node_ids()))
        random.seed(self.seed * 100_003 + self.global_round)
        config[P.GLOBAL_ROUND_KEY] = self.global_round
        config[P.STAGE_KEY] = self.stage
        if self._spectrum_version is not None:
            config[P.SPECTRUM_VERSION_KEY] = self._spectrum_version
        messages = list(
            self.strategy.configure_train(
                self._round(server_round), arrays, config, grid
            )
        )
        entry = self.ledger.entry(self.global_round, self.stage)
        entry.clients_sampled = len(messages)
        entry.bytes_down_adapter = record_nbytes(arrays) * len(messages)
        nodes = [m.metadata.dst_node_id for m in messages]
        version = self._spectrum_version
        self._sent_to = {}
        extra = dict(self._memory)
        if version is not None and any(
            self._delivered.get(n) != version for n in nodes
        ):
            extra[P.SPECTRUM_RECORD] = self._spectrum  # type: ignore[assignment]
            self._sent_to = dict.fromkeys(nodes, version)
            entry.bytes_down_spectrum += record_nbytes(self._spectrum) * len(messages)
        for message in messages:  # the inner strategies share one content
            for name, record in extra.items():
                if name not in message.content:
                    message.content[name] = record
        entry.bytes_down_extra += sum(
            record_nbytes(r) for r in self._memory.values()
        ) * len(messages)
        self._sent_arrays = arrays
        self.sign(messages, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop failed, empty or invalid replies, then let the inner strategy merge."""
        entry = self.ledger.entry(self.global_round, self.stage)
        replies = sorted(replies, key=reply_partition)
        kept: list[Message] = []
        for msg in replies:
            reason = self._reject_reason(msg)
            if reason is None:
                kept.append(msg)
                continue
            self.ledger.record_drop(
                msg.metadata.src_node_id,
                reply_partition(msg),
                reason,
                failure=msg.has_error(),
            )
            log(
                WARNING,
                "Round %d: reply from node %d dropped: %s",
                self.global_round,
                msg.metadata.src_node_id,
                reason,
            )
        entry.clients_answered = sum(not m.has_error() for m in replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # it may have lost its state: send the spectrum again
                self._delivered.pop(node, None)
            elif node in self._sent_to:
                self._delivered[node] = self._sent_to[node]
        entry.bytes_up_adapter = sum(
            record_nbytes(m.content.array_records.get(P.ARRAYS_RECORD))
            for m in replies
            if not m.has_error()
        )
        with_data = [m for m in kept if num_examples(m) > 0]
        if not with_data:
            log(
                WARNING,
                "Round %d: no reply with training data. Skipping aggregation.",
                self.global_round,
            )
            return None, None
        # Losses are pooled here (clients may report different terms, e.g. no
        # `spec` before a client has a prototype); the inner strategy sees only the
        # adapter and `num-examples`, so no client's extra metric can stop it.
        metrics = aggregate_losses([m.content for m in with_data], P.NUM_EXAMPLES_KEY)
        security = self.guard.security if self.guard is not None else None
        uniform = bounded_replies(with_data, self._sent_arrays, security, entry)
        arrays, _ = self.strategy.aggregate_train(self._round(server_round), uniform)
        if arrays is not None and self._sent_arrays is not None:
            arrays = keep_dtypes(arrays, self._sent_arrays)
        entry.losses = {
            k[len(P.LOSS_PREFIX) :]: float(v)  # type: ignore[arg-type]
            for k, v in metrics.items()
            if k.startswith(P.LOSS_PREFIX)
        }
        return arrays, metrics

    def _reject_reason(self, msg: Message) -> str | None:
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        content = msg.content
        if P.ARRAYS_RECORD not in content.array_records:
            return f"missing ArrayRecord '{P.ARRAYS_RECORD}'"
        if P.METRICS_RECORD not in content.metric_records:
            return f"missing MetricRecord '{P.METRICS_RECORD}'"
        if P.NUM_EXAMPLES_KEY not in content.metric_records[P.METRICS_RECORD]:
            return f"missing metric '{P.NUM_EXAMPLES_KEY}'"
        if self.reply_check is not None:
            reason = self.reply_check(msg, self._sent_arrays)
            if reason is not None:
                return reason
        if self.guard is not None:
            return self.guard.train_reason(msg, self.stage, self._num_nodes)
        return None

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages with the number of stages seen."""
        config[P.NUM_SEEN_STAGES_KEY] = self.stage + 1
        config[P.GLOBAL_ROUND_KEY] = self.global_round
        self._num_nodes = len(list(grid.get_node_ids()))
        messages = list(
            self.strategy.configure_evaluate(
                self._round(server_round), arrays, config, grid
            )
        )
        entry = self.ledger.entry(self.global_round, self.stage)
        entry.bytes_down_evaluate = record_nbytes(arrays) * len(messages)
        self.sign(messages, grid)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pooled accuracy and counts per stage; per-client rows to the log.

        With a guard, a reply with counts no honest client can report is dropped
        (recorded with its reason), and a client whose accuracy is an outlier among
        the others' is flagged (``flagged`` of the round; it stays in the pool).
        """
        entry = self.ledger.entry(self.global_round, self.stage)
        seen = self.stage + 1
        valid = accepted_evaluations(
            list(replies), self.guard, seen, self._num_nodes, self.ledger
        )
        results = client_results(valid, seen)
        for client, rows in results.items():
            entry.per_client[client] = {str(i): c / n for i, (c, n) in rows.items()}
        if self.guard is not None:
            flag_outliers(self.guard, results, valid, entry)
        # Pooled here, not by the inner strategy: clients report different keys
        # (a skill missing from a client's test split), which Flower refuses.
        entry.counts = pool_evaluation_counts([m.content for m in valid])
        entry.accuracy = stage_accuracy(entry.counts)
        pooled = (
            MetricRecord({f"acc-{k}": v for k, v in entry.accuracy.items()})
            if valid
            else None
        )
        entry.seconds = time.perf_counter() - self._round_start
        return pooled

    # -- signatures ------------------------------------------------------------------
    def sign(self, messages: Sequence[Message], grid: Grid) -> None:
        """Sign each whole message for its node (no-op without a signing key).

        The inner strategies give all messages one shared content; a signature names
        its destination, so each message gets its own content (same records) first.
        """
        if self.signing_key is None:
            return
        for message in messages:
            message.content = RecordDict(dict(message.content))
            self.sign_content(
                message.content,
                grid,
                message.metadata.message_type,
                message.metadata.dst_node_id,
            )

    def sign_content(
        self, content: RecordDict, grid: Grid, message_type: str, dst_node: int
    ) -> None:
        """Sign one final content for ``dst_node`` (no-op without a signing key).

        The signature covers every record of ``content`` and binds the run, the
        global round, the next sequence number, ``message_type`` and ``dst_node``.
        Call it once per message, after the content is final, in sending order.
        """
        if self.signing_key is None:
            return
        self._signed_sequence += 1
        header = MessageHeader(
            run_id=int(grid.run.run_id),
            round=self.global_round,
            sequence=self._signed_sequence,
            message_type=message_type,
            dst_node=int(dst_node),
        )
        content[P.SIGNATURE_RECORD] = ConfigRecord(
            content_signature(self.signing_key, content, header)
        )

    def summary(self) -> None:
        """Log FedASR's settings, then the inner strategy's."""
        log(
            INFO,
            "\t├──> FedASR around %s: stage %d, round %d",
            type(self.strategy).__name__,
            self.stage + 1,
            self.global_round,
        )
        self.strategy.summary()
