"""Drift sums: pooling over clients equals the drift of the union of their data."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.drift import DriftSums, drift_row, drift_sums, map_shift
from fed_asr.evaluation import AttentionProbe, DriftMonitor
from fed_asr.spectral import layer_head_features

SKILLS = ("color", "count", "shape")


def _maps(n: int, seed: int) -> torch.Tensor:
    """(n, 2, 4) random maps summing to 1 (2 layer-heads, 4 cells)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, 2, 4, generator=gen), dim=-1)


def _probe(n: int, seed: int, shift: float = 0.0) -> AttentionProbe:
    gen = torch.Generator().manual_seed(seed)
    skills = [SKILLS[i % 2] for i in range(n)]  # color and count only
    return AttentionProbe(
        descriptors=torch.rand(n, 6, generator=gen) + shift,
        skills=skills,
        grounding=torch.rand(n // 2, generator=gen),
        uniform=torch.full((n // 2,), 0.25),
        maps=_maps(n, seed),
    )


def _union(x: AttentionProbe, y: AttentionProbe) -> AttentionProbe:
    """One probe of both clients' samples (what a central run would see)."""
    return AttentionProbe(
        torch.cat([x.descriptors, y.descriptors]),
        x.skills + y.skills,
        torch.cat([x.grounding, y.grounding]),
        torch.cat([x.uniform, y.uniform]),
        torch.cat([x.maps, y.maps]),
    )


def test_pooled_client_sums_equal_the_drift_of_all_their_samples() -> None:
    # Prepare: prototypes from one training probe; two clients' test probes
    monitor = DriftMonitor(SKILLS, cov_floor=1e-4)
    monitor.record(0, _probe(40, seed=0))
    a, b = _probe(10, seed=1, shift=0.3), _probe(14, seed=2, shift=0.3)
    union = _union(a, b)
    # Execute
    pooled = drift_row(
        1, 0, monitor.sums(0, a, after=1).add(monitor.sums(0, b, after=1))
    )
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
    monitor.measure(0, 0, _probe(12, seed=6))  # the floor keeps stage 0's maps
    restored = DriftMonitor(SKILLS, cov_floor=1e-4)
    restored.load_arrays(monitor.to_arrays())
    torch.testing.assert_close(restored.reference_maps[0], monitor.reference_maps[0])
    test = _probe(12, seed=5)
    for stage in (0, 1):
        assert restored.measure(1, stage, test) == monitor.measure(1, stage, test)


def test_map_shift_sees_attention_that_moved_where_the_spectrum_cannot() -> None:
    # Prepare: 8x8 maps; the "moved" maps are the same maps rolled by 3 cells
    gen = torch.Generator().manual_seed(0)
    maps = torch.softmax(4 * torch.randn(5, 2, 8, 8, generator=gen).flatten(2), -1)
    moved = torch.roll(maps.reshape(5, 2, 8, 8), shifts=(3, 3), dims=(-2, -1))

    # Execute
    spectral_before = layer_head_features(maps.reshape(5, 2, 8, 8))
    spectral_after = layer_head_features(moved)
    shift = map_shift(maps, moved.flatten(2))

    # Assert: the power spectrum (hence the descriptor) cannot tell, the maps can
    torch.testing.assert_close(spectral_after, spectral_before, atol=1e-5, rtol=0)
    assert bool((shift > 0.5).all())
    torch.testing.assert_close(map_shift(maps, maps), torch.zeros(5))


def test_map_shift_matches_the_kl_by_hand() -> None:
    reference = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # (2 samples, 1 head, 2)
    current = torch.tensor([[[0.25, 0.75]], [[0.5, 0.5]]])
    expected = torch.tensor(
        [0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75), math.log(2.0)]
    )
    torch.testing.assert_close(map_shift(reference, current), expected)
    with pytest.raises(ValueError, match="same samples"):
        map_shift(reference, current[:1])


def test_map_shift_is_measured_against_the_floor_maps_and_pools_over_clients() -> None:
    # Prepare: two clients, each with its own monitor and test share
    a, b = _probe(10, seed=1), _probe(14, seed=2)
    clients = [DriftMonitor(SKILLS, cov_floor=1e-4) for _ in range(2)]
    central = DriftMonitor(SKILLS, cov_floor=1e-4)
    for monitor in (*clients, central):
        monitor.record(0, _probe(40, seed=0))
    floor = [m.sums(0, p, after=0) for m, p in zip(clients, (a, b), strict=True)]
    central_floor = central.measure(0, 0, _union(a, b))
    later_a, later_b = _probe(10, seed=1), _probe(14, seed=2)
    later_a.maps, later_b.maps = _maps(10, seed=7), _maps(14, seed=8)

    # Execute
    pooled = drift_row(
        1,
        0,
        clients[0].sums(0, later_a, after=1).add(clients[1].sums(0, later_b, after=1)),
    )
    row = central.measure(1, 0, _union(later_a, later_b))

    # Assert: zero on the floor; after, the sample-weighted mean of the per-sample KL
    assert floor[0].map_n == 10 and floor[0].map_kl == pytest.approx(0.0, abs=1e-6)
    assert central_floor["map_shift"] == pytest.approx(0.0, abs=1e-6)
    expected = torch.cat(
        [map_shift(a.maps, later_a.maps), map_shift(b.maps, later_b.maps)]
    ).mean()
    assert pooled["map_shift"] == pytest.approx(float(expected), rel=1e-5)
    assert row["map_shift"] == pytest.approx(float(expected), rel=1e-5)


def test_map_shift_metrics_round_trip_and_hostile_values_refused() -> None:
    sums = DriftSums(map_kl=1.5, map_n=3)
    metrics = sums.to_metrics(1, SKILLS)
    back = DriftSums.from_metrics(metrics, 1, SKILLS)
    assert (back.map_kl, back.map_n) == (1.5, 3)
    for key, bad in (
        ("drift-mapkl-1", -0.1),
        ("drift-mapkl-1", math.inf),
        ("drift-mapn-1", 2.5),
        ("drift-mapn-1", -1),
    ):
        with pytest.raises(ValueError, match="stage 1"):
            DriftSums.from_metrics({**metrics, key: bad}, 1, SKILLS)
    with pytest.raises(ValueError, match="stage 1"):
        DriftSums.from_metrics({"drift-mapkl-1": 0.3}, 1, SKILLS)  # kl without samples


def test_map_shift_of_almost_equal_float16_maps_is_never_negative() -> None:
    # Setup: float16 copies of one map, one with a rounding-sized change, so that
    # neither sums to exactly 1 (as a client's stored reference maps)
    torch.manual_seed(4)
    maps = torch.softmax(torch.randn(64, 4, 49), dim=-1)
    reference = maps.half()
    current = (maps * (1 + 1e-4 * torch.randn_like(maps))).half()

    # Execute
    shift = map_shift(reference, current)

    # Assert
    assert bool((shift >= 0).all())
    assert float(shift.max()) < 1e-4
