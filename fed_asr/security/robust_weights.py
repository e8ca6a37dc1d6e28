"""Bounds on one client's influence on an adapter merge (pure functions).

A reply that passes validation may still dominate a weighted mean: by a large
``num-examples`` or by a large update. :func:`norm_clip_scales` scales each update
down to ``factor`` times the round's median update norm, :func:`cap_shares` caps
each client's share of the total weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lower_median(values: Sequence[float]) -> float:
    """The median; for an even count the lower of the two middle values.

    With two clients the lower median is the smaller norm, so neither can exceed
    ``factor`` times the other's; the midpoint would be dominated by the larger.
    """
    if not values:
        raise ValueError("`values` must not be empty.")
    ordered = sorted(float(v) for v in values)
    return ordered[(len(ordered) - 1) // 2]


def norm_clip_scales(norms: Sequence[float], factor: float) -> list[float]:
    """Per update, the scale in (0, 1] that keeps its norm <= ``factor`` x median.

    Parameters
    ----------
    norms : Sequence[float]
        ``||new_k - global||_2`` of each reply of the round.
    factor : float
        Bound relative to :func:`lower_median` of ``norms``.

    Returns
    -------
    list[float]
        1.0 for an update within the bound, else ``bound / norm``.

    Raises
    ------
    ValueError
        If ``factor`` is not positive or a norm is negative or not finite.
    """
    if not factor > 0:
        raise ValueError(
            f"`security.norm_bound_factor` must be positive, got {factor}."
        )
    if any(not np.isfinite(n) or n < 0 for n in norms):
        raise ValueError(f"Update norms must be finite and >= 0, got {list(norms)}.")
    if not norms:
        return []
    bound = factor * lower_median(norms)
    return [1.0 if n <= bound else bound / n for n in norms]


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights lowered so that none exceeds ``max_share`` of their sum.

    The largest weights are lowered to one common value c (water-filling) with
    ``c = max_share * sum_k min(w_k, c)``; the others are unchanged, so honest
    clients keep their relative weights. When ``max_share * n < 1`` no such c
    exists and every weight becomes the smallest (equal shares).

    Raises
    ------
    ValueError
        If ``max_share`` is not in (0, 1] or a weight is negative.
    """
    if not 0 < max_share <= 1:
        raise ValueError(
            f"`security.max_example_share` must be in (0, 1], got {max_share}."
        )
    if any(w < 0 for w in weights):
        raise ValueError(f"Weights must be >= 0, got {list(weights)}.")
    w = [float(v) for v in weights]
    if max_share >= 1 or sum(w) == 0:
        return w
    if max_share * len(w) < 1:
        return [min(w)] * len(w)
    ordered = sorted(w, reverse=True)
    if ordered[0] <= max_share * sum(ordered):
        return w
    for clipped in range(1, len(w)):
        # The `clipped` largest set to c, the rest kept: c = share * (rest + k c)
        rest = sum(ordered[clipped:])
        cap = max_share * rest / (1 - max_share * clipped)
        if ordered[clipped] <= cap:
            return [min(v, cap) for v in w]
    return [min(w)] * len(w)  # not reached: share * n >= 1 stops at the last k
