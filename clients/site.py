"""Per-process state of a client: config, data partition, model, method.

A ClientApp process (a Ray actor in simulation, a ``flwr-clientapp`` process in
deployment) may serve many messages and, in simulation, several partitions. The base
model with its LoRA wrapper is loaded once per process and model config (the two
most recent are kept: a long-lived site worker serves run after run); each message
then overwrites the adapter weights with the ones it carries, so partitions and runs
never leak state into each other through the model.

Sites (partition stream, collator, method) are kept in a least-recently-used cache of
``federation.site_cache_size`` entries: a process of a 100-client simulation serves
many partitions, and keeping them all grows its memory by a few MiB per partition.
A site holds nothing that must outlive a message (that lives in ``context.state``),
so an evicted site is rebuilt identically from the config and seed when served again.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig, load_config
from fed_asr.data import ContinualStream, build_stream, partition_stream
from fed_asr.methods import ContinualMethod, build_method
from fed_asr.models import (
    VQACollator,
    load_run_base_model,
    model_family,
    resolve_device,
)
from fed_asr.models.scoring import stream_skill_answers
from fed_asr.protocol import NODE_DATA_ROOT, NODE_NUM_PARTITIONS, NODE_PARTITION_ID


@dataclass
class Site:
    """Everything one client needs to train, evaluate and describe its data."""

    cfg: ExperimentConfig
    partition_id: int
    stream: ContinualStream
    model: Any
    collator: VQACollator
    method: ContinualMethod
    # Skill -> its answers: the candidates of the `type` evaluation protocol
    skill_answers: dict[str, list[str]]


def site_from_context(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> Site:
    """Return the (cached) site for this run config and node.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Flower run config (``config-name``, ``overrides``).
    node_config : Mapping[str, Any]
        Node config: ``partition-id`` and ``num-partitions`` (simulation sets them),
        or ``data-root`` pointing at this site's own manifest folder (deployment).
    """
    run_key = _run_key(run_config)
    data_root = node_config.get(NODE_DATA_ROOT)
    partition_id = int(node_config.get(NODE_PARTITION_ID, 0))
    num_partitions = int(node_config.get(NODE_NUM_PARTITIONS, 1))
    root = str(data_root) if data_root else None
    key: _SiteKey = (run_key, partition_id, num_partitions, root)
    return _SITES.get(
        key,
        lambda: _build_site(*key),
        _config(run_key).federation.site_cache_size,
    )


def site_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config of a Flower run config (composed once per process)."""
    return _config(_run_key(run_config))


def _run_key(run_config: Mapping[str, Any]) -> _RunKey:
    return tuple(sorted((k, str(v)) for k, v in run_config.items()))


def cached_site_count() -> int:
    """Return how many sites this process holds (at most ``site_cache_size``)."""
    return len(_SITES)


_RunKey = tuple[tuple[str, str], ...]
# (run config, partition id, number of partitions, data root)
_SiteKey = tuple[_RunKey, int, int, str | None]


_T = TypeVar("_T")


class _LeastRecentlyUsed(Generic[_T]):
    """The most recently used entries of this process, bounded per lookup."""

    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, _T] = OrderedDict()
        # Ray actors are single-threaded, but the thread backend and tests may not be
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, build: Callable[[], _T], bound: int) -> _T:
        """The entry of ``key`` (``build()`` on a miss), keeping at most ``bound``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = build()
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > bound:
                self._entries.popitem(last=False)
            return entry

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()


_SITES: _LeastRecentlyUsed[Site] = _LeastRecentlyUsed()
# Base models kept per process: a long-lived site worker serving run after run
# holds the two most recent model configs, not one model per run it ever served.
_MODELS: _LeastRecentlyUsed[tuple[Any, Any]] = _LeastRecentlyUsed()
MODEL_CACHE_SIZE = 2


@functools.cache
def _config(run_config_key: _RunKey) -> ExperimentConfig:
    return load_config(dict(run_config_key))


def _build_site(
    run_config_key: _RunKey,
    partition_id: int,
    num_partitions: int,
    data_root: str | None,
) -> Site:
    cfg = _config(run_config_key)
    stream, vocabulary, skill_answers = _client_stream(
        run_config_key, partition_id, num_partitions, data_root
    )
    model, processor = _shared_model(cfg, vocabulary)
    collator = VQACollator(
        processor,
        cfg.model.prompt_template,
        stream.answers,
        family=model_family(model),
        function_words=cfg.regularizer.function_words,
    )
    method = build_method(cfg.method, cfg.regularizer)
    return Site(cfg, partition_id, stream, model, collator, method, skill_answers)


def _client_stream(
    run_config_key: _RunKey,
    partition_id: int,
    num_partitions: int,
    data_root: str | None,
) -> tuple[ContinualStream, tuple[str, ...], dict[str, list[str]]]:
    """This client's stream, the vocabulary and skill answers of the whole stream.

    The tiny model's tokenizer is built from the vocabulary, so it must be the one
    of the full stream (as on the server), not of this client's share; so are the
    candidates of the ``type`` protocol, for every client to score alike.
    """
    cfg = _config(run_config_key)
    if data_root is not None:
        # A site with its own data folder: all of it is this client's.
        own = dataclasses.replace(cfg.data, name="manifest", root=data_root)
        stream = build_stream(own, cfg.seed)
        return stream, tuple(stream.vocabulary()), stream_skill_answers(stream)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"Node config `{NODE_PARTITION_ID}`={partition_id} is outside "
            f"0..{num_partitions - 1} (`{NODE_NUM_PARTITIONS}`={num_partitions})."
        )
    shares, vocabulary, skill_answers = _stream_shares(run_config_key, num_partitions)
    return shares[partition_id], vocabulary, skill_answers


@functools.lru_cache(maxsize=4)
def _stream_shares(
    run_config_key: _RunKey, num_partitions: int
) -> tuple[list[ContinualStream], tuple[str, ...], dict[str, list[str]]]:
    """Every partition of the run's stream, split once per process and config.

    The shares reference one copy of the samples, so keeping them all costs about one
    stream, while rebuilding an evicted site skips loading and splitting the stream.
    """
    cfg = _config(run_config_key)
    stream = build_stream(cfg.data, cfg.seed)
    shares = partition_stream(
        stream,
        num_partitions,
        cfg.data.dirichlet_alpha,
        cfg.seed,
        by=cfg.data.partition_by,
    )
    return shares, tuple(stream.vocabulary()), stream_skill_answers(stream)


def _shared_model(
    cfg: ExperimentConfig, vocabulary: tuple[str, ...]
) -> tuple[Any, Any]:
    """Base model + LoRA wrapper, once per process and model config.

    Keyed by what decides the model (model, data, LoRA settings, seed), not by the
    whole run config: consecutive runs of one model share the loaded model. Each
    message loads its own adapter weights, so runs and partitions never see each
    other's state through it.
    """
    key = (repr(cfg.model), repr(cfg.data), repr(cfg.lora), cfg.seed, vocabulary)

    def build() -> tuple[Any, Any]:
        device = resolve_device(cfg.model.device)
        base, processor = load_run_base_model(
            cfg.model, cfg.data, list(vocabulary), device
        )
        aggregation = get_lora_aggregation(cfg.lora.aggregation)
        return aggregation.attach(base, cfg.lora, cfg.seed), processor

    return _MODELS.get(key, build, MODEL_CACHE_SIZE)
