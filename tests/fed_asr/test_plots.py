"""Drift plots: every panel drawn from metrics.json rows, old rows without map shift."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg

from fed_asr.plots import plot_drift_curves


def _row(after: int, stage: int, drift: float, shift: float | None) -> dict:
    row = {
        "after_stage": after,
        "stage": stage,
        "drift": {"color": drift},
        "drift_mean": drift,
        "grounding_share": 0.3,
        "object_share": 0.1,
        "map_shift": shift,
    }
    if shift is None:  # a metrics.json written before map shift existed
        del row["map_shift"]
    return row


def test_drift_curves_draw_each_stage_with_and_without_map_shift(
    tmp_path: Path,
) -> None:
    rows = [_row(0, 0, 0.6, 0.0), _row(1, 0, 0.9, 0.4), _row(1, 1, 0.5, None)]

    path = plot_drift_curves(rows, ["plain", "clutter"], tmp_path / "drift.png")

    image = mpimg.imread(path)
    assert image.shape[1] > image.shape[0] > 100  # three panels side by side
