"""Deterministic index selection: stratified subsampling and Dirichlet client splits.

Each client's share of a stage is non-IID by a label: for each label, the indices are
split across clients with proportions drawn from Dirichlet(alpha). The label is the
answer by default (label skew, Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification") or, with
``by="skill"``, the sample's skill: each skill of a stage then sits mostly at a few
clients, and with a small alpha some clients hold none of it (an institution that
never sees a skill: there only a shared spectrum can protect that skill).

The test split of a stage uses the *same* per-label proportions as its training
split, so a client is evaluated on the mix it trains on (what one institution sees).
Pooled over clients, the test shares are the whole test set, so pooled accuracy does
not depend on the split.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence

import numpy as np

from fed_asr.data.samples import ContinualStream, Stage, VQASample
from fed_asr.data.skills import question_skill

# What a partition is non-IID by (``data.partition_by``).
PARTITION_LABELS = ("answer", "skill")


def make_rng(seed: int, *keys: object) -> np.random.Generator:
    """Make a generator seeded by ``seed`` and run-independent hashes of ``keys``."""
    entropy = [int(seed) % (2**63)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(entropy)


def _groups(labels: Sequence[Hashable]) -> list[tuple[Hashable, np.ndarray]]:
    """Group indices by label, labels in a deterministic (string) order."""
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    order = sorted(by_label, key=str)
    return [(label, np.asarray(by_label[label], dtype=np.int64)) for label in order]


def stratified_subsample(
    labels: Sequence[Hashable], max_size: int | None, rng: np.random.Generator
) -> list[int]:
    """Shuffled indices of a label-stratified subset of at most ``max_size`` items.

    Parameters
    ----------
    labels : Sequence[Hashable]
        Label of each item (the answer, for VQA samples).
    max_size : int | None
        Size of the subset; ``None`` (or a size >= ``len(labels)``) keeps every item.
    rng : numpy.random.Generator
        Source of randomness (see ``make_rng``).

    Returns
    -------
    list[int]
        Indices in random order. Each label keeps its share of the items, up to
        rounding (largest remainders).
    """
    n = len(labels)
    if max_size is not None and max_size < 0:
        raise ValueError(f"`max_size` must be >= 0 or None, got {max_size}.")
    if max_size is None or max_size >= n:
        return rng.permutation(n).tolist()
    groups = _groups(labels)
    exact = np.array([max_size * len(idx) / n for _, idx in groups])
    quota = np.floor(exact).astype(np.int64)
    # stable sort: ties keep the label order
    extra = np.argsort(-(exact - quota), kind="stable")[: max_size - int(quota.sum())]
    quota[extra] += 1
    picked = [
        rng.permutation(idx)[:q] for (_, idx), q in zip(groups, quota, strict=True)
    ]
    chosen = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return rng.permutation(chosen).tolist()


def _check_split_args(num_clients: int, alpha: float) -> None:
    if num_clients <= 0:
        raise ValueError(f"`num_clients` must be positive, got {num_clients}.")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive, got {alpha}.")


def _draw_proportions(
    labels: Sequence[Hashable], num_clients: int, alpha: float, rng: np.random.Generator
) -> dict[Hashable, np.ndarray]:
    """One Dirichlet(alpha) client-proportion vector per distinct label."""
    return {
        label: rng.dirichlet(np.full(num_clients, alpha))
        for label in sorted(set(labels), key=str)
    }


def _split_by_proportions(
    labels: Sequence[Hashable],
    proportions: dict[Hashable, np.ndarray],
    num_clients: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Split each label's shuffled indices across clients at the given proportions."""
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for label, idx in _groups(labels):
        idx = rng.permutation(idx)
        # rounded cumulative cut points: every index lands in exactly one client
        cuts = np.round(np.cumsum(proportions[label])[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            shares[client].extend(part.tolist())
    return [sorted(share) for share in shares]


def dirichlet_partition(
    labels: Sequence[Hashable], num_clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Split item indices across clients, non-IID by label (Dirichlet).

    Parameters
    ----------
    labels : Sequence[Hashable]
        Label of each item.
    num_clients : int
        Number of clients.
    alpha : float
        Dirichlet concentration; small values give skewed shares, large values
        near-uniform ones.
    seed : int
        Seed; the same arguments always give the same split.

    Returns
    -------
    list[list[int]]
        ``num_clients`` sorted index lists; every index appears in exactly one.
        A client may get no items.

    Raises
    ------
    ValueError
        ``num_clients`` or ``alpha`` not positive.
    """
    _check_split_args(num_clients, alpha)
    rng = make_rng(seed, "dirichlet")
    proportions = _draw_proportions(labels, num_clients, alpha, rng)
    return _split_by_proportions(labels, proportions, num_clients, rng)


def check_partition_label(by: str) -> None:
    """Raise ``ValueError`` naming ``data.partition_by`` unless ``by`` is known."""
    if by not in PARTITION_LABELS:
        raise ValueError(
            f"`data.partition_by` must be one of {list(PARTITION_LABELS)}, got {by!r}."
        )


def partition_label(sample: VQASample, by: str) -> str:
    """The label a partition ``by`` splits ``sample`` on (its answer or its skill)."""
    check_partition_label(by)
    if by == "skill":
        return sample.skill or question_skill(sample.question)
    return sample.answer


def partition_stream(
    stream: ContinualStream,
    num_clients: int,
    alpha: float,
    seed: int,
    by: str = "answer",
) -> list[ContinualStream]:
    """Give each client its non-IID share of every stage (train and test).

    For each stage, one Dirichlet(alpha) proportion vector is drawn per label (the
    answer, or the skill with ``by="skill"``) and applied to both the training and
    the test samples (see the module docstring).
    Clients keep the stream's stage names, answers, skills and vocabulary words, so
    all clients build the same tokenizer. A client may get an empty stage.

    Parameters
    ----------
    stream : ContinualStream
        The full stream.
    num_clients : int
        Number of clients.
    alpha : float
        Dirichlet concentration.
    seed : int
        Seed; each stage's split depends on it and on the stage name only.
    by : {"answer", "skill"}
        The label the split is non-IID by.

    Returns
    -------
    list[ContinualStream]
        One stream per client, in client order.

    Raises
    ------
    ValueError
        ``num_clients`` or ``alpha`` not positive, or ``by`` not a known label.
    """
    _check_split_args(num_clients, alpha)
    check_partition_label(by)
    client_stages: list[list[Stage]] = [[] for _ in range(num_clients)]
    for stage in stream.stages:
        rng = make_rng(seed, "partition", stage.name)
        train_labels = [partition_label(s, by) for s in stage.train]
        test_labels = [partition_label(s, by) for s in stage.test]
        proportions = _draw_proportions(
            train_labels + test_labels, num_clients, alpha, rng
        )
        train_shares = _split_by_proportions(
            train_labels, proportions, num_clients, rng
        )
        test_shares = _split_by_proportions(test_labels, proportions, num_clients, rng)
        for client in range(num_clients):
            client_stages[client].append(
                Stage(
                    name=stage.name,
                    train=_take(stage.train, train_shares[client]),
                    test=_take(stage.test, test_shares[client]),
                )
            )
    return [
        ContinualStream(
            name=f"{stream.name}-client{client}",
            stages=stages,
            answers=list(stream.answers),
            skills=list(stream.skills),
            extra_words=tuple(stream.vocabulary()),
        )
        for client, stages in enumerate(client_stages)
    ]


def _take(samples: Sequence[VQASample], indices: Sequence[int]) -> list[VQASample]:
    """Pick the samples at ``indices``, in that order."""
    return [samples[i] for i in indices]
