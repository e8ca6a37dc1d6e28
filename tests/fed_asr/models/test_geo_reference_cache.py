"""The geometry term's per-sample reference cache gives the uncached loss."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from fed_asr.config import RegularizerConfig
from fed_asr.methods import NoOptions, StepContext
from fed_asr.methods.asr import ASR
from fed_asr.models import forward_with_attention
from fed_asr.reference_cache import ReferenceCache


def _context(model, batch, keys) -> StepContext:  # type: ignore[no-untyped-def]
    forward = partial(forward_with_attention, model, batch, 2, "selective")
    return StepContext(
        model=model,
        batch=batch,
        capture=forward(hidden=True),
        skill_probs=torch.full((len(keys), 4), 0.25),
        forward=forward,
        sample_keys=keys,
    )


@pytest.mark.parametrize("geometry", ["paper", "token"])
def test_asr_geo_term_cached_reference_equals_recomputed(
    perturbed_lora: tuple[Any, dict[str, Any], list[tuple[str, str]]], geometry: str
) -> None:
    # Prepare: LoRA B non-zero so current and reference differ
    model, batch, keys = perturbed_lora
    reg = RegularizerConfig(l_sel=2, beta=0.0, geometry=geometry)
    cached = ASR(NoOptions(), reg)
    uncached = ASR(
        NoOptions(),
        RegularizerConfig(l_sel=2, beta=0.0, geometry=geometry, geo_cache_entries=0),
    )
    # Execute
    first = cached.penalties(_context(model, batch, keys))["geo"]
    second = cached.penalties(_context(model, batch, keys))["geo"]
    reference = uncached.penalties(_context(model, batch, keys))["geo"]
    # Assert
    assert cached.reference_cache.hits == len(keys)
    assert float(reference) > 0
    torch.testing.assert_close(first, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-6)


def test_reference_cache_evicts_least_recent_and_rejects_shape_change() -> None:
    # Prepare
    cache = ReferenceCache(max_entries=2)
    mask = torch.tensor([[True, True, False]])
    rows = torch.randn(1, 3, 5)
    # Execute
    for key in ("a", "b", "c"):
        cache.store([key], rows, mask)
    # Assert
    assert len(cache) == 2
    assert cache.lookup(["a"], mask, 5) is None
    hit = cache.lookup(["c"], mask, 5)
    assert hit is not None
    torch.testing.assert_close(hit[0, :2], rows[0, :2])
    assert cache.lookup(["c"], torch.tensor([[True, False, False]]), 5) is None
