"""Accuracy matrix and continual-learning metrics (Last, Avg, AF, BWT).

``a[t][i]`` is the accuracy on stage ``i`` after training stage ``t`` (0-based,
``T`` stages); entries with ``i > t`` (stages not yet seen) may be present but are
ignored by every metric. Definitions (DESIGN section 2):

- Last (= AP, average accuracy at the end): mean_i a[T-1][i];
- Avg (average incremental accuracy): mean_t mean_{i<=t} a[t][i];
- AF (average forgetting, Chaudhry et al. 2018, "Riemannian Walk for Incremental
  Learning", ECCV): mean_{i<T-1} max_{t in i..T-2} (a[t][i] - a[T-1][i]); the max
  runs over the rows *before* the last, so AF is negative when every stage ended
  better than it ever was before;
- BWT (backward transfer, Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory"):
  mean_{i<T-1} (a[T-1][i] - a[i][i]).

``SkillAccuracyMatrices`` keeps one such matrix per skill (question type), from
correct / total counts, and turns it into JSON-ready rows and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ContinualMetrics:
    """Summary of an accuracy matrix (see the module docstring)."""

    last: float
    avg: float
    af: float
    bwt: float

    def as_dict(self) -> dict[str, float]:
        """Metrics under the names used in ``metrics.json``."""
        return {"Last": self.last, "Avg": self.avg, "AF": self.af, "BWT": self.bwt}


def _as_square(matrix: Sequence[Sequence[float]], allow_missing: bool) -> np.ndarray:
    acc = np.asarray(matrix, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
        raise ValueError(
            "`accuracy_matrix` must be a non-empty T x T matrix, "
            f"got shape {acc.shape}."
        )
    lower = acc[np.tril_indices(acc.shape[0])]
    if not allow_missing and not np.all(np.isfinite(lower)):
        raise ValueError(
            "`accuracy_matrix` has non-finite entries on or below the diagonal."
        )
    return acc


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def continual_metrics(
    matrix: Sequence[Sequence[float]], allow_missing: bool = False
) -> ContinualMetrics:
    """Compute Last, Avg, AF and BWT of a T x T accuracy matrix.

    Parameters
    ----------
    matrix : Sequence[Sequence[float]]
        ``matrix[t][i]``: accuracy on stage ``i`` after stage ``t`` (0-based).
    allow_missing : bool
        Skip NaN entries on or below the diagonal (e.g. a skill absent from a
        stage) instead of raising: each mean runs over the entries it can use, and
        a metric with none is NaN.

    Returns
    -------
    ContinualMetrics
        Last = mean_i a[T-1][i]; Avg = mean_t mean_{i<=t} a[t][i];
        AF = mean_{i<T-1} max_{t in i..T-2} (a[t][i] - a[T-1][i]) (Chaudhry et al.
        2018; negative when stages improved later); BWT = mean_{i<T-1}
        (a[T-1][i] - a[i][i]). AF and BWT are 0 for T = 1.

    Raises
    ------
    ValueError
        If the matrix is not square, or has non-finite entries where it is read and
        ``allow_missing`` is False.
    """
    acc = _as_square(matrix, allow_missing)
    n = acc.shape[0]
    last_row = acc[n - 1]
    last = _nanmean(last_row.tolist())
    avg = _nanmean([_nanmean(acc[t, : t + 1].tolist()) for t in range(n)])
    if n == 1:
        return ContinualMetrics(last=last, avg=avg, af=0.0, bwt=0.0)
    forgetting, transfer = [], []
    for i in range(n - 1):
        if not math.isfinite(last_row[i]):
            continue
        before = acc[i : n - 1, i]  # rows i..T-2
        before = before[np.isfinite(before)]
        if before.size:
            forgetting.append(float(before.max() - last_row[i]))
        if math.isfinite(acc[i, i]):
            transfer.append(float(last_row[i] - acc[i, i]))
    return ContinualMetrics(
        last=last, avg=avg, af=_nanmean(forgetting), bwt=_nanmean(transfer)
    )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


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


def skill_counts(
    correct: Sequence[bool] | np.ndarray, skills: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """(correct, total) per skill of scored samples.

    Parameters
    ----------
    correct : Sequence[bool] | np.ndarray
        One flag per sample (prediction == answer).
    skills : Sequence[str]
        The skill of each sample.

    Returns
    -------
    dict[str, tuple[int, int]]
        Skill -> (number correct, number scored), in first-seen order.

    Raises
    ------
    ValueError
        If the lengths differ.
    """
    flags = np.asarray(correct, dtype=bool).reshape(-1)
    if flags.size != len(skills):
        raise ValueError(
            f"`correct` has {flags.size} entries but `skills` has {len(skills)}."
        )
    counts: dict[str, tuple[int, int]] = {}
    for flag, skill in zip(flags.tolist(), skills, strict=True):
        hit, total = counts.get(skill, (0, 0))
        counts[skill] = (hit + int(flag), total + 1)
    return counts


class SkillAccuracyMatrices:
    """One T x T accuracy matrix per skill, accumulated from (correct, total) counts.

    Counts add up, so per-client counts of the same (stage t, stage i) entry can be
    added one after the other; an entry a skill never received stays NaN.

    Parameters
    ----------
    num_stages : int
        T.
    """

    def __init__(self, num_stages: int) -> None:
        if num_stages <= 0:
            raise ValueError(f"`num_stages` must be positive, got {num_stages}.")
        self.num_stages = num_stages
        self._counts: dict[str, np.ndarray] = {}  # skill -> (T, T, 2) correct, total

    def add(
        self, stage: int, evaluated: int, counts: Mapping[str, tuple[int, int]]
    ) -> None:
        """Add skill -> (correct, total) counts of ``evaluated`` after ``stage``."""
        for name, value in (("stage", stage), ("evaluated", evaluated)):
            if not 0 <= value < self.num_stages:
                raise IndexError(f"`{name}` {value} outside 0..{self.num_stages - 1}.")
        for skill, (hit, total) in counts.items():
            table = self._counts.setdefault(
                skill, np.zeros((self.num_stages, self.num_stages, 2))
            )
            table[stage, evaluated] += (hit, total)

    @property
    def skills(self) -> list[str]:
        """Skills seen so far, sorted."""
        return sorted(self._counts)

    def counts(self, skill: str, stage: int, evaluated: int) -> tuple[int, int]:
        """(correct, total) of ``skill`` on stage ``evaluated`` after ``stage``."""
        table = self._counts.get(skill)
        if table is None:
            return 0, 0
        hit, total = table[stage, evaluated]
        return int(hit), int(total)

    def matrix(self, skill: str) -> np.ndarray:
        """(T, T) accuracies of ``skill`` (NaN where it was never scored)."""
        table = self._counts[skill]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(table[..., 1] > 0, table[..., 0] / table[..., 1], math.nan)

    def summary(
        self, skill: str, completed_rows: int | None = None
    ) -> ContinualMetrics:
        """NaN-aware continual metrics of ``skill`` (first ``completed_rows`` rows)."""
        done = self.num_stages if completed_rows is None else completed_rows
        if done <= 0:
            raise ValueError(f"`completed_rows` must be positive, got {done}.")
        return continual_metrics(self.matrix(skill)[:done, :done], allow_missing=True)

    def to_json(self, completed_rows: int | None = None) -> dict[str, Any]:
        """JSON-ready ``{skill: {"accuracy_matrix", "counts", "metrics"}}``.

        ``accuracy_matrix`` rows hold ``None`` where not measured; ``counts`` holds
        ``[correct, total]`` pairs (``from_json`` restores from them); ``metrics``
        has Last, Avg, AF and BWT (``None`` when undefined) over the first
        ``completed_rows`` rows (all by default).
        """
        out: dict[str, Any] = {}
        for skill in self.skills:
            acc = self.matrix(skill)
            metrics = self.summary(skill, completed_rows).as_dict()
            out[skill] = {
                "accuracy_matrix": [[_json_float(v) for v in row] for row in acc],
                "counts": self._counts[skill].astype(int).tolist(),
                "metrics": {k: _json_float(v) for k, v in metrics.items()},
            }
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SkillAccuracyMatrices:
        """Rebuild from :meth:`to_json` output."""
        if not data:
            raise ValueError("`data` holds no skill.")
        tables = {k: np.asarray(v["counts"], dtype=np.float64) for k, v in data.items()}
        num_stages = next(iter(tables.values())).shape[0]
        matrices = cls(num_stages)
        matrices._counts = tables
        return matrices
