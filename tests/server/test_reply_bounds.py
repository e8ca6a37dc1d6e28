"""The server's range check of statistics replies for every descriptor layout."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fed_asr import protocol as P
from fed_asr.config import PrivacyConfig, SecurityConfig, compose_config
from server.reply_validation import ReplyGuard, run_descriptor_bounds

SKILLS = ("color", "shape")


def _stats(dim: int, n_angular: int, value: float) -> dict[str, np.ndarray]:
    """Statistics of 4 samples of skill ``color``, every descriptor entry ``value``."""
    count = np.array([4.0, 0.0])
    total = np.zeros((2, dim))
    total[0] = 4 * value
    angular = np.zeros((2, n_angular))
    angular[0] = 4.0 / n_angular
    return {
        "count": count,
        "sum": total,
        "sumsq": total * value,
        "angular_sum": angular,
    }


def _reason(guard: ReplyGuard, stats: dict[str, np.ndarray]) -> str | None:
    return guard.stats_reason(
        stats,
        {P.NUM_EXAMPLES_KEY: 4},
        ConfigRecord({P.SKILLS_KEY: list(SKILLS)}),
        stage=0,
        num_nodes=1,
    )


def test_per_head_bounds_wait_for_the_models_layer_heads() -> None:
    cfg = compose_config(
        "config", ["regularizer.heads=each", "regularizer.features=coherence"]
    )
    assert run_descriptor_bounds(cfg, None) is None
    bounds = run_descriptor_bounds(cfg, 16)
    assert bounds is not None and bounds.dim == 16 * cfg.regularizer.n_radial


def test_per_head_guard_refuses_statistics_until_it_knows_the_range() -> None:
    # Prepare: J = 3 layer-heads of K = 8 coherences each
    cfg = compose_config(
        "config", ["regularizer.heads=each", "regularizer.features=coherence"]
    )
    guard = ReplyGuard(SecurityConfig(), PrivacyConfig(), SKILLS, per_head=True)
    honest = _stats(24, cfg.regularizer.n_angular, 0.5)
    # Execute / Assert: fail closed before the range is known
    assert "range is not set" in str(_reason(guard, honest))
    guard.set_layer_heads(cfg, 3)
    assert _reason(guard, honest) is None
    # a coherence is a correlation: 1.5 cannot come from an honest client
    hostile = _reason(guard, _stats(24, cfg.regularizer.n_angular, 1.5))
    assert hostile is not None


@pytest.mark.parametrize("heads", ["pooled", "each"])
def test_a_reply_of_another_size_is_refused(heads: str) -> None:
    cfg = compose_config("config", [f"regularizer.heads={heads}"])
    guard = ReplyGuard(
        SecurityConfig(),
        PrivacyConfig(),
        SKILLS,
        bounds=run_descriptor_bounds(cfg, 4),
        per_head=heads == "each",
    )
    assert _reason(guard, _stats(10, cfg.regularizer.n_angular, 0.1)) is not None
