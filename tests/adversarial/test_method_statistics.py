"""One client sends malformed or inflated stage-end statistics of a method's own
(EWC's Fisher, ``asr_conditional``'s per-skill sums): the server drops a malformed
reply, naming why, clips an inflated one to the round's median bound, and merges
the others.

Same harness as ``test_poisoning``: three real ClientApps over the loopback grid and
the run's own server parts; node ``ATTACKER`` rewrites its stage-end reply. Before
these checks a Fisher array of another shape made the server's merge raise, and a
set of conditional sums with another feature size was skipped without a word.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Message

from fed_asr import protocol as P
from fed_asr.methods.asr_conditional import CONDITIONAL
from fed_asr.methods.ewc import FISHER
from fed_asr.schedule import ContinualState, StageEndInputs
from fed_asr.wire import record_arrays
from server.merge_bounds import statistics_norm
from server.records import numpy_record
from server.stage_end import shape_disagreement
from tests.adversarial.test_poisoning import (
    ATTACKER,
    Federation,
    _task_identity,
    federation,
)

__all__ = ["_task_identity", "federation"]  # fixtures shared with test_poisoning
Change = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _rewrite(name: str, change: Change) -> Callable[[Message], None]:
    """A reply hook applying ``change`` to the statistics ``name`` of the reply."""

    def hook(reply: Message) -> None:
        key = P.statistics_record(name)
        arrays = record_arrays(reply.content.array_records[key])
        reply.content[key] = numpy_record(change(dict(arrays)))

    return hook


def _stage_end(fed: Federation) -> StageEndInputs:
    fed.run.ledger.entry(1, 0)
    fed.run.arrays = fed.arrays
    return fed.run.collect_stage_end(0, ContinualState(), True)


def _dropped_reasons(fed: Federation) -> dict[int, str]:
    return {d["node"]: d["reason"] for d in fed.dropped()}


def test_fisher_of_another_shape_is_dropped_and_the_rest_merge(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the attacker's Fisher for one weight loses a row
    fed = federation(method="ewc")
    target: list[str] = []

    def truncate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        target.append(sorted(arrays)[0])
        arrays[target[0]] = arrays[target[0]][1:]
        return arrays

    fed.attack("query", _rewrite(FISHER, truncate))
    # Execute
    inputs = _stage_end(fed)
    merged = fed.run.method.merge_statistics(FISHER, inputs.statistics[FISHER])
    # Assert: named and dropped; the two honest replies merge to the adapter's shapes
    reasons = _dropped_reasons(fed)
    assert list(reasons) == [ATTACKER]
    assert target[0] in reasons[ATTACKER] and "expected" in reasons[ATTACKER]
    assert len(inputs.statistics[FISHER]) == 2
    shapes = {k: tuple(v.shape) for k, v in record_arrays(fed.arrays).items()}
    assert merged is not None
    assert {k: tuple(v.shape) for k, v in merged.items()} == shapes


def test_fisher_missing_a_weight_is_dropped(federation) -> None:  # type: ignore[no-untyped-def]
    fed = federation(method="ewc")

    def drop_one(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays.pop(sorted(arrays)[-1])
        return arrays

    fed.attack("query", _rewrite(FISHER, drop_one))
    inputs = _stage_end(fed)
    reasons = _dropped_reasons(fed)
    assert list(reasons) == [ATTACKER] and "missing" in reasons[ATTACKER]
    assert len(inputs.statistics[FISHER]) == 2


def test_conditional_sums_with_a_lying_count_are_dropped(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: n claims 1e6 samples while G's corner (the same count) says otherwise
    fed = federation(method="asr_conditional")

    def inflate(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = next(k for k in sorted(arrays) if k.endswith("|n"))
        arrays[key] = np.array([1e6])
        return arrays

    fed.attack("query", _rewrite(CONDITIONAL, inflate))
    inputs = _stage_end(fed)
    reasons = _dropped_reasons(fed)
    assert list(reasons) == [ATTACKER] and "corner" in reasons[ATTACKER]
    assert len(inputs.statistics[CONDITIONAL]) == 2


def test_conditional_sums_of_another_feature_size_are_outvoted(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: self-consistent sums over one feature fewer (valid on their own)
    fed = federation(method="asr_conditional")

    def shrink(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in arrays.items():
            part = key.rpartition("|")[2]
            out[key] = (
                value[1:, 1:] if part == "G" else value[1:] if part == "H" else value
            )
        return out

    fed.attack("query", _rewrite(CONDITIONAL, shrink))
    inputs = _stage_end(fed)
    merged = fed.run.method.merge_statistics(
        CONDITIONAL, inputs.statistics[CONDITIONAL]
    )
    reasons = _dropped_reasons(fed)
    assert list(reasons) == [ATTACKER] and "other replies" in reasons[ATTACKER]
    honest = [sums for sums, _ in inputs.statistics[CONDITIONAL]]
    assert merged is not None
    for key, value in merged.items():
        expected = sum(s[key].double() for s in honest if key in s)
        assert torch.allclose(value, expected)


def test_shape_disagreement_refuses_both_sides_of_a_tie() -> None:
    # Two replies, one shape each: the server cannot tell the honest one
    a = {"w": torch.zeros(3)}
    b = {"w": torch.zeros(4)}
    assert "disagree" in (shape_disagreement(a, [a, b]) or "")
    assert "disagree" in (shape_disagreement(b, [a, b]) or "")
    # Three replies: the odd one out is named against the majority's shape
    assert shape_disagreement(a, [a, a, b]) is None
    assert "(4,)" in (shape_disagreement(b, [a, a, b]) or "")


def test_default_merge_divides_each_key_by_the_counts_of_the_replies_carrying_it(
    federation,  # type: ignore[no-untyped-def]
) -> None:
    # A reply without key "b" cannot make the merge raise or dilute "b"
    method = federation(method="vanilla").run.method
    parts = [
        ({"a": torch.tensor([2.0]), "b": torch.tensor([6.0])}, 2),
        ({"a": torch.tensor([4.0])}, 2),
    ]
    merged = method.merge_statistics("any", parts)
    assert merged is not None
    assert merged["a"].item() == 1.5 and merged["b"].item() == 3.0


def _scale(factor: float) -> Change:
    def scale(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v * factor for k, v in arrays.items()}

    return scale


def _fisher_after_a_scaled_reply(fed: Federation) -> tuple[StageEndInputs, dict]:
    fed.attack("query", _rewrite(FISHER, _scale(1e4)))
    inputs = _stage_end(fed)
    merged = fed.run.method.merge_statistics(FISHER, inputs.statistics[FISHER])
    assert merged is not None
    return inputs, merged


def test_a_scaled_fisher_is_clipped_to_the_median_bound_and_recorded(
    federation,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: the attacker multiplies its (well-formed) Fisher by 1e4
    fed = federation(method="ewc")
    factor = fed.cfg.security.norm_bound_factor

    # Execute
    inputs, merged = _fisher_after_a_scaled_reply(fed)

    # Assert: kept (it still counts) but scaled to factor x the honest replies' norm
    norms = [statistics_norm(s, c) for s, c in inputs.statistics[FISHER]]
    assert len(norms) == 3
    honest_max = sorted(norms)[1]  # the lower median of three: the larger honest one
    assert max(norms) == pytest.approx(factor * honest_max, rel=1e-6)
    clipped = fed.run.ledger.last.clipped  # type: ignore[union-attr]
    assert [c["node"] for c in clipped] == [ATTACKER]
    assert "fisher" in clipped[0]["kind"] and clipped[0]["value"] > 1e3 * honest_max
    # The merged Fisher, a count-weighted mean, stays within the bound
    assert statistics_norm(merged, 1) <= factor * honest_max * (1 + 1e-6)


def test_without_the_bound_a_scaled_fisher_dominates_the_merge(
    federation,  # type: ignore[no-untyped-def]
) -> None:
    # The same attack with `security.norm_bound_factor=null`: what the bound prevents
    fed = federation(method="ewc", **{"security.norm_bound_factor": "null"})
    inputs, merged = _fisher_after_a_scaled_reply(fed)
    norms = sorted(statistics_norm(s, c) for s, c in inputs.statistics[FISHER])
    assert statistics_norm(merged, 1) > 100 * norms[1]
    assert fed.run.ledger.last.clipped == []  # type: ignore[union-attr]


def test_a_fisher_count_above_the_site_stage_data_is_refused(
    federation,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a count no honest site can have dilutes everyone's Fisher
    fed = federation(method="ewc")
    claimed = fed.cfg.security.max_num_examples

    def inflate(reply: Message) -> None:
        metrics = reply.content.metric_records[P.METRICS_RECORD]
        metrics[P.statistics_count_key(FISHER)] = claimed

    fed.attack("query", inflate)

    # Execute
    inputs = _stage_end(fed)

    # Assert
    reasons = _dropped_reasons(fed)
    assert list(reasons) == [ATTACKER]
    key = P.statistics_count_key(FISHER)
    assert f"`{key}` = {claimed} exceeds what the client can hold" in reasons[ATTACKER]
    assert len(inputs.statistics[FISHER]) == 2
