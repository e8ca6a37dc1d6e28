"""Figures people look at: accuracy matrices, forgetting and drift curves, per-seed
comparisons, per-group gaps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float | None]],
    stage_names: Sequence[str],
    path: str | Path,
    title: str = "Accuracy matrix",
) -> Path:
    """Save a heatmap of ``matrix[t][i]`` (row: after stage t, column: stage i)."""
    n = len(stage_names)
    values = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), stage_names, rotation=30, ha="right")
    ax.set_yticks(range(n), [f"after {s}" for s in stage_names])
    ax.set_xlabel("evaluated stage")
    ax.set_ylabel("training stage")
    for t in range(n):
        for i in range(n):
            if not math.isnan(values[t][i]):
                colour = "black" if values[t][i] > 0.6 else "white"
                ax.text(
                    i, t, f"{values[t][i]:.2f}", ha="center", va="center", color=colour
                )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_forgetting_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    xlabel: str = "round",
    stage_boundaries: Sequence[float] = (),
    title: str = "Accuracy of each stage over training",
) -> Path:
    """Save accuracy-over-time lines, one per stage.

    ``curves[name] = [(x, acc), ...]``.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    for x in stage_boundaries:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(title="stage")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_drift_curves(
    rows: Sequence[Mapping[str, object]],
    stage_names: Sequence[str],
    path: str | Path,
    title: str = "Old-stage spectral drift, map shift and grounding",
) -> Path:
    """Drift (mean d2/D), map shift and grounding share of each stage over stages.

    ``rows`` are ``fed_asr.evaluation.DriftMonitor.rows``; the point at the stage's
    own end is its in-distribution floor (dotted line; 0 for the map shift, whose
    reference is that stage's maps). Rows without a value (an older run, no regions)
    leave their panel's point out.
    """
    panels = (
        ("drift_mean", "d2 / D to the stage's own prototypes"),
        ("map_shift", "KL(maps at stage end || now), nats"),
        ("grounding_share", "attention share on the queried object"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for i, name in enumerate(stage_names):
        own = [r for r in rows if r["stage"] == i]
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(r["after_stage"] + 1, r.get(key)) for r in own]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            line = ax.plot(xs, ys, marker="o", label=name)[0]
            if key == "drift_mean":
                ax.axhline(ys[0], color=line.get_color(), linestyle=":", linewidth=1)
    objects = [r["object_share"] for r in rows if r.get("object_share") is not None]
    if objects:
        axes[-1].axhline(
            sum(objects) / len(objects), color="grey", linestyle="--", linewidth=1
        )
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.set_xlabel("after training stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="stage")
        else:  # e.g. grounding on a stream without object boxes
            ax.text(
                0.5,
                0.5,
                "not measured on this run",
                ha="center",
                transform=ax.transAxes,
                color="grey",
            )
    fig.suptitle(title)
    return _save(fig, path)


def plot_paired_seeds(
    pairs: Mapping[str, Mapping[int, tuple[float, float]]],
    path: str | Path,
    baseline: str,
    metric: str = "AF",
    target_ratio: float | None = 0.5,
) -> Path:
    """Per-seed scatter of each method against ``baseline``: one panel per method.

    ``pairs[method][seed] = (baseline value, method value)``. Points under the
    diagonal are seeds where the method is lower; the dashed line (``target_ratio``)
    marks a target stated as a fraction of the baseline, e.g. "AF <= 0.5x".
    """
    names = list(pairs)
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(3.3 * max(len(names), 1), 3.4), squeeze=False
    )
    values = [v for p in pairs.values() for pair in p.values() for v in pair]
    top = max(values, default=1.0) * 1.1 or 1.0
    for ax, name in zip(axes[0], names, strict=False):
        seeds = sorted(pairs[name])
        xs = [pairs[name][s][0] for s in seeds]
        ys = [pairs[name][s][1] for s in seeds]
        ax.plot([0, top], [0, top], color="grey", linewidth=1)
        if target_ratio is not None:
            ax.plot([0, top], [0, target_ratio * top], color="grey", linestyle="--")
        ax.scatter(xs, ys, zorder=3)
        for s, x, y in zip(seeds, xs, ys, strict=True):
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(3, 3))
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel(f"{baseline} {metric}")
        ax.set_ylabel(f"{name} {metric}")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    target = f" (dashed: {target_ratio}x)" if target_ratio is not None else ""
    fig.suptitle(f"{metric} per seed against {baseline}{target}")
    return _save(fig, path)


def plot_gaps_by_group(
    gaps: Mapping[str, Sequence[float]],
    path: str | Path,
    label: str,
    covariate: Mapping[str, float] | None = None,
    covariate_label: str = "covariate",
) -> Path:
    """One column per group (e.g. a base model): its paired gaps as dots, their mean
    as a bar, and the zero line; a group under zero is one where the variant is lower.

    ``gaps[group]`` are the per-seed differences (variant - baseline) of that group;
    ``label`` names the difference on the y axis, e.g. "asr - vanilla AF (type)".
    With ``covariate`` (a value per group), a second panel puts each group's mean gap
    against it, to show whether the gap follows it.
    """
    names = list(gaps)
    means = {
        name: sum(map(float, gaps[name])) / len(gaps[name])
        for name in names
        if gaps[name]
    }
    panels = 1 if covariate is None else 2
    width = 1.0 * max(len(names), 2) + 2.0
    fig, axes = plt.subplots(
        1, panels, figsize=(width + 3.6 * (panels - 1), 3.4), squeeze=False
    )
    ax = axes[0][0]
    ax.axhline(0.0, color="grey", linewidth=1)
    for x, name in enumerate(names):
        values = [float(v) for v in gaps[name]]
        ax.scatter([x] * len(values), values, color="tab:blue", alpha=0.6, zorder=3)
        if name in means:
            ax.plot(
                [x - 0.3, x + 0.3], [means[name]] * 2, color="tab:red", linewidth=2.5
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_title("per seed (dots) and mean (bar) in each group", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if covariate is not None:
        ax = axes[0][1]
        shown = [name for name in names if name in means and name in covariate]
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.scatter([covariate[n] for n in shown], [means[n] for n in shown], zorder=3)
        for name in shown:
            ax.annotate(
                name,
                (covariate[name], means[name]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=8,
            )
        ax.set_xlabel(covariate_label)
        ax.set_ylabel(f"mean {label}")
        ax.set_title("mean gap against the covariate", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    """Lay out ``fig``, save it to ``path`` at 110 dpi, close it and return the path."""
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
