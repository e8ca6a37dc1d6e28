"""How many examples each client can have: what caps ``num-examples`` and test totals.

In simulation the server knows every client's data: the partitions are a pure
function of the config and the seed (``fed_asr.data.partition_stream``), so it
computes each partition's training set (what the method trains on), stage-end set
and test split, and a reply claiming more is refused. In deployment each site holds
its own data; the server then knows only ``security.max_num_examples_per_site``
(``max_num_examples`` when unset).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig, SecurityConfig
from fed_asr.data import ContinualStream, partition_stream
from fed_asr.methods import ContinualMethod


@dataclass(frozen=True)
class PartitionSizes:
    """Per partition and stage: samples trained on, stage-end samples, test samples.

    Each is indexed ``[partition][stage]``.
    """

    train: tuple[tuple[int, ...], ...]
    stage_end: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]

    @property
    def num_partitions(self) -> int:
        """Number of partitions."""
        return len(self.train)


def partition_sizes(
    stream: ContinualStream,
    method: ContinualMethod,
    num_partitions: int,
    alpha: float,
    seed: int,
    by: str = "answer",
) -> PartitionSizes:
    """Sizes of each simulated client's data, as the clients compute them.

    Parameters
    ----------
    stream : ContinualStream
        The full stream (``build_stream(cfg.data, cfg.seed)``).
    method : ContinualMethod
        Its ``training_samples`` is what a client trains on (e.g. ``joint`` takes
        every stage so far).
    num_partitions : int
        Partitions (one per SuperNode).
    alpha, seed : float, int
        ``data.dirichlet_alpha`` and the run's seed.
    by : str
        ``data.partition_by``.
    """
    shares = partition_stream(stream, num_partitions, alpha, seed, by=by)
    stages = range(len(stream.stages))
    return PartitionSizes(
        train=tuple(
            tuple(len(method.training_samples(s.stages, t)) for t in stages)
            for s in shares
        ),
        stage_end=tuple(tuple(len(s.stages[t].train) for t in stages) for s in shares),
        test=tuple(tuple(len(s.stages[t].test) for t in stages) for s in shares),
    )


class ExampleCaps:
    """The largest ``num-examples`` (or test total) a client's reply may claim.

    Parameters
    ----------
    security : SecurityConfig
        ``max_num_examples_per_site`` (else ``max_num_examples``): the cap of a
        client whose data the server does not know.
    sizes : callable or None
        ``num_partitions -> PartitionSizes`` in simulation; None in deployment.
    """

    def __init__(
        self,
        security: SecurityConfig,
        sizes: Callable[[int], PartitionSizes] | None = None,
    ) -> None:
        per_site = security.max_num_examples_per_site
        cap = per_site if per_site is not None else security.max_num_examples
        self.per_site = int(cap)
        self._sizes = sizes

    @classmethod
    def for_run(
        cls,
        cfg: ExperimentConfig,
        stream: ContinualStream,
        method: ContinualMethod,
        simulated: bool,
    ) -> ExampleCaps:
        """Caps of a run: partition sizes in simulation, the per-site cap otherwise."""
        if not simulated:
            return cls(cfg.security)

        @functools.cache
        def sizes(num_partitions: int) -> PartitionSizes:
            return partition_sizes(
                stream,
                method,
                num_partitions,
                cfg.data.dirichlet_alpha,
                cfg.seed,
                by=cfg.data.partition_by,
            )

        return cls(cfg.security, sizes)

    @property
    def knows_sites(self) -> bool:
        """Whether the server knows each client's data (simulation)."""
        return self._sizes is not None

    def _partition(
        self, metrics: Mapping[str, object], num_partitions: int
    ) -> tuple[PartitionSizes, int] | str:
        assert self._sizes is not None
        sizes = self._sizes(num_partitions)
        value = metrics.get(P.PARTITION_ID_KEY)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or float(value) != int(value)
            or not 0 <= int(value) < sizes.num_partitions
        ):
            return (
                f"`{P.PARTITION_ID_KEY}` = {value!r} names no partition of "
                f"0..{sizes.num_partitions - 1}"
            )
        return sizes, int(value)

    def cap(
        self,
        kind: str,
        metrics: Mapping[str, object],
        stage: int,
        num_partitions: int,
    ) -> int | str:
        """Cap of a reply's ``kind`` count (``train``, ``stage_end``, ``test``).

        Returns the cap, or the reason the reply's partition is not a valid one.
        """
        if self._sizes is None:
            return self.per_site
        found = self._partition(metrics, num_partitions)
        if isinstance(found, str):
            return found
        sizes, partition = found
        table: tuple[tuple[int, ...], ...] = getattr(sizes, kind)
        return table[partition][stage]

    def any_site(self, kind: str, stage: int, num_partitions: int) -> int:
        """The largest cap of ``kind`` over the sites (for a secure sum's members)."""
        if self._sizes is None:
            return self.per_site
        table: tuple[tuple[int, ...], ...] = getattr(self._sizes(num_partitions), kind)
        return max(row[stage] for row in table)
