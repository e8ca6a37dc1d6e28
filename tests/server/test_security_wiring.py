"""Security over real Flower messages: secure spectrum round, DP, reply validation,
signatures and checkpoint integrity (ClientApps in process, protobuf on the wire)."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import make_client_app
from clients.secure import stage_statistics
from clients.site import site_from_context
from clients.testing import LoopbackGrid
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig, compose_config
from fed_asr.methods import StageEndPlan
from fed_asr.models import adapter_state, load_adapter_state
from fed_asr.schedule import StageEndInputs, update_spectrum
from fed_asr.security.checkpoint_integrity import IntegrityError
from fed_asr.security.dp import calibrate_stats_noise, max_skills_per_sample
from fed_asr.security.secagg import flatten_arrays
from fed_asr.security.signing import (
    SignatureError,
    generate_signing_key,
    save_public_key,
)
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays as record_to_numpy
from server.adapter_strategies import build_adapter_strategy
from server.checkpoint import ADAPTER, Checkpoint, Checkpointer
from server.ledger import RoundLedger, RoundLog
from server.records import numpy_record
from server.reply_validation import make_train_reply_check
from server.run import FederatedRun
from server.secure_spectrum import SecureSpectrumRound
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
        contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={
                    P.NODE_PARTITION_ID: p,
                    P.NODE_NUM_PARTITIONS: NUM_NODES,
                    **(node_config or {}),
                },
                state=RecordDict(),
                run_config=run_config,
            )
            for node, p in self.nodes.items()
        }
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


def _sum(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: sum(s[k] for s in stats) for k in stats[0]}


# -- secure aggregation over messages ------------------------------------------------
def test_secure_round_sum_equals_plain_sum_and_masked_reply_looks_uniform(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: capture what the server receives at the masking step
    fed = federation(**{"privacy.secure_spectrum": "true"})
    plain = _sum(fed.clear_stats())
    masked: dict[int, np.ndarray] = {}

    def capture(node: int, msg: Message, reply: Message) -> Message:
        if P.SECAGG_MASKED_RECORD in reply.content.array_records:
            record = reply.content.array_records[P.SECAGG_MASKED_RECORD]
            masked[node] = record_to_numpy(record)["vector"]
        return reply

    fed.grid.on_reply = capture
    # Execute
    result = SecureSpectrumRound(
        fed.grid, fed.cfg.privacy, "7/0/1", 60.0, skills=tuple(fed.skills)
    ).run(fed.arrays, 0, 10**6)
    # Assert: the sum within fixed-point resolution (n / (2 scale) per entry)
    assert result.arrays is not None and sorted(result.contributors) == sorted(
        fed.nodes
    )
    tolerance = NUM_NODES / (2 * fed.cfg.privacy.secagg_scale) + 1e-12
    for key, value in plain.items():
        np.testing.assert_allclose(result.arrays[key], value, rtol=0, atol=tolerance)
    # Assert: one masked vector is unrelated to its node's statistics
    true_vector, _ = flatten_arrays(fed.clear_stats()[0])
    vector = masked[min(fed.nodes)].astype(np.float64)
    assert abs(np.corrcoef(vector, true_vector)[0, 1]) < 0.2
    bits = (masked[min(fed.nodes)][:, None] >> np.arange(62, dtype=np.uint64)) & 1
    assert abs(float(bits.mean()) - 0.5) < 0.05


@pytest.mark.parametrize(
    ("step", "in_sum"), [(P.SECAGG_MASK, False), (P.SECAGG_UNMASK, True)]
)
def test_secure_round_with_one_dropout_still_yields_the_correct_sum(
    federation, step: str, in_sum: bool
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the last node stops answering at `step`
    fed = federation(**{"privacy.secure_spectrum": "true"})
    stats = fed.clear_stats()
    leaver = max(fed.nodes)

    def drop(node: int, msg: Message) -> bool:
        config = msg.content.config_records.get(P.CONFIG_RECORD, ConfigRecord())
        return node == leaver and config.get(P.SECAGG_STEP_KEY) == step

    fed.grid.drop = drop
    # Execute
    result = SecureSpectrumRound(
        fed.grid, fed.cfg.privacy, "7/0/1", 60.0, skills=tuple(fed.skills)
    ).run(fed.arrays, 0, 10**6)
    # Assert: dropping before masking leaves the sum of the rest; after, all three
    expected = _sum(stats if in_sum else stats[:-1])
    assert result.arrays is not None
    for key, value in expected.items():
        np.testing.assert_allclose(result.arrays[key], value, atol=1e-6)
    assert (leaver in result.contributors) == in_sum
    assert [d["node"] for d in result.dropped] == [leaver]


def test_secure_stage_end_round_gives_the_plain_pooled_spectrum(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    plain_fed = federation()
    secure_fed = federation(**{"privacy.secure_spectrum": "true"})
    # Execute
    plain = plain_fed.spectrum()
    secure = secure_fed.spectrum()
    # Assert
    assert plain is not None and secure is not None
    torch.testing.assert_close(secure.mean, plain.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(secure.var, plain.var, atol=1e-5, rtol=0)


def test_secure_spectrum_refuses_a_strategy_that_needs_client_statistics(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    fed = federation(
        **{"privacy.secure_spectrum": "true", "spectrum.strategy": "median"}
    )
    # Execute / Assert: refused at the start of the run, before any round
    with pytest.raises(ValueError, match="spectrum.strategy=median"):
        FederatedRun(fed.cfg, fed.grid).run()
    assert not (Path(fed.cfg.output_dir) / "checkpoint" / "LATEST").exists()


# -- differential privacy -------------------------------------------------------------
def test_dp_noise_on_client_statistics_has_the_calibrated_scale(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the same node, clipped statistics without and with noise
    clean = federation(**{"privacy.dp_clip": 10.0})
    cfg_overrides = {
        "privacy.dp": "true",
        "privacy.dp_seed": 3,
        "privacy.dp_clip": 10.0,
    }
    noisy_fed = federation(**cfg_overrides)
    # Execute
    reference = clean.clear_stats()[0]
    noisy = noisy_fed.clear_stats()[0]
    # Assert: standardised differences of the sums (never clamped) ~ N(0, 1)
    cfg = noisy_fed.cfg
    m = max_skills_per_sample(cfg.regularizer.tau_skill, len(noisy_fed.skills))
    stds = calibrate_stats_noise(cfg.privacy, m).stds
    z = ((noisy["sum"] - reference["sum"]) / stds["sum"]).ravel()
    assert z.size > 100
    assert abs(float(z.std()) - 1.0) < 0.15
    assert abs(float(z.mean())) < 0.2


# -- reply validation ---------------------------------------------------------------
def _corrupt(kind: str, reply: Message) -> Message:
    content = reply.content
    arrays = record_to_numpy(content.array_records[P.ARRAYS_RECORD])
    metrics = content.metric_records[P.METRICS_RECORD]
    first = sorted(arrays)[0]
    if kind == "nan":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = np.nan
    elif kind == "shape":
        arrays[first] = np.zeros((3, 3), dtype=np.float32)
    elif kind == "key":
        arrays["intruder.weight"] = arrays.pop(first)
    elif kind == "negative":
        metrics[P.NUM_EXAMPLES_KEY] = -5
    elif kind == "huge":
        metrics[P.NUM_EXAMPLES_KEY] = 10**9
    elif kind == "norm":
        arrays[first] = arrays[first] + 1e4
    content[P.ARRAYS_RECORD] = numpy_record(arrays)
    return reply


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "non-finite"),
        ("shape", "shape"),
        ("key", "expected arrays"),
        ("negative", "num-examples"),
        ("huge", "num-examples"),
        ("norm", "norm"),
    ],
)
def test_bad_train_reply_is_dropped_and_logged_with_its_node(
    federation, kind: str, reason: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: node 1000 sends a corrupted reply, the others are honest
    fed = federation()
    fed.grid.on_reply = lambda node, msg, reply: (
        _corrupt(kind, reply) if node == 1000 else reply
    )
    strategy = fed.strategy(reply_check=make_train_reply_check(fed.cfg.security))
    strategy.begin_round(0, 1, None, {})
    # Execute
    messages = strategy.configure_train(1, fed.arrays, ConfigRecord(), fed.grid)
    replies = fed.grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the round went on with the two honest replies
    dropped = strategy.ledger.rounds[-1].dropped
    assert arrays is not None
    assert [d["node"] for d in dropped] == [1000]
    assert reason in dropped[0]["reason"]
    assert all(np.isfinite(v).all() for v in record_to_numpy(arrays).values())


def test_bad_statistics_reply_is_dropped_and_counted(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: node 1001 claims more skill samples than examples
    fed = federation()

    def inflate(node: int, msg: Message, reply: Message) -> Message:
        if node == 1001 and P.STATS_RECORD in reply.content.array_records:
            stats = record_to_numpy(reply.content.array_records[P.STATS_RECORD])
            stats["count"] = stats["count"] + 1000
            reply.content[P.STATS_RECORD] = numpy_record(stats)
        return reply

    fed.grid.on_reply = inflate
    ledger = RoundLedger([RoundLog(round=1, stage=0)])
    # Execute
    inputs = fed.stage_end(ledger)
    # Assert: the two honest parts are kept, the inflated one dropped and named
    assert len(inputs.spectrum_parts) == NUM_NODES - 1
    assert [d["node"] for d in ledger.rounds[-1].dropped] == [1001]
    assert "exceeds" in ledger.rounds[-1].dropped[0]["reason"]


# -- signatures -----------------------------------------------------------------------
def _signed_federation(federation, tmp_path: Path):  # type: ignore[no-untyped-def]
    key = generate_signing_key()
    public = tmp_path / "signing.pub"
    save_public_key(key.public_key(), public)
    fed = federation(node_config={P.NODE_VERIFY_KEY: str(public)})
    return fed, fed.strategy(signing_key=key)


def _evaluate(fed: Federation, strategy: FedASR, round_: int) -> list[Message]:
    strategy.begin_round(0, round_, None, {})  # the signed round is the global one
    messages = strategy.configure_evaluate(1, fed.arrays, ConfigRecord(), fed.grid)
    return list(fed.grid.send_and_receive(messages))


def test_signed_messages_verify_and_a_tampered_adapter_is_refused(
    federation, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    fed, strategy = _signed_federation(federation, tmp_path)
    honest = _evaluate(fed, strategy, 1)

    def tamper(node: int, msg: Message) -> bool:
        if node == 1002:
            arrays = record_to_numpy(msg.content.array_records[P.ARRAYS_RECORD])
            name = sorted(arrays)[0]
            arrays[name] = arrays[name] + 1e-3
            msg.content[P.ARRAYS_RECORD] = numpy_record(arrays)
        return False

    fed.grid.drop = tamper
    # Execute
    replies = _evaluate(fed, strategy, 2)
    # Assert: honest nodes accept, the tampered copy is refused with a clear reason
    assert not any(m.has_error() for m in honest)
    errors = {m.metadata.src_node_id: m for m in replies if m.has_error()}
    assert list(errors) == [1002]
    assert "Signature check failed" in errors[1002].error.reason


def test_unsigned_or_replayed_message_is_refused_by_a_verifying_node(
    federation, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    fed, strategy = _signed_federation(federation, tmp_path)
    _evaluate(fed, strategy, 3)
    # Execute: an older round (replay), then a message without signature
    replayed = _evaluate(fed, strategy, 2)
    strategy.signing_key = None
    unsigned = _evaluate(fed, strategy, 4)
    # Assert
    assert all(m.has_error() and "replayed" in m.error.reason for m in replayed)
    assert all(m.has_error() and "signature" in m.error.reason for m in unsigned)


# -- checkpoint integrity -----------------------------------------------------------
def test_resume_refuses_a_tampered_checkpoint(tmp_path: Path) -> None:
    # Prepare
    key = generate_signing_key()
    checkpointer = Checkpointer(tmp_path / "ckpt", signing_key=key)
    adapter = {"w": torch.arange(6, dtype=torch.float32)}
    folder = checkpointer.save(Checkpoint(3, adapter, None, {"rounds": []}))
    assert checkpointer.load_latest() is not None
    # Execute: change one byte of the adapter file
    data = bytearray((folder / ADAPTER).read_bytes())
    data[-1] ^= 1
    (folder / ADAPTER).write_bytes(bytes(data))
    # Assert
    with pytest.raises(IntegrityError, match=ADAPTER):
        checkpointer.load_latest()


def test_resume_refuses_a_manifest_rewritten_without_the_key(tmp_path: Path) -> None:
    # Prepare: an attacker edits the adapter and rewrites an unsigned manifest
    from fed_asr.security.checkpoint_integrity import write_manifest

    key = generate_signing_key()
    checkpointer = Checkpointer(tmp_path / "ckpt", signing_key=key)
    folder = checkpointer.save(
        Checkpoint(1, {"w": torch.zeros(2)}, None, {"rounds": []})
    )
    (folder / ADAPTER).write_bytes((folder / ADAPTER).read_bytes()[:-1] + b"\x01")
    write_manifest(folder, generate_signing_key())
    # Execute / Assert
    with pytest.raises(SignatureError):
        checkpointer.load_latest()


# -- spectrum delivery ----------------------------------------------------------------
def _train_round(
    fed: Federation, strategy: FedASR, round_: int, spectrum: SkillSpectrum
) -> tuple[list[int], list[Message]]:
    strategy.begin_round(1, round_, spectrum, {})
    messages = list(
        strategy.configure_train(round_, fed.arrays, ConfigRecord(), fed.grid)
    )
    carried = sorted(
        m.metadata.dst_node_id
        for m in messages
        if P.SPECTRUM_RECORD in m.content.array_records
    )
    replies = list(fed.grid.send_and_receive(messages))
    strategy.aggregate_train(round_, replies)
    return carried, replies


def test_global_spectrum_travels_once_per_version_and_is_resent_after_state_loss(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a global spectrum from a stage-end round of stage 0
    fed = federation()
    spectrum = fed.spectrum()
    assert spectrum is not None
    strategy = fed.strategy()
    # Execute: two rounds; then node 1001 loses its state; two more rounds
    first, _ = _train_round(fed, strategy, 1, spectrum)
    second, replies = _train_round(fed, strategy, 2, spectrum)
    fed.grid.contexts[1001].state = RecordDict()
    third, failed = _train_round(fed, strategy, 3, spectrum)
    fourth, _ = _train_round(fed, strategy, 4, spectrum)
    # Assert: sent once; after the node that lost it fails, sent again. The inner
    # strategy gives every message one shared content, so the spectrum goes to all
    # sampled nodes while any of them has not confirmed the version.
    assert first == sorted(fed.nodes) and second == [] and third == []
    assert all(m.content[P.METRICS_RECORD][P.loss_key("spec")] > 0 for m in replies)
    assert [m.metadata.src_node_id for m in failed if m.has_error()] == [1001]
    assert "never received" in next(m for m in failed if m.has_error()).error.reason
    assert fourth == sorted(fed.nodes)
    bytes_down = [r.bytes_down_spectrum for r in strategy.ledger.rounds]
    assert bytes_down[1] == bytes_down[2] == 0 < bytes_down[3] == bytes_down[0]


def test_secure_configured_nodes_send_no_statistics_to_a_downgraded_clear_round(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the nodes are configured for secure aggregation; a hostile server
    # asks for the statistics with a plain (clear-text) stage-end query instead
    fed = federation(**{"privacy.secure_spectrum": "true"})
    ledger = RoundLedger([RoundLog(round=1, stage=0)])
    # Execute
    inputs = fed.stage_end(ledger, secure=False)
    # Assert: no node answered with statistics; every reply is recorded as dropped
    assert inputs.spectrum_parts == []
    reasons = [d["reason"] for d in ledger.rounds[-1].dropped]
    assert len(reasons) == NUM_NODES
    assert all("missing ArrayRecord 'stats'" in r for r in reasons)
