"""Tests of stratified subsampling, Dirichlet partitioning and client streams."""

from __future__ import annotations

import numpy as np
import pytest

from fed_asr.data import (
    ContinualStream,
    Stage,
    VQASample,
    dirichlet_partition,
    partition_stream,
)
from fed_asr.data.partition import make_rng, stratified_subsample


def _labels(n_per_label: int = 100, n_labels: int = 10) -> list[str]:
    return [f"a{k}" for k in range(n_labels) for _ in range(n_per_label)]


def _stream() -> ContinualStream:
    def samples(stage: str, n: int) -> list[VQASample]:
        return [
            VQASample(f"{stage}{i}.png", f"question {i}?", f"ans{i % 5}")
            for i in range(n)
        ]

    stages = [
        Stage("s0", samples("s0", 200), samples("s0t", 50)),
        Stage("s1", samples("s1", 120), samples("s1t", 30)),
        Stage("s2", samples("s2", 3), []),
    ]
    answers = [f"ans{k}" for k in range(5)]
    return ContinualStream("toy", stages, answers, ["a", "b"], ("extra",))


def test_dirichlet_partition_assigns_every_index_once() -> None:
    # Prepare
    labels = _labels()

    # Execute
    shares = dirichlet_partition(labels, num_clients=7, alpha=0.3, seed=0)

    # Assert
    assert len(shares) == 7
    flat = sorted(i for share in shares for i in share)
    assert flat == list(range(len(labels)))


def test_dirichlet_partition_same_seed_same_split_other_seed_differs() -> None:
    # Prepare
    labels = _labels()

    # Execute
    first = dirichlet_partition(labels, 4, 0.5, seed=1)
    again = dirichlet_partition(labels, 4, 0.5, seed=1)
    other = dirichlet_partition(labels, 4, 0.5, seed=2)

    # Assert
    assert first == again
    assert first != other


def _max_share(labels: list[str], shares: list[list[int]]) -> float:
    """Mean over labels of the largest fraction of that label held by one client."""
    fractions = []
    for label in sorted(set(labels)):
        counts = [sum(labels[i] == label for i in share) for share in shares]
        fractions.append(max(counts) / sum(counts))
    return float(np.mean(fractions))


def test_dirichlet_partition_small_alpha_skewed_large_alpha_balanced() -> None:
    # Prepare
    labels = _labels()

    # Execute
    skewed = dirichlet_partition(labels, 4, alpha=0.05, seed=0)
    balanced = dirichlet_partition(labels, 4, alpha=1000.0, seed=0)

    # Assert
    assert _max_share(labels, skewed) > 0.8
    assert _max_share(labels, balanced) < 0.35


def test_dirichlet_partition_bad_arguments_raise() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`num_clients` must be positive, got 0"):
        dirichlet_partition(["a"], 0, 0.5, 0)
    with pytest.raises(ValueError, match="`alpha` must be positive, got -1"):
        dirichlet_partition(["a"], 2, -1, 0)


def test_dirichlet_partition_empty_labels_gives_empty_shares() -> None:
    # Execute
    shares = dirichlet_partition([], 3, 0.5, 0)

    # Assert
    assert shares == [[], [], []]


def test_stratified_subsample_keeps_label_shares_and_is_deterministic() -> None:
    # Prepare
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100

    # Execute
    picked = stratified_subsample(labels, 100, make_rng(0, "x"))
    again = stratified_subsample(labels, 100, make_rng(0, "x"))

    # Assert
    assert picked == again
    assert len(set(picked)) == 100
    counts = {k: sum(labels[i] == k for i in picked) for k in "abc"}
    assert counts == {"a": 60, "b": 30, "c": 10}


def test_stratified_subsample_none_keeps_everything_shuffled() -> None:
    # Execute
    picked = stratified_subsample(["a"] * 50, None, make_rng(0))

    # Assert
    assert sorted(picked) == list(range(50))
    assert picked != list(range(50))


def test_partition_stream_keeps_totals_and_metadata() -> None:
    # Prepare
    stream = _stream()

    # Execute
    clients = partition_stream(stream, num_clients=3, alpha=0.5, seed=0)

    # Assert
    assert len(clients) == 3
    for t, stage in enumerate(stream.stages):
        train = [s for c in clients for s in c.stages[t].train]
        test = [s for c in clients for s in c.stages[t].test]
        assert sorted(train, key=str) == sorted(stage.train, key=str)
        assert sorted(test, key=str) == sorted(stage.test, key=str)
    for client in clients:
        assert [s.name for s in client.stages] == ["s0", "s1", "s2"]
        assert client.answers == stream.answers
        assert client.skills == stream.skills
        assert client.vocabulary() == stream.vocabulary()


def test_partition_stream_small_alpha_gives_some_empty_stage() -> None:
    # Prepare
    stream = _stream()

    # Execute
    clients = partition_stream(stream, num_clients=8, alpha=0.05, seed=0)

    # Assert
    sizes = [len(c.stages[2].train) for c in clients]
    assert sum(sizes) == 3
    assert sizes.count(0) >= 5
    empty = next(c for c in clients if not c.stages[2].train)
    assert empty.stages[2].test == []
    assert "extra" in empty.vocabulary()


def test_partition_stream_is_deterministic() -> None:
    # Execute
    first = partition_stream(_stream(), 3, 0.5, seed=4)
    again = partition_stream(_stream(), 3, 0.5, seed=4)

    # Assert
    assert [c.stages for c in first] == [c.stages for c in again]


def _two_skill_stream() -> ContinualStream:
    """One stage, two skills (explicit labels), five answers spread over both."""

    def samples(prefix: str, n: int) -> list[VQASample]:
        return [
            VQASample(
                f"{prefix}{i}.png",
                f"question {i}?",
                f"ans{i % 5}",
                skill="left" if i % 2 else "right",
            )
            for i in range(n)
        ]

    stage = Stage("s0", samples("tr", 400), samples("te", 100))
    answers = [f"ans{k}" for k in range(5)]
    return ContinualStream("toy2", [stage], answers, ["left", "right"])


def _holders(stream: ContinualStream, clients: list[ContinualStream]) -> dict:
    """Per skill, the share of its training samples held by each client."""
    shares: dict[str, list[float]] = {}
    for skill in ("left", "right"):
        total = sum(s.skill == skill for s in stream.stages[0].train)
        shares[skill] = [
            sum(s.skill == skill for s in c.stages[0].train) / total for c in clients
        ]
    return shares


def test_partition_by_skill_puts_each_skill_at_few_clients() -> None:
    # Prepare
    stream = _two_skill_stream()

    # Execute
    by_skill = partition_stream(stream, 4, alpha=0.01, seed=3, by="skill")
    by_answer = partition_stream(stream, 4, alpha=0.01, seed=3, by="answer")

    # Assert: by skill, one client holds (almost) all of a skill, train and test
    for skill, shares in _holders(stream, by_skill).items():
        assert max(shares) > 0.95, (skill, shares)
        holder = int(np.argmax(shares))
        test = [s for s in by_skill[holder].stages[0].test if s.skill == skill]
        assert len(test) > 0.95 * 50
    # by answer, each skill is spread: its five answers went to different clients
    assert min(max(v) for v in _holders(stream, by_answer).values()) < 0.95


def test_partition_by_skill_falls_back_to_the_question_parser() -> None:
    # Prepare: easy-VQA style samples (no explicit skill), two answers per type
    shape = [
        VQASample(
            f"s{i}.png", "What shape is in the image?", ("circle", "triangle")[i % 2]
        )
        for i in range(60)
    ]
    color = [
        VQASample(f"c{i}.png", "What color is the shape?", ("red", "blue")[i % 2])
        for i in range(60)
    ]
    answers = ["circle", "triangle", "red", "blue"]
    stream = ContinualStream("ev", [Stage("s0", shape + color, [])], answers, [])

    # Execute
    clients = partition_stream(stream, 4, alpha=0.01, seed=2, by="skill")

    # Assert: the parser's question type is the label: each type sits at one client,
    # and (one label per type, not one for all) the two types at different clients
    holders = []
    for prefix in ("s", "c"):
        held = [
            sum(s.image.startswith(prefix) for s in c.stages[0].train) for c in clients
        ]
        assert max(held) >= 57, (prefix, held)
        holders.append(int(np.argmax(held)))
    assert holders[0] != holders[1]


def test_partition_by_unknown_label_names_the_field() -> None:
    with pytest.raises(ValueError, match="data.partition_by.*'client'"):
        partition_stream(_stream(), 3, 0.5, seed=0, by="client")
