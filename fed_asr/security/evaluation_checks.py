"""Checks on evaluation replies and on the accuracies they report (pure functions).

An evaluation reply carries counts: ``total-<stage>[-<skill>]`` and
``correct-[<protocol>-]<stage>[-<skill>]``. :func:`check_evaluation_counts` refuses
counts no honest client can report; :func:`accuracy_outliers` flags clients whose
accuracy is far from the other clients', which a lie within the bounds still shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fed_asr.protocol import (
    CORRECT_PREFIX,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    TOTAL_PREFIX,
)
from fed_asr.security.validation import ValidationResult

_OK = ValidationResult(True)
_MIN_SCALE = 0.1  # accuracy points: honest non-IID spread (accuracy_outliers)
_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its std
CountKey = tuple[str, int, str | None]  # (``total`` or a protocol, stage, skill)


def _fail(reason: str) -> ValidationResult:
    return ValidationResult(False, reason)


def _count_value(key: str, value: object) -> int | ValidationResult:
    """``value`` as a non-negative integer, or the failure naming ``key``."""
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not is_number:
        return _fail(f"Metric `{key}` = {value!r} is not a number.")
    as_float = float(value)  # type: ignore[arg-type]
    if not math.isfinite(as_float) or as_float != int(as_float) or as_float < 0:
        return _fail(f"Metric `{key}` = {value!r} is not a non-negative integer.")
    return int(as_float)


def parse_count_key(
    key: str, protocols: Collection[str], skills: Collection[str]
) -> CountKey | None:
    """``(kind, stage, skill)`` of a count key (inverse of ``protocol.correct_key``).

    ``kind`` is ``total`` or the protocol; None for a key that is no count of a
    known protocol and skill.
    """
    if key.startswith(TOTAL_PREFIX):
        stage, _, skill = key[len(TOTAL_PREFIX) :].partition("-")
        kind = "total"
    elif key.startswith(CORRECT_PREFIX):
        rest = key[len(CORRECT_PREFIX) :]
        if rest.isdigit():
            return "all", int(rest), None
        kind = next((p for p in protocols if rest.startswith(f"{p}-")), "")
        if not kind:
            return None
        stage, _, skill = rest[len(kind) + 1 :].partition("-")
        if kind == "all" and not skill:  # that count is `correct-<stage>`
            return None
    else:
        return None
    if not stage.isdigit() or (skill and skill not in skills):
        return None
    return kind, int(stage), skill or None


def _parse_counts(
    metrics: Mapping[str, object],
    num_seen_stages: int,
    skills: Collection[str],
    protocols: Collection[str],
) -> dict[CountKey, int] | ValidationResult:
    counts: dict[CountKey, int] = {}
    for key in sorted(metrics):
        value = _count_value(key, metrics[key])
        if isinstance(value, ValidationResult):
            return value
        if key in (PARTITION_ID_KEY, NUM_EXAMPLES_KEY):
            continue
        parsed = parse_count_key(key, protocols, skills)
        if parsed is None:
            return _fail(
                f"Metric `{key}` is not a count of a known stage, protocol and skill "
                f"(skills {sorted(skills)}, protocols {sorted(protocols)})."
            )
        if parsed[1] >= num_seen_stages:
            return _fail(
                f"Metric `{key}` counts stage {parsed[1]}, but only "
                f"{num_seen_stages} stages were evaluated."
            )
        counts[parsed] = value
    return counts


def check_evaluation_counts(
    metrics: Mapping[str, object],
    num_seen_stages: int,
    skills: Collection[str],
    protocols: Collection[str],
    max_total: Callable[[int], int | None],
) -> ValidationResult:
    """An evaluation reply's counts are ones an honest client can report.

    Every key is ``partition-id``, ``num-examples`` or a count of a seen stage of a
    known protocol and skill; every value is a non-negative integer; a correct count
    is at most its total; a stage's total is at most ``max_total(stage)`` (the
    client's test split when the server knows it) and at least the sum of its
    per-skill totals.

    Parameters
    ----------
    metrics : Mapping[str, object]
        The reply's metrics.
    num_seen_stages : int
        Stages the evaluation covered (``num-seen-stages``).
    skills, protocols : Collection[str]
        Known skill names and evaluation protocols (``all``, ``type``).
    max_total : Callable[[int], int | None]
        Largest total of a stage; None for no bound.
    """
    counts = _parse_counts(metrics, num_seen_stages, skills, protocols)
    if isinstance(counts, ValidationResult):
        return counts
    for (kind, stage, skill), value in counts.items():
        if kind == "total":
            continue
        total = counts.get(("total", stage, skill), 0)
        if value > total:
            of_skill = f", skill {skill!r}" if skill else ""
            return _fail(
                f"Evaluation of stage {stage}{of_skill}: `{kind}` correct = {value} "
                f"exceeds its total {total}."
            )
    for stage in range(num_seen_stages):
        total = counts.get(("total", stage, None), 0)
        cap = max_total(stage)
        if cap is not None and total > cap:
            return _fail(
                f"Evaluation total of stage {stage} = {total} exceeds the client's "
                f"test split ({cap})."
            )
        per_skill = sum(
            v for (k, t, s), v in counts.items() if k == "total" and t == stage and s
        )
        if per_skill > total:
            return _fail(
                f"Evaluation of stage {stage}: per-skill totals sum to {per_skill}, "
                f"more than the stage total {total}."
            )
    return _OK


@dataclass(frozen=True)
class AccuracyOutlier:
    """One client's accuracy on one stage, far from the other clients'."""

    client: str
    stage: int
    accuracy: float
    median_others: float
    z: float


def accuracy_outliers(
    results: Mapping[str, Mapping[int, tuple[int, int]]], z_max: float
) -> list[AccuracyOutlier]:
    """Clients whose accuracy on a stage is more than ``z_max`` robust z from the rest.

    For client i with ``correct / total = a_i`` on a stage, the others' median m and
    median absolute deviation give ``z = (a_i - m) / s`` with
    ``s = max(1.4826 MAD, sqrt(p (1 - p) / total_i), 0.1)``, p = m clipped to
    [0.05, 0.95]: the binomial term keeps a client with few test samples (or a round
    where the others agree exactly) from being flagged by chance alone, and the
    0.1 floor keeps honest non-IID clients (Dirichlet 0.5 partitions differ by up to
    ~0.35 in accuracy on the same stage; measured z up to 7 without it) unflagged:
    with the default ``z_max = 4`` a client is flagged only beyond 0.4 of the
    median. With two clients each is compared with the other, so both may be
    flagged: which one lies cannot be told from two.

    Parameters
    ----------
    results : Mapping[str, Mapping[int, tuple[int, int]]]
        Client -> stage -> (correct, total).
    z_max : float
        Flag threshold on ``|z|``.

    Returns
    -------
    list[AccuracyOutlier]
        In client, then stage order.
    """
    if not z_max > 0:
        raise ValueError(f"`security.eval_outlier_z` must be positive, got {z_max}.")
    flagged = []
    for client in sorted(results):
        for stage, (correct, total) in sorted(results[client].items()):
            others = [
                c / n
                for other, rows in results.items()
                if other != client
                for s, (c, n) in rows.items()
                if s == stage and n > 0
            ]
            if total <= 0 or not others:
                continue
            accuracy = correct / total
            median = float(np.median(others))
            mad = float(np.median(np.abs(np.asarray(others) - median)))
            p = min(max(median, 0.05), 0.95)
            scale = max(_MAD_TO_STD * mad, math.sqrt(p * (1 - p) / total), _MIN_SCALE)
            z = (accuracy - median) / scale
            if abs(z) > z_max:
                flagged.append(AccuracyOutlier(client, stage, accuracy, median, z))
    return flagged
