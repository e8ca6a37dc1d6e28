"""Validation of client replies before aggregation (pure functions).

Each check returns a :class:`ValidationResult`; the server logs ``reason`` and skips
the reply, as Flower strategies do. ``validate_reply`` runs them all, stopping at the
first failure. Spectrum checks apply to statistics sent in the clear; with secure
aggregation the server sees only the sum, and with client-side DP noise the exact
consistency checks do not hold (use ``check_moments=False``). The bounds a descriptor
puts on the statistics are in ``fed_asr.security.stat_bounds``; evaluation counts are
checked in ``fed_asr.security.evaluation_checks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fed_asr.config import SecurityConfig
from fed_asr.protocol import NUM_EXAMPLES_KEY
from fed_asr.spectrum_schema import STATS_FIELDS


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of a check: ``ok`` and, if not, a human-readable ``reason``."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        """Truthiness is ``ok``."""
        return self.ok


_OK = ValidationResult(True)


def _fail(reason: str) -> ValidationResult:
    return ValidationResult(False, reason)


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and dtype (NumPy name, e.g. ``"float32"``) of one array."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds a reply must respect.

    Parameters
    ----------
    max_num_examples : int
        Largest accepted ``num-examples``.
    max_update_norm : float | None
        Largest accepted ``||new - global||_2`` over all arrays; ``None`` disables it.
    """

    max_num_examples: int
    max_update_norm: float | None = None

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> ReplyLimits:
        """Limits from ``security.max_num_examples`` and ``max_update_norm``."""
        return cls(cfg.max_num_examples, cfg.max_update_norm)


def spec_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Return the spec that ``arrays`` (e.g. the global adapter) satisfy."""
    return {
        name: ArraySpec(tuple(np.shape(a)), np.asarray(a).dtype.name)
        for name, a in arrays.items()
    }


def _first_nonfinite(name: str, array: np.ndarray) -> ValidationResult:
    if not np.issubdtype(array.dtype, np.inexact):
        return _OK
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        return _fail(
            f"Array `{name}` holds a non-finite value {array[index]} at {index}."
        )
    return _OK


def check_arrays(
    arrays: Mapping[str, np.ndarray], spec: Mapping[str, ArraySpec]
) -> ValidationResult:
    """Names, shapes and dtypes match ``spec``, and every value is finite."""
    missing = sorted(set(spec) - set(arrays))
    if missing:
        return _fail(f"Reply lacks expected arrays {missing}.")
    unknown = sorted(set(arrays) - set(spec))
    if unknown:
        return _fail(f"Reply has unexpected arrays {unknown}.")
    for name in sorted(spec):
        array, expected = np.asarray(arrays[name]), spec[name]
        if array.shape != tuple(expected.shape):
            return _fail(
                f"Array `{name}` has shape {array.shape}, expected {expected.shape}."
            )
        if array.dtype.name != expected.dtype:
            return _fail(
                f"Array `{name}` has dtype {array.dtype.name}, "
                f"expected {expected.dtype}."
            )
        result = _first_nonfinite(name, array)
        if not result:
            return result
    return _OK


def check_num_examples(
    metrics: Mapping[str, object], max_num_examples: int, key: str = NUM_EXAMPLES_KEY
) -> ValidationResult:
    """``metrics[key]`` is a positive integer at most ``max_num_examples``."""
    if key not in metrics:
        return _fail(f"Metrics lack `{key}`.")
    value = metrics[key]
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not is_number:
        return _fail(f"Metric `{key}` = {value!r} is not a number.")
    as_float = float(value)  # type: ignore[arg-type]
    if not math.isfinite(as_float) or as_float != int(as_float):
        return _fail(f"Metric `{key}` = {value!r} is not an integer.")
    if as_float <= 0:
        return _fail(f"Metric `{key}` = {value!r} must be positive.")
    if as_float > max_num_examples:
        return _fail(
            f"Metric `{key}` = {value!r} exceeds the maximum {max_num_examples}."
        )
    for name, metric in metrics.items():
        if isinstance(metric, float) and not math.isfinite(metric):
            return _fail(f"Metric `{name}` = {metric!r} is not finite.")
    return _OK


def update_norm(
    arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]
) -> float:
    """``sqrt(sum_k ||arrays[k] - global_arrays[k]||^2)`` in float64."""
    total = 0.0
    for name, value in arrays.items():
        diff = np.asarray(value, np.float64) - np.asarray(
            global_arrays[name], np.float64
        )
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def check_update_norm(
    arrays: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    max_norm: float,
) -> ValidationResult:
    """Check that ``||arrays - global_arrays||_2 <= max_norm``."""
    missing = sorted(set(arrays) - set(global_arrays))
    if missing:
        return _fail(f"Global arrays lack {missing}; cannot bound the update norm.")
    norm = update_norm(arrays, global_arrays)
    if not norm <= max_norm:
        return _fail(
            f"Update norm ||new - global|| = {norm:.6g} exceeds {max_norm:.6g}."
        )
    return _OK


def check_spectrum_stats(
    stats: Mapping[str, np.ndarray],
    num_examples: int,
    integer_counts: bool = True,
    check_moments: bool = True,
    rtol: float = 1e-6,
) -> ValidationResult:
    """Per-skill statistics are well formed and consistent with ``num_examples``.

    Parameters
    ----------
    stats : Mapping[str, np.ndarray]
        ``count (S,)``, ``sum (S, D)``, ``sumsq (S, D)``, ``angular_sum (S, M)``.
    num_examples : int
        The reply's ``num-examples``; no skill can count more samples.
    integer_counts : bool
        Counts must be integer-valued (membership by threshold, no DP noise).
    check_moments : bool
        Also check ``sumsq >= 0``, ``angular_sum >= 0``, ``count * sumsq >= sum^2``,
        ``sum_m angular_sum <= count`` and zero statistics for skills of count 0.
    rtol : float
        Relative tolerance of the moment checks.
    """
    names = set(stats)
    if names != set(STATS_FIELDS):
        return _fail(
            f"Spectrum stats have arrays {sorted(names)}, expected "
            f"{sorted(STATS_FIELDS)}."
        )
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
    for name, symbols in STATS_FIELDS.items():
        ndim = len(symbols)
        if arrays[name].ndim != ndim:
            return _fail(
                f"Stats `{name}` has shape {arrays[name].shape}; need {ndim}-D."
            )
        result = _first_nonfinite(name, arrays[name])
        if not result:
            return result
    count, total, sumsq, angular = (arrays[k] for k in STATS_FIELDS)
    n_skills = count.shape[0]
    if total.shape != sumsq.shape or total.shape[0] != n_skills:
        return _fail(
            f"Stats shapes disagree: count {count.shape}, sum {total.shape}, "
            f"sumsq {sumsq.shape}."
        )
    if angular.shape[0] != n_skills:
        return _fail(
            f"Stats `angular_sum` has shape {angular.shape}; need {n_skills} rows."
        )
    for s in range(n_skills):
        c = count[s]
        if c < 0:
            return _fail(f"Stats `count`[{s}] = {c} is negative.")
        if integer_counts and c != round(c):
            return _fail(f"Stats `count`[{s}] = {c} is not an integer.")
        if c > num_examples:
            return _fail(
                f"Stats `count`[{s}] = {c} exceeds "
                f"`{NUM_EXAMPLES_KEY}` = {num_examples}."
            )
    if not check_moments:
        return _OK
    for name, array in (("sumsq", sumsq), ("angular_sum", angular)):
        bad = np.argwhere(array < 0)
        if bad.size:
            s, j = (int(i) for i in bad[0])
            return _fail(f"Stats `{name}`[{s}, {j}] = {array[s, j]} is negative.")
    lhs = count[:, None] * sumsq  # (S, D)
    rhs = total**2
    bad = np.argwhere(lhs < rhs - rtol * np.maximum(np.abs(rhs), 1.0))
    if bad.size:
        s, j = (int(i) for i in bad[0])
        return _fail(
            f"Stats of skill {s}, feature {j} are impossible: count * sumsq = "
            f"{lhs[s, j]:.6g} < sum^2 = {rhs[s, j]:.6g}."
        )
    mass = angular.sum(axis=1)  # (S,)
    bad_rows = np.flatnonzero(mass > count * (1 + rtol) + rtol)
    if bad_rows.size:
        s = int(bad_rows[0])
        return _fail(
            f"Stats `angular_sum`[{s}] sums to {mass[s]:.6g}, more than `count`[{s}] "
            f"= {count[s]}; angular distributions sum to at most 1."
        )
    return _OK


def validate_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    spec: Mapping[str, ArraySpec],
    limits: ReplyLimits,
    global_arrays: Mapping[str, np.ndarray] | None = None,
    stats: Mapping[str, np.ndarray] | None = None,
    integer_counts: bool = True,
    check_moments: bool = True,
) -> ValidationResult:
    """Run every applicable check on one reply; the first failure is returned.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The reply's arrays (e.g. the LoRA adapter).
    metrics : Mapping[str, object]
        The reply's metrics, with ``num-examples``.
    spec : Mapping[str, ArraySpec]
        Expected arrays (see :func:`spec_from_arrays`).
    limits : ReplyLimits
        Bounds on ``num-examples`` and the update norm.
    global_arrays : Mapping[str, np.ndarray] | None
        The global arrays sent this round; needed for the update-norm check.
    stats : Mapping[str, np.ndarray] | None
        Spectrum statistics sent in the clear, if any.
    integer_counts, check_moments : bool
        Passed to :func:`check_spectrum_stats`.
    """
    result = check_arrays(arrays, spec)
    if result:
        result = check_num_examples(metrics, limits.max_num_examples)
    if result and limits.max_update_norm is not None and global_arrays is not None:
        result = check_update_norm(arrays, global_arrays, limits.max_update_norm)
    if result and stats is not None:
        num_examples = int(metrics[NUM_EXAMPLES_KEY])  # type: ignore[call-overload]
        result = check_spectrum_stats(
            stats, num_examples, integer_counts, check_moments
        )
    return result


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(arrays: Mapping[str, np.ndarray]) -> ValidationResult:
    """Every value is finite and survives a cast to float32 (no overflow to inf)."""
    for name in sorted(arrays):
        array = np.asarray(arrays[name], dtype=np.float64)
        result = _first_nonfinite(name, array)
        if not result:
            return result
        bad = np.argwhere(np.abs(array) > _FLOAT32_MAX)
        if bad.size:
            index = tuple(int(i) for i in bad[0])
            return _fail(
                f"Array `{name}` holds {array[index]:.6g} at {index}, beyond float32's "
                f"range (+-{_FLOAT32_MAX:.4g}): the cast would make it infinite."
            )
    return _OK
