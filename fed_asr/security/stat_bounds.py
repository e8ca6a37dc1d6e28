"""What spectrum statistics an honest client can produce, and the check against it.

The spectral descriptor is bounded by construction (``fed_asr.spectral``), so the
additive statistics of ``n`` samples are bounded by ``n`` times the descriptor's
range. A reply outside these bounds cannot come from the configured descriptor and is
refused before it is merged, so no single client can push a prototype (and the
spectrum checkpointed with it) to an arbitrary value. With differential privacy the
bounds widen by a high-probability bound on the calibrated noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fed_asr.config import PrivacyConfig
from fed_asr.security.dp import calibrate_stats_noise
from fed_asr.security.validation import ValidationResult
from fed_asr.spectral import features_per_head

_OK = ValidationResult(True)
# float32 descriptors summed in float64: relative slack per sample, plus an absolute one
_RTOL = 1e-4
_ATOL = 1e-6


def _fail(reason: str) -> ValidationResult:
    return ValidationResult(False, reason)


@dataclass(frozen=True)
class DescriptorBounds:
    """Range of every descriptor entry one honest sample can have.

    Attributes
    ----------
    low, high : np.ndarray
        (D,) smallest and largest value of each descriptor entry.
    n_angular : int
        M, the number of angular bins; each bin of the mean angular distribution is
        in [0, 1] and a row sums to at most 1.
    """

    low: np.ndarray
    high: np.ndarray
    n_angular: int

    @property
    def dim(self) -> int:
        """Descriptor size D."""
        return int(self.low.size)

    @property
    def square_high(self) -> np.ndarray:
        """(D,) largest square of each entry, ``max(low^2, high^2)``."""
        return np.maximum(self.low**2, self.high**2)


def descriptor_bounds(
    n_radial: int,
    n_angular: int,
    dp_clip: float | None = None,
    *,
    features: str = "spectrum",
    layer_heads: int | None = None,
) -> DescriptorBounds:
    """Range of each entry of the spectral descriptor ``describe`` returns.

    Per layer-head the features are (``fed_asr.spectral.layer_head_features``):

    - radial distribution (K): a power spectrum normalised to sum 1, binned: [0, 1];
    - angular distribution (M): the same, binned by angle: [0, 1];
    - anisotropy (M): ``angular / mean(angular)``, the mean being 1/M (or the
      clamp eps when the map is empty): [0, M];
    - rho* (peak radius, divided by the grid's largest radius): [0, 1];
    - theta* (peak angle, ``atan2``): [-pi, pi];
    - peak power (a share of the normalised spectrum): [0, 1].

    The descriptor is the mean of these over the layer-heads (same ranges) followed
    by their population variance, which for values in [a, b] is at most
    ``(b - a)^2 / 4`` (Popoviciu's inequality): 1/4, 1/4, M^2/4, 1/4, pi^2, 1/4.
    Both conventions (``paper``, ``ours``) stay within these ranges.

    ``features="coherence"`` (``fed_asr.coherence``): K band coherences per layer-head,
    each a correlation in [-1, 1] (variance over heads at most 1). With
    ``layer_heads`` = J (``regularizer.heads=each``) the descriptor is every
    layer-head's features in turn, each in its range, instead of mean and variance.

    With DP (``dp_clip``), ``clip_descriptors`` scales each descriptor to L2 norm at
    most C, so every entry also lies in [-C, C]; scaling towards 0 keeps it in its
    range since every range holds 0.

    Parameters
    ----------
    n_radial, n_angular : int
        K radial and M angular bins.
    dp_clip : float | None
        L2 bound C of a clipped descriptor (``privacy.dp_clip`` when DP is on).
    features : str
        ``"spectrum"`` or ``"coherence"`` (``regularizer.features``).
    layer_heads : int | None
        J for per-head descriptors; None: mean and variance over heads.

    Returns
    -------
    DescriptorBounds
        ``low``/``high`` of shape (D,), D = 2 (K + 2M + 3) for the pooled spectrum.

    Raises
    ------
    ValueError
        If a bin count or ``dp_clip`` is not positive.
    """
    if n_radial < 1 or n_angular < 1:
        raise ValueError(
            f"`n_radial` and `n_angular` must be positive, got {n_radial}, {n_angular}."
        )
    k, m = n_radial, n_angular
    if features == "coherence":
        low, high = np.full(k, -1.0), np.full(k, 1.0)  # (F,)
    else:
        low = np.array([0.0] * (k + 2 * m) + [0.0, -math.pi, 0.0])  # (F,)
        high = np.array([1.0] * (k + m) + [float(m)] * m + [1.0, math.pi, 1.0])
        assert low.size == features_per_head(k, m)
    if layer_heads is not None:
        if layer_heads < 1:
            raise ValueError(f"`layer_heads` must be positive, got {layer_heads}.")
        low, high = np.tile(low, layer_heads), np.tile(high, layer_heads)  # (D,)
    else:
        variance_high = (high - low) ** 2 / 4  # (F,)
        low = np.concatenate([low, np.zeros_like(low)])  # (D,)
        high = np.concatenate([high, variance_high])  # (D,)
    if dp_clip is not None:
        if not dp_clip > 0:
            raise ValueError(f"`dp_clip` must be positive, got {dp_clip}.")
        low, high = np.maximum(low, -dp_clip), np.minimum(high, dp_clip)
    return DescriptorBounds(low, high, n_angular)


def bounds_for_shape(
    dim: int, n_angular: int, dp_clip: float | None = None
) -> DescriptorBounds:
    """:func:`descriptor_bounds` of the descriptor with D = ``dim`` and M bins.

    For a caller that knows only the arrays: K = D / 2 - 2M - 3.

    Raises
    ------
    ValueError
        If no positive K gives that D.
    """
    n_radial = dim // 2 - 2 * n_angular - 3
    if dim % 2 or n_radial < 1:
        raise ValueError(
            f"Stats of {dim} features and {n_angular} angular bins match no "
            "spectral descriptor (D = 2 (K + 2M + 3))."
        )
    return descriptor_bounds(n_radial, n_angular, dp_clip)


@dataclass(frozen=True)
class NoiseMargins:
    """High-probability bound on the DP noise in each statistics array (0: none)."""

    count: float = 0.0
    sum: float = 0.0
    sumsq: float = 0.0
    angular_sum: float = 0.0

    @property
    def noisy(self) -> bool:
        """Whether the statistics carry noise (counts need not be integers)."""
        return self.count > 0


def dp_noise_margins(
    privacy: PrivacyConfig,
    skills_per_sample: int,
    contributors: int = 1,
    shares: int = 1,
    sigmas: float = 10.0,
) -> NoiseMargins:
    """``sigmas`` standard deviations of the noise in one DP release of the stats.

    A client adds noise of standard deviation ``std_k`` (``calibrate_stats_noise``)
    to array k, or one of ``shares`` shares of it (``std_k / sqrt(shares)``) under
    secure aggregation; the sum of ``contributors`` such clients carries
    ``std_k sqrt(contributors / shares)``. A Gaussian exceeds 10 standard deviations
    with probability 1.5e-23, so an honest entry is never refused in practice.

    Raises
    ------
    ValueError
        If ``sigmas`` is not positive or a count is below 1.
    """
    if not sigmas > 0:
        raise ValueError(
            f"`security.stats_noise_sigmas` must be positive, got {sigmas}."
        )
    if contributors < 1 or shares < 1:
        raise ValueError(
            f"`contributors` and `shares` must be >= 1, got {contributors}, {shares}."
        )
    stds = calibrate_stats_noise(privacy, skills_per_sample).stds
    scale = sigmas * math.sqrt(contributors / shares)
    return NoiseMargins(
        count=scale * stds["count"],
        sum=scale * stds["sum"],
        sumsq=scale * stds["sumsq"],
        angular_sum=scale * stds["angular_sum"],
    )


def _row_name(s: int, skills: Sequence[str] | None) -> str:
    return f"{s} ({skills[s]!r})" if skills is not None and s < len(skills) else str(s)


def _outside(
    name: str,
    values: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    skills: Sequence[str] | None,
) -> ValidationResult:
    """First entry of the (S, X) ``values`` outside [low, high] (same shape)."""
    bad = np.argwhere((values < low) | (values > high))
    if not bad.size:
        return _OK
    s, j = (int(i) for i in bad[0])
    return _fail(
        f"Stats `{name}`[{s}, {j}] = {values[s, j]:.6g} of skill {_row_name(s, skills)}"
        f" is outside [{low[s, j]:.6g}, {high[s, j]:.6g}], the range of its count "
        "times the descriptor's bounds."
    )


def check_stats_bounds(
    stats: Mapping[str, np.ndarray],
    num_examples: float,
    bounds: DescriptorBounds,
    margins: NoiseMargins | None = None,
    skills: Sequence[str] | None = None,
) -> ValidationResult:
    """Every row of the statistics lies in what its count of samples can produce.

    For skill s with count c (n = c, or with noise ``min(num_examples, c + m_count)``,
    the most samples the row can hold):

    - ``c <= num_examples`` (``+ m_count`` with noise); without noise a row of
      count 0 is all zeros;
    - ``n * low <= sum <= n * high`` per entry (``-/+ m_sum``);
    - ``0 <= sumsq <= n * max(low^2, high^2)`` (``+ m_sumsq``);
    - ``0 <= angular_sum <= n`` per bin and per row (``+ m_angular``, ``sqrt(M)``
      times it for a row).

    Assumes the structure was checked (``check_spectrum_stats``: four finite arrays
    of consistent shapes).

    Parameters
    ----------
    stats : Mapping[str, np.ndarray]
        ``count (S,)``, ``sum (S, D)``, ``sumsq (S, D)``, ``angular_sum (S, M)``.
    num_examples : float
        Samples behind the statistics (a reply's capped ``num-examples``, or the sum
        of the contributors' for a secure sum).
    bounds : DescriptorBounds
        The run's descriptor range (:func:`descriptor_bounds`).
    margins : NoiseMargins | None
        DP noise bounds (:func:`dp_noise_margins`); None for exact statistics.
    skills : Sequence[str] | None
        Row names, used in the reason.
    """
    margins = margins or NoiseMargins()
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
    count, total = arrays["count"], arrays["sum"]
    sumsq, angular = arrays["sumsq"], arrays["angular_sum"]
    if total.shape[1] != bounds.dim or angular.shape[1] != bounds.n_angular:
        return _fail(
            f"Stats have {total.shape[1]} features and {angular.shape[1]} angular "
            f"bins; the run's descriptor has {bounds.dim} and {bounds.n_angular}."
        )
    limit = num_examples + margins.count
    over = np.flatnonzero(count > limit)
    if over.size:
        s = int(over[0])
        return _fail(
            f"Stats `count`[{s}] = {count[s]:.6g} of skill {_row_name(s, skills)} "
            f"exceeds `num-examples` = {num_examples:g}"
            + (
                f" plus the DP noise bound {margins.count:.3g}."
                if margins.noisy
                else "."
            )
        )
    if not margins.noisy:
        for s in np.flatnonzero(count == 0):
            for name in ("sum", "sumsq", "angular_sum"):
                row = arrays[name][s]
                if np.any(row != 0):
                    j = int(np.flatnonzero(row)[0])
                    return _fail(
                        f"Stats of skill {_row_name(int(s), skills)} have count 0 but "
                        f"`{name}`[{int(s)}, {j}] = {row[j]:.6g}; a row without "
                        "samples is all zeros."
                    )
    n = np.minimum(count + margins.count, num_examples)[:, None]  # (S, 1)
    slack = _RTOL * n * np.maximum(np.abs(bounds.low), np.abs(bounds.high)) + _ATOL
    result = _outside(
        "sum",
        total,
        n * bounds.low - slack - margins.sum,
        n * bounds.high + slack + margins.sum,
        skills,
    )
    if not result:
        return result
    square_slack = _RTOL * n * bounds.square_high + _ATOL
    result = _outside(
        "sumsq",
        sumsq,
        np.broadcast_to(-_ATOL - margins.sumsq, sumsq.shape),
        n * bounds.square_high + square_slack + margins.sumsq,
        skills,
    )
    if not result:
        return result
    high = n * (1 + _RTOL) + _ATOL  # (S, 1)
    result = _outside(
        "angular_sum",
        angular,
        np.broadcast_to(-_ATOL - margins.angular_sum, angular.shape),
        np.broadcast_to(high + margins.angular_sum, angular.shape),
        skills,
    )
    if not result:
        return result
    mass = angular.sum(axis=1)  # (S,)
    row_high = high[:, 0] + math.sqrt(bounds.n_angular) * margins.angular_sum
    bad_rows = np.flatnonzero(mass > row_high)
    if bad_rows.size:
        s = int(bad_rows[0])
        return _fail(
            f"Stats `angular_sum`[{s}] of skill {_row_name(s, skills)} sums to "
            f"{mass[s]:.6g}, more than its {n[s, 0]:g} samples allow (each angular "
            "distribution sums to at most 1)."
        )
    return _OK


def check_stats_skills(
    sent: Sequence[str] | None, expected: Sequence[str]
) -> ValidationResult:
    """The skill names sent with statistics are the run's, in the run's order."""
    if sent is None:
        return _fail(
            f"Stats come without skill names; the run's skills are {list(expected)}."
        )
    if list(sent) != list(expected):
        missing = [s for s in expected if s not in sent]
        extra = [s for s in sent if s not in expected]
        detail = (
            f" (missing {missing}, unknown {extra})"
            if missing or extra
            else " (same skills, another order)"
        )
        return _fail(
            f"Stats rows are skills {list(sent)}, but the run's skills are "
            f"{list(expected)}{detail}."
        )
    return _OK
