"""Aggregate the runs of a study and write ``study.json``, ``study.csv``, ``study.md``.

Pure Python/NumPy on the ``metrics.json`` files the runs wrote (no torch, no Flower).
Groups are (stream, method, spectrum strategy); metrics are mean and sample standard
deviation (``ddof=1``) over the seeds of a group; the standard deviation of a group of
one run is NaN (shown as "–").
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fed_asr.paired import PairedComparison, format_comparison, paired_comparison

METRIC_NAMES = ("Last", "Avg", "AF", "BWT")
NO_STRATEGY = "-"  # methods that do not share a spectrum
BASELINE_METHOD = "vanilla"  # FedAvg-LoRA / plain LoRA: every method is paired with it
PAIRED_METRICS = ("AF", "Last")


@dataclass
class CellResult:
    """One finished (or failed) run of the study grid."""

    method: str
    strategy: str
    stream: str
    seed: int
    folder: str
    status: str  # "done", "cached" or "failed"
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def group(self) -> tuple[str, str, str]:
        """(stream, method, strategy)."""
        return (self.stream, self.method, self.strategy)

    def row(self) -> dict[str, Any]:
        """Flat CSV/JSON row of the headline numbers."""
        m = self.metrics
        return {
            "stream": self.stream,
            "method": self.method,
            "strategy": self.strategy,
            "seed": self.seed,
            "status": self.status,
            **{name: m.get(name, math.nan) for name in METRIC_NAMES},
            "bytes_per_round": bytes_per_round(m),
            "bytes_total": total_bytes(m),
            "wall_time_s": m.get("wall_time_s", math.nan),
            "folder": self.folder,
        }


def total_bytes(metrics: Mapping[str, Any]) -> float:
    """All bytes that travelled (down + up, every client), 0 for central runs."""
    return float(sum(metrics.get("communication_bytes", {}).values()))


def bytes_per_round(metrics: Mapping[str, Any]) -> float:
    """Total bytes divided by the number of global rounds (stage-end rounds included
    in the round they follow); NaN for runs without rounds (central engine)."""
    rounds = metrics.get("rounds") or []
    return total_bytes(metrics) / len(rounds) if rounds else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if arr.size == 0:
        return math.nan, math.nan
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return float(arr.mean()), std


def mean_matrix(
    matrices: Sequence[Sequence[Sequence[float | None]]],
) -> list[list[Any]]:
    """Element-wise mean of accuracy matrices (None where no run has a value)."""
    if not matrices:
        return []
    stack = np.array(
        [[[math.nan if v is None else v for v in row] for row in m] for m in matrices],
        dtype=float,
    )  # (R, T, T)
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(stack).sum(axis=0)  # (T, T)
        mean = np.where(
            counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan
        )
    return [[None if math.isnan(v) else float(v) for v in row] for row in mean]


def summarize(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One summary per (stream, method, strategy) group, in first-seen order."""
    groups: dict[tuple[str, str, str], list[CellResult]] = {}
    for cell in cells:
        if cell.status != "failed":
            groups.setdefault(cell.group, []).append(cell)
    out = []
    for (stream, method, strategy), members in groups.items():
        entry: dict[str, Any] = {
            "stream": stream,
            "method": method,
            "strategy": strategy,
            "seeds": sorted(c.seed for c in members),
            "n": len(members),
        }
        for name in METRIC_NAMES:
            mean, std = mean_std([c.metrics.get(name, math.nan) for c in members])
            entry[name] = {"mean": mean, "std": std}
        entry["bytes_per_round"] = mean_std(
            [bytes_per_round(c.metrics) for c in members]
        )[0]
        entry["wall_time_s"] = mean_std(
            [c.metrics.get("wall_time_s", math.nan) for c in members]
        )[0]
        entry["stages"] = members[0].metrics.get("stages", [])
        entry["accuracy_matrix"] = mean_matrix(
            [
                c.metrics["accuracy_matrix"]
                for c in members
                if "accuracy_matrix" in c.metrics
            ]
        )
        out.append(entry)
    return out


def paired_against_baseline(
    cells: Sequence[CellResult], baseline: str = BASELINE_METHOD
) -> list[dict[str, Any]]:
    """Every group against ``baseline`` (same stream) on the seeds both finished.

    One entry per (stream, method, strategy) other than the baseline, with a
    ``fed_asr.paired.PairedComparison`` per metric of ``PAIRED_METRICS`` (``None``
    with fewer than two shared seeds). Streams without the baseline give nothing.
    """
    done = [c for c in cells if c.status != "failed"]
    out = []
    for stream in dict.fromkeys(c.stream for c in done):
        base = [c for c in done if c.stream == stream and c.method == baseline]
        if not base:
            continue
        for group in dict.fromkeys(
            c.group for c in done if c.stream == stream and c.method != baseline
        ):
            members = [c for c in done if c.group == group]
            entry: dict[str, Any] = {
                "stream": stream,
                "method": group[1],
                "strategy": group[2],
                "baseline": baseline,
            }
            for name in PAIRED_METRICS:
                comparison = paired_comparison(
                    {c.seed: c.metrics.get(name) for c in members},
                    {c.seed: c.metrics.get(name) for c in base},
                )
                entry[name] = comparison
            out.append(entry)
    return out


def paired_table(paired: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each method against the baseline, seed by seed."""
    if not paired:
        return ""
    lines = [
        f"### Paired against `{paired[0]['baseline']}` (same seeds)",
        "",
        "Ratio of the means, mean ± std of the per-seed differences, paired t and "
        "its two-sided p, seeds where the method is lower.",
        "",
        "| stream | method | spectrum strategy | " + " | ".join(PAIRED_METRICS) + " |",
        "|---|---|---|" + "---|" * len(PAIRED_METRICS),
    ]
    for entry in paired:
        cells = []
        for name in PAIRED_METRICS:
            c = entry[name]
            cells.append("–" if c is None else format_comparison(c))
        lines.append(
            f"| {entry['stream']} | {entry['method']} | {entry['strategy']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines + [""])


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f} ± –"


def _fmt_bytes(value: float) -> str:
    if math.isnan(value):
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables, one per stream: mean ± std over seeds of every group."""
    lines: list[str] = []
    for stream in dict.fromkeys(s["stream"] for s in summary):
        lines += [
            f"### Stream `{stream}`",
            "",
            "| method | spectrum strategy | seeds | Last ↑ | Avg ↑ | AF ↓ | BWT ↑ "
            "| bytes / round | wall time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in (s for s in summary if s["stream"] == stream):
            cells = [_fmt(s[name]["mean"], s[name]["std"]) for name in METRIC_NAMES]
            wall = s["wall_time_s"]
            lines.append(
                f"| {s['method']} | {s['strategy']} | {s['n']} | "
                + " | ".join(cells)
                + f" | {_fmt_bytes(s['bytes_per_round'])} | "
                + ("–" if math.isnan(wall) else f"{wall:.0f}")
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, PairedComparison):
        return _json_safe(value.as_dict())
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    out: Path,
    cells: Sequence[CellResult],
    header: Mapping[str, Any],
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``study.json``, ``study.csv``, ``study.md`` and the plots into ``out``.

    Parameters
    ----------
    out : Path
        Study folder.
    cells : Sequence[CellResult]
        Every cell of the study (failed ones are listed but not aggregated).
    header : Mapping[str, Any]
        Study settings recorded in ``study.json`` and at the top of ``study.md``
        (``command``, ``engine``, ``overrides``).
    plots : bool
        Also draw ``af_bars.png`` and ``accuracy_matrices_<stream>.png``.

    Returns
    -------
    dict[str, Path]
        Name -> written file.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(cells)
    paired = paired_against_baseline(cells)
    rows = [c.row() for c in cells]
    paths = {
        "json": out / "study.json",
        "csv": out / "study.csv",
        "md": out / "study.md",
    }
    document = {**header, "groups": summary, "paired": paired, "cells": rows}
    paths["json"].write_text(json.dumps(_json_safe(document), indent=2))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(rows[0]) if rows else ["method"]
        )
        writer.writeheader()
        writer.writerows(rows)
    failed = [c for c in cells if c.status == "failed"]
    text = [
        "# Study results",
        "",
        f"Command: `{header.get('command', '')}`",
        "",
        f"Engine `{header.get('engine', '')}`; common overrides: "
        f"`{' '.join(header.get('overrides', [])) or '(none)'}`.",
        "Mean ± sample std over seeds; AF lower is better; bytes / round = all "
        "traffic (down + up, every client) per global round.",
        "",
        markdown_table(summary),
        paired_table(paired),
    ]
    if failed:
        text += ["Failed cells:", ""] + [
            f"- {c.method}/{c.strategy}/{c.stream}/s{c.seed}: see {c.folder}"
            for c in failed
        ]
    paths["md"].write_text("\n".join(text) + "\n")
    if plots and summary:
        paths["af"] = plot_af_bars(summary, out / "af_bars.png")
        for stream in dict.fromkeys(s["stream"] for s in summary):
            group = [s for s in summary if s["stream"] == stream]
            paths[f"matrices_{stream}"] = plot_matrices(
                group, out / f"accuracy_matrices_{stream}.png", title=f"stream {stream}"
            )
    return paths


def _label(entry: Mapping[str, Any]) -> str:
    strategy = entry["strategy"]
    return (
        entry["method"] if strategy == NO_STRATEGY else f"{entry['method']}/{strategy}"
    )


def plot_af_bars(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Bars of AF (mean ± std over seeds) per method/strategy, one panel per stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(s["stream"] for s in summary))
    width = max(
        4.0, 0.6 * max(sum(s["stream"] == st for s in summary) for st in streams)
    )
    fig, axes = plt.subplots(
        1, len(streams), figsize=(width * len(streams), 4), squeeze=False
    )
    for ax, stream in zip(axes[0], streams, strict=True):
        group = [s for s in summary if s["stream"] == stream]
        means = [s["AF"]["mean"] for s in group]
        stds = [0.0 if math.isnan(s["AF"]["std"]) else s["AF"]["std"] for s in group]
        ax.bar(
            range(len(group)), means, yerr=stds, capsize=3, color="tab:red", alpha=0.8
        )
        ax.set_xticks(
            range(len(group)), [_label(s) for s in group], rotation=40, ha="right"
        )
        ax.set_ylabel("average forgetting (AF, lower is better)")
        ax.set_title(f"stream {stream}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrices(
    summary: Sequence[Mapping[str, Any]], path: Path, title: str = ""
) -> Path:
    """Mean accuracy matrices of the groups side by side (row: after stage t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n + 0.5, 3.3), squeeze=False)
    for ax, entry in zip(axes[0], summary, strict=True):
        matrix = [
            [math.nan if v is None else v for v in row]
            for row in entry["accuracy_matrix"]
        ]
        stages = entry.get("stages") or [str(i) for i in range(len(matrix))]
        ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        for t, row in enumerate(matrix):
            for i, value in enumerate(row):
                if not math.isnan(value):
                    colour = "black" if value > 0.6 else "white"
                    ax.text(
                        i,
                        t,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        color=colour,
                        fontsize=8,
                    )
        ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages], fontsize=8)
        ax.set_title(f"{_label(entry)} (n={entry['n']})", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
