"""Accuracy matrix and continual-learning metrics (Last, Avg, AF, BWT).

``a[t][i]`` is the accuracy on stage ``i`` after training stage ``t``; entries with
``i > t`` (stages not yet seen) may be present but are ignored by every metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContinualMetrics:
    """Summary of an accuracy matrix (DESIGN section 2)."""

    last: float
    avg: float
    af: float
    bwt: float

    def as_dict(self) -> dict[str, float]:
        """Metrics under the names used in ``metrics.json``."""
        return {"Last": self.last, "Avg": self.avg, "AF": self.af, "BWT": self.bwt}


def _as_square(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    acc = np.asarray(matrix, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
        raise ValueError(
            "`accuracy_matrix` must be a non-empty T x T matrix, "
            f"got shape {acc.shape}."
        )
    lower = np.tril(acc)
    if not np.all(np.isfinite(lower)):
        raise ValueError(
            "`accuracy_matrix` has non-finite entries on or below the diagonal."
        )
    return acc


def continual_metrics(matrix: Sequence[Sequence[float]]) -> ContinualMetrics:
    """Compute Last, Avg, AF and BWT of a T x T accuracy matrix.

    Parameters
    ----------
    matrix : Sequence[Sequence[float]]
        ``matrix[t][i]``: accuracy on stage ``i`` after stage ``t``.

    Returns
    -------
    ContinualMetrics
        Last = mean_i a[T][i]; Avg = mean_t mean_{i<=t} a[t][i];
        AF = mean_{i<T} (max_{t>=i} a[t][i] - a[T][i]);
        BWT = mean_{i<T} (a[T][i] - a[i][i]). AF and BWT are 0 for T = 1.

    Raises
    ------
    ValueError
        If the matrix is not square or has non-finite entries where it is read.
    """
    acc = _as_square(matrix)
    n = acc.shape[0]
    last_row = acc[n - 1]
    last = float(last_row.mean())
    avg = float(np.mean([acc[t, : t + 1].mean() for t in range(n)]))
    if n == 1:
        return ContinualMetrics(last=last, avg=avg, af=0.0, bwt=0.0)
    af = float(np.mean([acc[i:, i].max() - last_row[i] for i in range(n - 1)]))
    bwt = float(np.mean([last_row[i] - acc[i, i] for i in range(n - 1)]))
    return ContinualMetrics(last=last, avg=avg, af=af, bwt=bwt)


class AccuracyMatrix:
    """A growing T x T accuracy matrix filled one row (training stage) at a time."""

    def __init__(self, num_stages: int) -> None:
        if num_stages <= 0:
            raise ValueError(f"`num_stages` must be positive, got {num_stages}.")
        self.values = np.full((num_stages, num_stages), math.nan)

    def set_row(self, stage: int, accuracies: Sequence[float]) -> None:
        """Record accuracies on stages ``0..len(accuracies)-1`` after ``stage``."""
        if not 0 <= stage < self.values.shape[0]:
            raise IndexError(f"`stage` {stage} outside 0..{self.values.shape[0] - 1}.")
        self.values[stage, : len(accuracies)] = accuracies

    @property
    def completed_rows(self) -> int:
        """Number of leading rows whose diagonal entry is filled."""
        return int(
            sum(1 for t in range(len(self.values)) if np.isfinite(self.values[t, t]))
        )

    def to_list(self) -> list[list[float | None]]:
        """JSON-friendly rows (``None`` where not measured)."""
        return [
            [None if math.isnan(v) else float(v) for v in row] for row in self.values
        ]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> AccuracyMatrix:
        """Rebuild from :meth:`to_list` output."""
        matrix = cls(len(rows))
        for t, row in enumerate(rows):
            matrix.values[t] = [math.nan if v is None else float(v) for v in row]
        return matrix

    def summary(self) -> ContinualMetrics:
        """Continual metrics over the completed rows."""
        done = self.completed_rows
        if done == 0:
            raise ValueError("No stage has been evaluated yet.")
        return continual_metrics(self.values[:done, :done])
