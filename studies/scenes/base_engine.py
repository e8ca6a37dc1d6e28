"""The base and stream a central run builds, for the study scripts that probe them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fed_asr.central import CentralEngine
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.outputs import seed_everything


def central_engine(overrides: Sequence[str]) -> tuple[Any, CentralEngine]:
    """(stream, engine) of ``engine=central method=vanilla <overrides>``, seeded.

    The base comes from the same preparation cache as a run with these overrides.
    """
    cfg = compose_config(
        "config", ["engine=central", "progress=false", "method=vanilla", *overrides]
    )
    seed_everything(cfg.seed)
    stream = build_stream(cfg.data, cfg.seed)
    return stream, CentralEngine(cfg, stream)
