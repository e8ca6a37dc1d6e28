"""One client poisons the merges: statistics, adapter weight and update, evaluation.

Three real ClientApps over the in-process loopback grid (Flower's protobuf on the
wire). The server side is the run's own: ``FederatedRun`` builds the FedASR strategy
and the stage-end round exactly as a run does (reply guard included), and the tests
drive one round of each through them. Node ``ATTACKER`` rewrites its own replies
(``grid.on_reply``) into ones that pass the structural checks; each test measures
what the attack did to the merged result.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable

import numpy as np
import pytest
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Message

from clients.app import make_client_app
from clients.site import site_from_context
from clients.testing import LoopbackGrid, node_contexts
from fed_asr import protocol as P
from fed_asr.config import compose_config
from fed_asr.methods import StageEndPlan
from fed_asr.models import adapter_state
from fed_asr.schedule import update_spectrum
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays
from server.records import numpy_record
from server.run import FederatedRun

RUN_ID = 7
NODES = (1000, 1001, 1002)
ATTACKER = NODES[0]
Hook = Callable[[Message], None]  # rewrites the attacker's reply content in place


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(RUN_ID)


class Federation:
    """Three nodes, the run's server parts, and the attacker's reply rewriting."""

    def __init__(self, overrides: list[str], engine: str = "simulation") -> None:
        self.cfg = compose_config("config", overrides)
        run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        contexts = node_contexts(run_config, len(NODES), RUN_ID, first_node=NODES[0])
        app = make_client_app()
        self.grid = LoopbackGrid({n: app for n in NODES}, contexts, RUN_ID)
        self.run = FederatedRun(self.cfg, self.grid, engine=engine)
        site = site_from_context(run_config, contexts[ATTACKER].node_config)
        self.skills = site.stream.skills
        self.arrays = ArrayRecord(torch_state_dict=adapter_state(site.model))

    def attack(self, kind: str, hook: Hook) -> None:
        """Let ``hook`` rewrite the attacker's replies to messages of ``kind``."""

        def on_reply(node: int, msg: Message, reply: Message) -> Message:
            if node == ATTACKER and msg.metadata.message_type.startswith(kind):
                hook(reply)
            return reply

        self.grid.on_reply = on_reply

    def stage_end_spectrum(self) -> SkillSpectrum | None:
        """The stage-0 end round of the run, merged as the run merges it."""
        self.run.ledger.entry(1, 0)
        inputs = self.run.stage_end_round.run(
            self.arrays, 0, StageEndPlan(spectrum="shared"), 1
        )
        spectrum = self.cfg.spectrum
        return update_spectrum(
            None, inputs.spectrum_parts, spectrum, self.cfg.regularizer.cov_floor
        )

    def train_round(self) -> dict[str, np.ndarray]:
        """One train round through the run's strategy; the merged adapter."""
        strategy = self.run.strategy
        strategy.begin_round(0, 1, None, {})
        messages = strategy.configure_train(1, self.arrays, ConfigRecord(), self.grid)
        replies = self.grid.send_and_receive(messages)
        merged, _ = strategy.aggregate_train(1, replies)
        assert merged is not None
        return record_arrays(merged)

    def evaluate_round(self) -> dict[str, float]:
        """One more evaluation round through the run's strategy; pooled accuracy."""
        strategy = self.run.strategy
        strategy.begin_round(0, len(self.run.ledger.rounds) + 1, None, {})
        messages = strategy.configure_evaluate(
            1, self.arrays, ConfigRecord(), self.grid
        )
        replies = self.grid.send_and_receive(messages)
        strategy.aggregate_evaluate(1, replies)
        return self.run.ledger.rounds[-1].accuracy

    def dropped(self) -> list[dict]:
        """Drops recorded in the run's ledger."""
        return [d for r in self.run.ledger.rounds for d in r.dropped]


@pytest.fixture
def federation(run_overrides):  # type: ignore[no-untyped-def]
    def make(engine: str = "simulation", **extra: object) -> Federation:
        overrides = run_overrides("poison", **{"federation.num_clients": 3, **extra})
        return Federation(overrides, engine)

    return make


def _stats(reply: Message) -> dict[str, np.ndarray]:
    return record_arrays(reply.content.array_records[P.STATS_RECORD])


def _set_stats(reply: Message, stats: dict[str, np.ndarray]) -> None:
    reply.content[P.STATS_RECORD] = numpy_record(stats)


def _assert_bounded(fed: Federation, spectrum: SkillSpectrum | None) -> None:
    """The merged prototypes are ones honest descriptors can give (storable).

    By hand: every descriptor entry is at most max(M, M^2 / 4, pi^2) in magnitude
    (anisotropy, its variance, theta's variance), so is a prototype mean, and a
    variance at most its square.
    """
    m = fed.cfg.regularizer.n_angular
    largest = max(m, m * m / 4, math.pi**2)
    assert spectrum is not None
    assert float(spectrum.mean.abs().max()) <= largest
    assert float(spectrum.var.max()) <= largest**2


def _attacked_row(stats: dict[str, np.ndarray]) -> int:
    return int(np.argmax(stats["count"]))  # a skill the attacker holds samples of


# -- statistics ------------------------------------------------------------------------
def test_stage_end_refuses_mean_1e40_with_variance_0(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one sample of a skill at 1e40 in every feature (self-consistent: var 0)
    fed = federation()

    def poison(reply: Message) -> None:
        stats = _stats(reply)
        s = _attacked_row(stats)
        stats["count"][s] = 1.0
        stats["sum"][s] = 1e40
        stats["sumsq"][s] = 1e80
        stats["angular_sum"][s] = stats["angular_sum"][s] / max(
            stats["angular_sum"][s].sum(), 1.0
        )
        _set_stats(reply, stats)

    fed.attack("query", poison)
    # Execute
    spectrum = fed.stage_end_spectrum()
    # Assert: the part is refused and named; the spectrum stays in range
    dropped = fed.dropped()
    assert [d["node"] for d in dropped] == [ATTACKER]
    assert "outside" in dropped[0]["reason"]
    _assert_bounded(fed, spectrum)


def test_stage_end_refuses_count_zero_rows_with_sumsq_1e30(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a skill row with no sample but an enormous sum of squares
    fed = federation()

    def poison(reply: Message) -> None:
        stats = _stats(reply)
        s = _attacked_row(stats)
        for name in stats:
            stats[name][s] = 0.0
        stats["sumsq"][s] = 1e30
        _set_stats(reply, stats)

    fed.attack("query", poison)
    # Execute
    spectrum = fed.stage_end_spectrum()
    # Assert
    dropped = fed.dropped()
    assert [d["node"] for d in dropped] == [ATTACKER]
    assert "count 0" in dropped[0]["reason"]
    _assert_bounded(fed, spectrum)


@pytest.mark.parametrize("lie", ["count", "sum"])
def test_stage_end_refuses_dp_statistics_beyond_count_and_noise_bounds(
    federation, lie: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: DP on (statistics noised, in clear); count 5e6 with num-examples 5,
    # or sums of +-1e200
    fed = federation(**{"privacy.dp": "true", "privacy.dp_seed": 1})

    def poison(reply: Message) -> None:
        stats = _stats(reply)
        if lie == "count":
            stats["count"][0] = 5e6
            reply.content.metric_records[P.METRICS_RECORD][P.NUM_EXAMPLES_KEY] = 5
        else:
            stats["sum"][0, 0], stats["sum"][-1, -1] = 1e200, -1e200
        _set_stats(reply, stats)

    fed.attack("query", poison)
    # Execute
    fed.stage_end_spectrum()
    # Assert
    dropped = fed.dropped()
    assert [d["node"] for d in dropped] == [ATTACKER]
    assert f"`{lie}`" in dropped[0]["reason"]


def test_stage_end_refuses_statistics_of_another_skill_order(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a site whose skill list is the run's reversed (honest rows, own order)
    fed = federation()

    def reorder(reply: Message) -> None:
        stats = {k: v[::-1].copy() for k, v in _stats(reply).items()}
        _set_stats(reply, stats)
        config = reply.content.config_records.get(P.CONFIG_RECORD, {})
        for key, value in config.items():  # the skill names sent with the rows
            if value == list(fed.skills):
                config[key] = list(reversed(fed.skills))

    fed.attack("query", reorder)
    # Execute
    fed.stage_end_spectrum()
    # Assert: refused, the reason names both skill lists
    dropped = fed.dropped()
    assert [d["node"] for d in dropped] == [ATTACKER]
    assert str(list(fed.skills)) in dropped[0]["reason"]
    assert str(list(reversed(fed.skills))) in dropped[0]["reason"]


# -- adapter merge -------------------------------------------------------------------
def _norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def _poisoner(fed: Federation, examples: int | None) -> dict[str, np.ndarray]:
    """Attack train replies with an update of norm 999 (and ``examples``)."""
    sent = record_arrays(fed.arrays)
    rng = np.random.default_rng(0)
    direction = {k: rng.standard_normal(v.shape) for k, v in sent.items()}
    length = _norm(direction, {k: np.zeros_like(v) for k, v in direction.items()})
    target = {
        k: (v + 999.0 * direction[k] / length).astype(v.dtype) for k, v in sent.items()
    }

    def poison(reply: Message) -> None:
        reply.content[P.ARRAYS_RECORD] = numpy_record(target)
        if examples is not None:
            metrics = reply.content.metric_records[P.METRICS_RECORD]
            metrics[P.NUM_EXAMPLES_KEY] = examples

    fed.attack("train", poison)
    return target


@pytest.mark.parametrize("engine", ["simulation", "deployment"])
def test_reply_claiming_1e7_examples_cannot_pull_the_adapter_to_its_own(
    federation, engine: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: defaults (max_num_examples 1e7, max_update_norm 1e3 let it through)
    fed = federation(engine, **{"train.max_steps_per_stage": 2})
    target = _poisoner(fed, examples=10**7)
    sent = record_arrays(fed.arrays)
    # Execute
    merged = fed.train_round()
    # Assert: the merge stays near the sent adapter, far from the attacker's.
    # Simulation: the claim exceeds the partition and is refused; deployment: the
    # update is clipped to norm_bound_factor x the round's median norm.
    assert _norm(merged, target) > 990.0
    assert _norm(merged, sent) < 2.0
    entry = fed.run.ledger.rounds[-1]
    noted = entry.dropped if engine == "simulation" else entry.clipped
    assert [d["node"] for d in noted] == [ATTACKER]


def test_fedmedian_resists_an_update_of_norm_999(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the robust inner strategy alone (FedASR's own clipping off)
    fed = federation(
        **{
            "federation.strategy": "fedmedian",
            "security.norm_bound_factor": "null",
            "train.max_steps_per_stage": 2,
        }
    )
    target = _poisoner(fed, examples=None)
    sent = record_arrays(fed.arrays)
    # Execute
    merged = fed.train_round()
    # Assert: the coordinate-wise median of three ignores the one outlier
    assert fed.run.ledger.rounds[-1].clipped == []
    assert _norm(merged, target) > 990.0
    assert _norm(merged, sent) < 2.0


# -- evaluation ----------------------------------------------------------------------
def _lie_perfect(scale: int) -> Hook:
    """Report every question correct, the totals multiplied by ``scale``."""

    def lie(reply: Message) -> None:
        metrics = reply.content.metric_records[P.METRICS_RECORD]
        totals = {k: int(v) for k, v in metrics.items() if k.startswith(P.TOTAL_PREFIX)}
        for key in list(metrics):
            if key.startswith(P.CORRECT_PREFIX):
                rest = key[len(P.CORRECT_PREFIX) :].split("-")
                digits = [i for i, part in enumerate(rest) if part.isdigit()]
                total_key = P.TOTAL_PREFIX + "-".join(rest[digits[0] :])
                metrics[key] = totals[total_key] * scale
        for key, value in totals.items():
            metrics[key] = value * scale

    return lie


def test_lying_evaluation_reply_is_flagged_or_dropped_never_pooled_to_1(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: enough test questions per client for an accuracy to mean something
    fed = federation(**{"data.max_test_per_stage": 60})
    honest = fed.evaluate_round()["0"]
    # Execute: all correct with totals x 10^5, then within its test split
    fed.attack("evaluate", _lie_perfect(10**5))
    inflated = fed.evaluate_round()
    dropped = fed.run.ledger.rounds[-1].dropped
    fed.attack("evaluate", _lie_perfect(1))
    within = fed.evaluate_round()
    last = fed.run.ledger.rounds[-1]
    # Assert: the inflated lie is dropped, the bounded one flagged (only the liar);
    # pooled accuracy is never the liar's 1.0
    assert honest < 0.9
    assert inflated["0"] == pytest.approx(honest)
    assert [d["node"] for d in dropped] == [ATTACKER]
    assert "test split" in dropped[0]["reason"]
    assert within["0"] < 1.0
    assert [f["node"] for f in last.flagged] == [ATTACKER]
    assert last.flagged[0]["accuracy"] == 1.0
