"""The identity of a run's configuration, recorded in checkpoints and checked on resume.

A checkpoint stores the resolved config (flattened to dotted keys) and a SHA-256 of
the part that decides what the run computes. Resuming with another method, seed,
schedule or stage order would mix two experiments in one set of records, so resume
compares the two and names every differing key. Keys in
:data:`RESUME_MAY_DIFFER` (output paths, resume and logging switches, timeouts,
key-file paths) may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

# Dotted keys (or prefixes of them) that may change between a run and its resume:
# where things are written or read from, how the run reports progress and how long it
# waits. Nothing here changes what is trained or evaluated.
RESUME_MAY_DIFFER: tuple[str, ...] = (
    "output_dir",
    "resume",
    "progress",
    "tracking",
    "model.cache_dir",
    "data.cache_dir",
    "train.log_every",
    "federation.keep_checkpoints",
    "federation.round_timeout_s",
    "federation.client_cpus",
    "federation.site_cache_size",
    "security.signing_key",
    "security.verify_key",
)


def flatten_config(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or nested mapping) as ``{dotted.key: JSON value}``.

    Lists are kept as values; mappings and dataclasses are flattened.
    """
    root = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if not value and prefix:
                flat[prefix] = {}
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        flat[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", root)
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _may_differ(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def config_digest(
    flat: Mapping[str, Any], may_differ: Iterable[str] = RESUME_MAY_DIFFER
) -> str:
    """Hex SHA-256 of the keys of ``flat`` that must match on resume."""
    allowed = tuple(may_differ)
    kept = {k: v for k, v in flat.items() if not _may_differ(k, allowed)}
    payload = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def config_differences(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    may_differ: Iterable[str] = RESUME_MAY_DIFFER,
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, current)`` of every key that must match but does not.

    A key present on one side only counts as a difference (value ``None`` on the
    other), so a config from another version of the schema is refused too.
    """
    allowed = tuple(may_differ)
    missing = object()
    out = []
    for key in sorted(set(recorded) | set(current)):
        if _may_differ(key, allowed):
            continue
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old != new:
            out.append(
                (key, None if old is missing else old, None if new is missing else new)
            )
    return out


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    """One line: ``` `seed` (0 -> 1), `method.name` ('asr' -> 'vanilla')```."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"`{k}` ({short(a)} -> {short(b)})" for k, a, b in differences)
