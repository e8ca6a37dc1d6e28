"""The per-process site cache: bounded LRU, evicted sites rebuilt identically."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flower_helpers import make_run_config

from clients import site as site_module
from clients.site import Site, cached_site_count, site_from_context
from fed_asr import protocol as P
from fed_asr.config_sections import FederationConfig

NUM_PARTITIONS = 5


@pytest.fixture(autouse=True)
def _empty_site_cache() -> Iterator[None]:
    site_module._SITES.clear()
    yield
    site_module._SITES.clear()


def _node(partition_id: int) -> dict[str, int]:
    return {P.NODE_PARTITION_ID: partition_id, P.NODE_NUM_PARTITIONS: NUM_PARTITIONS}


def _serve(run_config: dict[str, str]) -> Callable[[int], Site]:
    return lambda partition_id: site_from_context(run_config, _node(partition_id))


def test_site_cache_never_exceeds_bound_while_serving_many_partitions(
    run_overrides: Callable[..., list[str]],
) -> None:
    # Prepare
    serve = _serve(make_run_config(run_overrides(**{"federation.site_cache_size": 2})))
    counts = []
    # Execute: two passes over every partition, as a client actor of a big simulation
    for partition_id in [*range(NUM_PARTITIONS), *range(NUM_PARTITIONS)]:
        serve(partition_id)
        counts.append(cached_site_count())
    # Assert
    assert max(counts) == 2
    assert counts == [1, 2, 2, 2, 2, 2, 2, 2, 2, 2]


def test_site_cache_evicts_least_recently_used_not_oldest(
    run_overrides: Callable[..., list[str]],
) -> None:
    # Prepare
    serve = _serve(make_run_config(run_overrides(**{"federation.site_cache_size": 2})))
    first, second = serve(0), serve(1)
    # Execute: touch partition 0, then a third partition needs a slot
    assert serve(0) is first
    serve(2)
    # Assert: partition 1 (least recently used) went, partition 0 stayed
    assert serve(0) is first
    assert serve(1) is not second


def test_site_cache_rebuilds_evicted_site_identically(
    run_overrides: Callable[..., list[str]],
) -> None:
    # Prepare
    serve = _serve(make_run_config(run_overrides(**{"federation.site_cache_size": 1})))
    before = serve(3)
    # Execute: partition 3 is evicted by partition 4, then served again
    serve(4)
    after = serve(3)
    # Assert: a new object with the same data, answers, model and method
    assert after is not before
    assert after.partition_id == before.partition_id == 3
    assert after.stream == before.stream
    assert after.skill_answers == before.skill_answers
    assert after.collator.answers == before.collator.answers
    assert type(after.method) is type(before.method)
    assert after.model is before.model  # the base model stays shared per process
    assert after.stream != serve(4).stream  # the comparison can fail


def test_federation_config_rejects_non_positive_site_cache_size() -> None:
    with pytest.raises(ValueError, match="federation.site_cache_size"):
        FederationConfig(site_cache_size=0)


def test_model_is_shared_by_runs_of_one_model_config_and_bounded(
    run_overrides: Callable[..., list[str]],
) -> None:
    # Prepare: two runs that differ only in output folder and method, one that
    # differs in the model; a long-lived worker serves them in turn
    site_module._MODELS.clear()
    first = _serve(make_run_config(run_overrides("a")))(0)
    same_model = _serve(make_run_config(run_overrides("b", method="vanilla")))(0)
    # Execute
    other_models = [
        _serve(make_run_config(run_overrides("c", **{"lora.r": r})))(0) for r in (2, 3)
    ]
    # Assert: one model for the first two runs; never more than the bound kept
    assert same_model.model is first.model
    assert other_models[0].model is not first.model
    assert len(site_module._MODELS) == site_module.MODEL_CACHE_SIZE
