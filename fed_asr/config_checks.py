"""Start-up checks of the privacy and security sections of the config.

Each check raises ``ValueError`` naming the field (``privacy.<name>`` or
``security.<name>``), the bad value and what is allowed, so that a bad setting stops
the run at composition instead of after training (``docs/security.md``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

# Secure aggregation sums fixed-point values modulo 2^bits in NumPy uint64: at most
# 64 bits, and below 16 the fixed-point range is too small to hold any statistic.
SECAGG_MIN_BITS = 16
SECAGG_MAX_BITS = 64


def _number(name: str, value: Any) -> float:
    """``value`` as a float, refusing bools, strings and NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int of at least ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def _positive_finite(name: str, value: Any) -> float:
    number = _number(name, value)
    if not 0 < number < math.inf:
        raise ValueError(f"`{name}` must be positive and finite, got {value!r}.")
    return number


def check_privacy(cfg: Any) -> None:
    """Validate every field of a ``PrivacyConfig``.

    Parameters
    ----------
    cfg : PrivacyConfig
        The section to check (duck-typed: this module is imported by its own).

    Raises
    ------
    ValueError
        Naming the first bad field and its value.
    """
    for name in ("secure_spectrum", "dp"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(
                f"`privacy.{name}` must be true or false, got {getattr(cfg, name)!r}."
            )
    bits = _integer("privacy.secagg_bits", cfg.secagg_bits, SECAGG_MIN_BITS)
    if bits > SECAGG_MAX_BITS:
        raise ValueError(
            f"`privacy.secagg_bits` must lie in [{SECAGG_MIN_BITS}, {SECAGG_MAX_BITS}] "
            f"(sums are taken modulo 2^bits in uint64), got {bits}."
        )
    scale = _positive_finite("privacy.secagg_scale", cfg.secagg_scale)
    if scale >= 2.0 ** (bits - 1):
        raise ValueError(
            f"`privacy.secagg_scale` must be below 2^(secagg_bits - 1) = "
            f"{2.0 ** (bits - 1):.6g} so that a value of 1 can be encoded, got {scale}."
        )
    threshold = _number("privacy.secagg_threshold", cfg.secagg_threshold)
    if not 0 < threshold <= 1:
        raise ValueError(
            "`privacy.secagg_threshold` is the fraction of clients that must survive "
            f"a secure round and must lie in (0, 1], got {cfg.secagg_threshold!r}."
        )
    if cfg.secure_spectrum and threshold <= 0.5:
        warnings.warn(
            f"`privacy.secagg_threshold={threshold}` is at most 0.5: a malicious "
            "server could then unmask a single client (docs/security.md, threat "
            "model). Keep it above 0.5.",
            stacklevel=3,
        )
    _positive_finite("privacy.dp_epsilon", cfg.dp_epsilon)
    delta = _number("privacy.dp_delta", cfg.dp_delta)
    if not 0 < delta < 1:
        raise ValueError(
            f"`privacy.dp_delta` must lie in (0, 1), got {cfg.dp_delta!r}."
        )
    _positive_finite("privacy.dp_clip", cfg.dp_clip)
    if cfg.dp_seed is not None:
        _integer("privacy.dp_seed", cfg.dp_seed, 0)
        if not cfg.dp:
            warnings.warn(
                "`privacy.dp_seed` specified but will be ignored when "
                "`privacy.dp=false`.",
                stacklevel=3,
            )
    _positive_finite("privacy.adapter_clip", cfg.adapter_clip)
    _positive_finite("privacy.adapter_epsilon", cfg.adapter_epsilon)
    _integer("privacy.num_examples_granularity", cfg.num_examples_granularity, 1)


def check_security(cfg: Any) -> None:
    """Validate the fields of a ``SecurityConfig`` that bound client replies.

    Parameters
    ----------
    cfg : SecurityConfig
        The section to check.

    Raises
    ------
    ValueError
        Naming the first bad field and its value.
    """
    for name in ("sign", "hash_checkpoints"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(
                f"`security.{name}` must be true or false, got {getattr(cfg, name)!r}."
            )
    for name in ("signing_key", "verify_key"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(
                f"`security.{name}` must be a path or null, got {value!r}."
            )
    norm = _number("security.max_update_norm", cfg.max_update_norm)
    if not norm > 0:
        raise ValueError(
            f"`security.max_update_norm` must be positive, got {cfg.max_update_norm!r}."
        )
    _integer("security.max_num_examples", cfg.max_num_examples, 1)
