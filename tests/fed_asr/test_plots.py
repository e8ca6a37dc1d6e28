"""Drift plots (metrics.json rows, old rows without map shift), per-seed and
per-group plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg

from fed_asr.plots import plot_drift_curves, plot_gaps_by_group, plot_paired_seeds


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


def test_paired_seeds_draw_one_panel_per_method(tmp_path: Path) -> None:
    pairs = {
        "asr": {0: (0.5, 0.3), 1: (0.45, 0.32)},
        "asr_local": {0: (0.5, 0.36), 1: (0.45, 0.35)},
        "lwf": {},  # a method with no shared seed still gets an (empty) panel
    }

    path = plot_paired_seeds(pairs, tmp_path / "paired.png", baseline="vanilla")

    image = mpimg.imread(path)
    assert image.shape[1] > 2.5 * image.shape[0]  # three panels side by side


def test_gaps_by_group_draw_one_column_per_group(tmp_path: Path) -> None:
    gaps = {f"base{b}": [-0.1 * b, 0.05] for b in range(8)}
    gaps["empty"] = []  # a group without pairs keeps its column, with nothing in it

    path = plot_gaps_by_group(gaps, tmp_path / "gaps.png", label="asr - vanilla AF")

    image = mpimg.imread(path)
    assert image.shape[1] > 2 * image.shape[0]  # nine columns: wider than tall


def test_gaps_by_group_add_a_panel_against_a_covariate(tmp_path: Path) -> None:
    gaps = {"base0": [-0.1, -0.05], "base1": [0.02, 0.0], "base2": [-0.2, -0.1]}
    alone = plot_gaps_by_group(gaps, tmp_path / "alone.png", label="gap")

    path = plot_gaps_by_group(
        gaps,
        tmp_path / "against.png",
        label="gap",
        covariate={"base0": 1.0, "base1": 0.8, "base2": 1.5},
        covariate_label="vanilla drift",
    )

    # the second panel widens the figure at the same height
    small, wide = mpimg.imread(alone), mpimg.imread(path)
    assert wide.shape[0] == small.shape[0] and wide.shape[1] > 1.5 * small.shape[1]
