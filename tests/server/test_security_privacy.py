"""Clients' statistics over real Flower messages: secure spectrum round and DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message
from security_helpers import NUM_NODES, _task_identity, federation

from fed_asr import protocol as P
from fed_asr.security.dp import calibrate_stats_noise, max_skills_per_sample
from fed_asr.security.secagg import flatten_arrays
from fed_asr.wire import record_arrays as record_to_numpy
from server.ledger import RoundLedger, RoundLog
from server.run import FederatedRun
from server.secure_spectrum import SecureSpectrumRound

__all__ = ["_task_identity", "federation"]  # fixtures shared via security_helpers


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
