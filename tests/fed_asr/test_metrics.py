"""Continual metrics on hand-computed matrices."""

from __future__ import annotations

import math

import pytest

from fed_asr.metrics import (
    AccuracyMatrix,
    SkillAccuracyMatrices,
    continual_metrics,
    skill_counts,
)


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


def test_continual_metrics_improved_stage_gives_negative_forgetting() -> None:
    # Prepare: stage 0 improves after stage 1
    matrix = [[0.5, 0.0], [0.9, 0.4]]
    # Execute
    metrics = continual_metrics(matrix)
    # Assert: the max runs over rows 0..T-2 only: 0.5 - 0.9 = -0.4 (Chaudhry et al.)
    assert metrics.af == pytest.approx(-0.4)
    assert metrics.bwt == pytest.approx(0.4)


def test_continual_metrics_af_max_excludes_the_last_row() -> None:
    # Prepare: stage 0 peaks after stage 1 (0.9), ends at 0.6; stage 1 rises to 0.9
    matrix = [
        [0.5, 0.0, 0.0, 0.0],
        [0.9, 0.4, 0.0, 0.0],
        [0.7, 0.8, 0.6, 0.0],
        [0.6, 0.9, 0.5, 0.8],
    ]
    # Execute
    metrics = continual_metrics(matrix)
    # Assert: AF = ((0.9 - 0.6) + (0.8 - 0.9) + (0.6 - 0.5)) / 3
    assert metrics.af == pytest.approx((0.3 - 0.1 + 0.1) / 3)
    # BWT = ((0.6 - 0.5) + (0.9 - 0.4) + (0.5 - 0.6)) / 3
    assert metrics.bwt == pytest.approx((0.1 + 0.5 - 0.1) / 3)
    assert metrics.last == pytest.approx((0.6 + 0.9 + 0.5 + 0.8) / 4)


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


def test_continual_metrics_missing_entries_raise_unless_allowed() -> None:
    # Prepare: stage 1 was never scored after stage 1 (e.g. a skill absent there)
    matrix = [[0.5, math.nan, math.nan], [0.4, math.nan, math.nan], [0.2, 0.7, 0.9]]
    # Execute / Assert
    with pytest.raises(ValueError, match="non-finite"):
        continual_metrics(matrix)
    metrics = continual_metrics(matrix, allow_missing=True)
    # AF: stage 0 max(0.5, 0.4) - 0.2 = 0.3; stage 1 has no earlier entry
    assert metrics.af == pytest.approx(0.3)
    # BWT: stage 0 only (a[1][1] missing): 0.2 - 0.5
    assert metrics.bwt == pytest.approx(-0.3)
    assert metrics.avg == pytest.approx((0.5 + 0.4 + 0.6) / 3)


def test_skill_counts_counts_correct_and_total_per_skill() -> None:
    # Execute
    counts = skill_counts([True, False, True, True], ["color", "shape", "color", "x"])
    # Assert
    assert counts == {"color": (2, 2), "shape": (0, 1), "x": (1, 1)}


def test_skill_counts_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="`correct` has 2 entries"):
        skill_counts([True, False], ["color"])


def test_skill_accuracy_matrices_accumulate_and_round_trip_json() -> None:
    # Prepare: two clients score color on stage 0 after stage 0; shape appears later
    skills = SkillAccuracyMatrices(2)
    skills.add(0, 0, {"color": (3, 4)})
    skills.add(0, 0, {"color": (1, 4)})
    skills.add(1, 0, {"color": (2, 8)})
    skills.add(1, 1, {"color": (8, 8), "shape": (1, 2)})
    # Execute
    data = skills.to_json()
    restored = SkillAccuracyMatrices.from_json(data)
    # Assert
    assert data["color"]["accuracy_matrix"] == [[0.5, None], [0.25, 1.0]]
    assert data["color"]["metrics"]["AF"] == pytest.approx(0.25)
    assert data["shape"]["accuracy_matrix"] == [[None, None], [None, 0.5]]
    assert data["shape"]["metrics"]["AF"] is None
    assert data["shape"]["metrics"]["Last"] == pytest.approx(0.5)
    assert restored.to_json() == data
    assert skills.summary("color", completed_rows=1).last == pytest.approx(0.5)


def test_skill_accuracy_matrices_stage_out_of_range_raises() -> None:
    with pytest.raises(IndexError, match="`evaluated` 2 outside 0..1"):
        SkillAccuracyMatrices(2).add(1, 2, {"color": (1, 1)})
