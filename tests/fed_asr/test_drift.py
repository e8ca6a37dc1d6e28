"""Drift sums: pooling over clients equals the drift of the union of their data."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.drift import DriftSums, drift_row, drift_sums
from fed_asr.evaluation import AttentionProbe, DriftMonitor

SKILLS = ("color", "count", "shape")


def _probe(n: int, seed: int, shift: float = 0.0) -> AttentionProbe:
    gen = torch.Generator().manual_seed(seed)
    skills = [SKILLS[i % 2] for i in range(n)]  # color and count only
    return AttentionProbe(
        descriptors=torch.rand(n, 6, generator=gen) + shift,
        skills=skills,
        grounding=torch.rand(n // 2, generator=gen),
        uniform=torch.full((n // 2,), 0.25),
    )


def test_pooled_client_sums_equal_the_drift_of_all_their_samples() -> None:
    # Prepare: prototypes from one training probe; two clients' test probes
    monitor = DriftMonitor(SKILLS, cov_floor=1e-4)
    monitor.record(0, _probe(40, seed=0))
    a, b = _probe(10, seed=1, shift=0.3), _probe(14, seed=2, shift=0.3)
    union = AttentionProbe(
        torch.cat([a.descriptors, b.descriptors]),
        a.skills + b.skills,
        torch.cat([a.grounding, b.grounding]),
        torch.cat([a.uniform, b.uniform]),
    )
    # Execute
    pooled = drift_row(1, 0, monitor.sums(0, a).add(monitor.sums(0, b)))
    central = monitor.measure(1, 0, union)
    # Assert: the same row, and the sample-weighted (not client-averaged) mean
    assert pooled["drift"] == pytest.approx(central["drift"])
    assert pooled["grounding_share"] == pytest.approx(central["grounding_share"])
    assert set(pooled["drift"]) == {"color", "count"}
    assert pooled["drift_mean"] > 1.0  # shifted test data sits above the floor


def test_metrics_round_trip_and_hostile_values_refused() -> None:
    sums = drift_sums(
        torch.rand(6, 4),
        ["color", "shape"] * 3,
        {
            "color": (torch.zeros(4), torch.ones(4)),
            "shape": (torch.ones(4), torch.ones(4)),
        },
        torch.full((3,), 0.5),
        torch.full((3,), 0.2),
    )
    metrics = sums.to_metrics(2, SKILLS)
    back = DriftSums.from_metrics(metrics, 2, SKILLS)
    assert back.d2 == pytest.approx(sums.d2) and back.count == sums.count
    assert back.regions == 3 and back.grounding == pytest.approx(1.5)
    for key, bad in (
        ("drift-d2-2-0", -1.0),
        ("drift-d2-2-0", math.nan),
        ("drift-n-2-2", 0),
        ("ground-2", 10.0),
    ):
        with pytest.raises(ValueError, match="stage 2"):
            DriftSums.from_metrics({**metrics, key: bad}, 2, SKILLS)


def test_monitor_prototypes_survive_the_array_round_trip() -> None:
    monitor = DriftMonitor(SKILLS, cov_floor=1e-4)
    monitor.record(0, _probe(30, seed=3))
    monitor.record(1, _probe(30, seed=4, shift=1.0))
    restored = DriftMonitor(SKILLS, cov_floor=1e-4)
    restored.load_arrays(monitor.to_arrays())
    test = _probe(12, seed=5)
    for stage in (0, 1):
        assert restored.measure(1, stage, test) == monitor.measure(1, stage, test)
