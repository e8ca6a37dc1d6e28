"""Array schema of skill statistics and spectra, and its validation.

``STATS_FIELDS`` is the one definition of the statistics arrays that travel in the
stats record (``SkillStats.to_arrays``); ``SPECTRUM_FIELDS`` does the same for
``SkillSpectrum``. Shapes are tuples of symbols: ``S`` skills, ``D`` descriptor size,
``M`` angular bins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# name -> shape as a tuple of symbols ("S" skills, "D" descriptor, "M" angular bins)
STATS_FIELDS: dict[str, tuple[str, ...]] = {
    "count": ("S",),
    "sum": ("S", "D"),
    "sumsq": ("S", "D"),
    "angular_sum": ("S", "M"),
}
SPECTRUM_FIELDS: dict[str, tuple[str, ...]] = {
    "mean": ("S", "D"),
    "var": ("S", "D"),
    "angular": ("S", "M"),
    "count": ("S",),
}


def check_skills(skills: Sequence[str]) -> tuple[str, ...]:
    """Skill names as a tuple of unique strings."""
    skills = tuple(skills)
    if not all(isinstance(s, str) and s for s in skills):
        raise ValueError(f"`skills` must be non-empty strings, got {list(skills)}.")
    if len(set(skills)) != len(skills):
        raise ValueError(f"`skills` must be unique, got {list(skills)}.")
    return skills


def validate_arrays(
    arrays: Mapping[str, Any],
    fields: Mapping[str, tuple[str, ...]],
    n_skills: int,
    owner: str,
    keep_dtype: bool = False,
) -> dict[str, Tensor]:
    """Check keys, shapes and values; return float64 CPU tensors (or as given)."""
    sizes: dict[str, int] = {"S": n_skills}
    out: dict[str, Tensor] = {}
    for key, symbols in fields.items():
        if key not in arrays:
            raise ValueError(
                f"{owner}: missing array `{key}`; got keys {sorted(arrays)}."
            )
        value = arrays[key]
        if isinstance(value, Tensor):
            tensor = value if keep_dtype else value.detach().to("cpu", torch.float64)
        else:
            try:
                tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{owner}: array `{key}` is not numeric ({err})."
                ) from err
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float64)
        shape = tuple(tensor.shape)
        ok = len(shape) == len(symbols)
        for size, sym in zip(shape, symbols, strict=False):
            ok = ok and sizes.setdefault(sym, size) == size
        if not ok:
            want = ", ".join(
                f"{sym}={sizes[sym]}" if sym in sizes else sym for sym in symbols
            )
            raise ValueError(
                f"{owner}: array `{key}` must have shape ({want}), got {shape}."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{owner}: array `{key}` holds NaN or infinite values.")
        if key == "count" and bool((tensor < 0).any()):
            raise ValueError(f"{owner}: array `count` must be >= 0, got {tensor}.")
        if key == "var" and bool((tensor <= 0).any()):
            raise ValueError(
                f"{owner}: array `var` must be positive, got min {tensor.min():.3g}."
            )
        out[key] = tensor
    return out
