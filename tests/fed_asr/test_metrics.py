"""Continual metrics on hand-computed matrices."""

from __future__ import annotations

import math

import pytest

from fed_asr.metrics import AccuracyMatrix, continual_metrics


def test_continual_metrics_three_stages_match_hand_computation() -> None:
    # Prepare
    matrix = [
        [0.9, 0.0, 0.0],
        [0.6, 0.8, 0.0],
        [0.3, 0.7, 0.95],
    ]
    # Execute
    metrics = continual_metrics(matrix)
    # Assert
    assert metrics.last == pytest.approx((0.3 + 0.7 + 0.95) / 3)
    assert metrics.avg == pytest.approx(
        (0.9 + (0.6 + 0.8) / 2 + (0.3 + 0.7 + 0.95) / 3) / 3
    )
    # AF: stage 0 max 0.9 -> 0.3 (0.6); stage 1 max 0.8 -> 0.7 (0.1)
    assert metrics.af == pytest.approx((0.6 + 0.1) / 2)
    # BWT: (0.3 - 0.9 + 0.7 - 0.8) / 2
    assert metrics.bwt == pytest.approx((-0.6 - 0.1) / 2)


def test_continual_metrics_af_uses_max_over_later_rows() -> None:
    # Prepare: stage 0 improves after stage 1 then drops
    matrix = [[0.5, 0.0], [0.9, 0.4]]
    # Execute
    metrics = continual_metrics(matrix)
    # Assert: max_{t>=0} a[t][0] = 0.9 is also the last value -> AF 0, BWT +0.4
    assert metrics.af == pytest.approx(0.0)
    assert metrics.bwt == pytest.approx(0.4)


def test_continual_metrics_single_stage_has_no_forgetting() -> None:
    metrics = continual_metrics([[0.7]])
    assert (metrics.last, metrics.avg, metrics.af, metrics.bwt) == (0.7, 0.7, 0.0, 0.0)


def test_continual_metrics_ignores_upper_triangle_nan() -> None:
    metrics = continual_metrics([[0.5, math.nan], [0.25, 1.0]])
    assert metrics.af == pytest.approx(0.25)


def test_continual_metrics_non_square_raises() -> None:
    with pytest.raises(ValueError, match="T x T"):
        continual_metrics([[0.1, 0.2]])


def test_accuracy_matrix_round_trip_and_partial_summary() -> None:
    # Prepare
    matrix = AccuracyMatrix(3)
    matrix.set_row(0, [0.8])
    matrix.set_row(1, [0.4, 0.9])
    # Execute
    restored = AccuracyMatrix.from_list(matrix.to_list())
    summary = restored.summary()
    # Assert
    assert restored.to_list()[2] == [None, None, None]
    assert restored.completed_rows == 2
    assert summary.af == pytest.approx(0.4)
