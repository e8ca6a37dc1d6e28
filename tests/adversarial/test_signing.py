"""A relay without the signing key attacks the server's messages to verifying nodes.

Three ClientApps verify the server's key over the in-process loopback grid (Flower's
protobuf on the wire, each node keeps its own ``context.state``). The server side is
the real one: FedASR's train/evaluate messages, the stage-end query and the
secure-aggregation steps, each signed where the server signs. The relay sees every
delivered message (``grid.drop``) and may replay, redirect, alter or forge them.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.app import make_client_app
from clients.site import site_from_context
from clients.testing import LoopbackGrid, node_contexts
from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import compose_config
from fed_asr.methods import StageEndPlan
from fed_asr.models import adapter_state
from fed_asr.security.signing import generate_signing_key, save_public_key
from server.adapter_strategies import build_adapter_strategy
from server.ledger import RoundLedger, RoundLog
from server.secure_spectrum import SecureSpectrumRound
from server.stage_end import StageEndRound
from server.strategy import FedASR

RUN_ID = 7
NODES = (1000, 1001, 1002)
VICTIM, OTHER = NODES[0], NODES[1]
SECAGG = f"query.{P.SECAGG_ACTION}"
KINDS = ("train", "evaluate", f"query.{P.SPECTRUM_ACTION}", SECAGG)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(RUN_ID)


class SignedFederation:
    """Three verifying nodes, the signing server's parts, and a capturing relay."""

    def __init__(self, overrides: list[str], tmp_path: Path) -> None:
        key = generate_signing_key()
        save_public_key(key.public_key(), tmp_path / "signing.pub")
        self.cfg = compose_config("config", overrides)
        run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        verify = {P.NODE_VERIFY_KEY: str(tmp_path / "signing.pub")}
        self.contexts = node_contexts(
            run_config, len(NODES), RUN_ID, lambda p: verify, first_node=NODES[0]
        )
        app = make_client_app()
        self.grid = LoopbackGrid({n: app for n in NODES}, self.contexts, RUN_ID)
        self.delivered: list[Message] = []  # each node's copy, as it arrived
        self.only: set[int] = set(NODES)  # nodes the relay lets messages through to
        self.grid.drop = self._relay
        lora = get_lora_aggregation(self.cfg.lora.aggregation)
        self.strategy = FedASR(
            build_adapter_strategy(self.cfg.federation, lora),
            ledger=RoundLedger([RoundLog(round=1, stage=0)]),
            signing_key=key,
        )
        site = site_from_context(run_config, self.contexts[VICTIM].node_config)
        self.skills = site.stream.skills
        self.arrays = ArrayRecord(torch_state_dict=adapter_state(site.model))
        self.round = 0

    def _relay(self, node: int, msg: Message) -> bool:
        self.delivered.append(msg)
        return node not in self.only

    def sign(self, content: RecordDict, message_type: str, *node: int) -> None:
        """The run's signing hook (``FederatedRun._sign``), given the destination.

        Takes the node variadically so the same test drives a server that does not
        name the destination (today's main) and shows the attack succeed there.
        """
        self.strategy.sign_content(content, self.grid, message_type, *node)

    def exchange(self, kind: str, nodes: tuple[int, ...] = (VICTIM,)) -> list[Message]:
        """The server's messages of ``kind`` in a new round; replies of ``nodes``."""
        self.round += 1
        self.strategy.begin_round(0, self.round, None, {})
        self.only = set(nodes)
        try:
            if kind in ("train", "evaluate"):
                configure = getattr(self.strategy, f"configure_{kind}")
                messages = configure(1, self.arrays, ConfigRecord(), self.grid)
                return list(self.grid.send_and_receive(messages))
            if kind == SECAGG:
                secure = SecureSpectrumRound(
                    self.grid,
                    self.cfg.privacy,
                    f"{RUN_ID}/0/{self.round}",
                    60.0,
                    self.sign,
                    skills=tuple(self.skills),
                )
                secure.run(self.arrays, 0, 10**6)
                return []
            ledger = RoundLedger([RoundLog(round=self.round, stage=0)])
            stage_end = StageEndRound(
                self.grid,
                self.skills,
                self.cfg.privacy,
                self.cfg.security,
                ledger,
                self.sign,
                60.0,
            )
            stage_end.run(self.arrays, 0, StageEndPlan(spectrum="shared"), self.round)
            return []
        finally:
            self.only = set(NODES)

    def captured(self, kind: str, node: int = VICTIM) -> list[Message]:
        """The messages of ``kind`` that reached ``node`` so far, in order."""
        return [
            m
            for m in self.delivered
            if m.metadata.dst_node_id == node and m.metadata.message_type == kind
        ]

    def send(self, content: RecordDict, kind: str, node: int) -> Message:
        """The relay delivers ``content`` as a ``kind`` message to ``node``."""
        msg = Message(content=content, dst_node_id=node, message_type=kind)
        (reply,) = self.grid.send_and_receive([msg])
        return reply

    def state(self, node: int = VICTIM) -> dict[str, object]:
        """Everything ``node`` keeps in its ``context.state``, by value."""
        state: dict[str, object] = {}
        for name, record in self.contexts[node].state.items():
            if isinstance(record, ArrayRecord):
                state[name] = {k: bytes(a.data) for k, a in record.items()}
            else:
                state[name] = dict(record)  # type: ignore[call-overload]
        return state

    def still_accepts(self, node: int = VICTIM) -> bool:
        """A later legitimate message is accepted by ``node``."""
        (reply,) = self.exchange("evaluate", (node,))
        return not reply.has_error()


@pytest.fixture
def fed(run_overrides, tmp_path: Path) -> SignedFederation:  # type: ignore[no-untyped-def]
    return SignedFederation(
        run_overrides("adv", **{"federation.num_clients": len(NODES)}), tmp_path
    )


def _copy(content: RecordDict) -> RecordDict:
    return RecordDict(
        {
            name: ConfigRecord(dict(r)) if isinstance(r, ConfigRecord) else r  # type: ignore[call-overload]
            for name, r in content.items()
        }
    )


def _bare_round(content: RecordDict) -> RecordDict:
    """The relay's forgery: the records kept, a signature record with a huge round."""
    forged = _copy(content)
    forged[P.SIGNATURE_RECORD] = ConfigRecord({P.SIGNATURE_ROUND_KEY: 10**9})
    return forged


def _unsigned(content: RecordDict) -> RecordDict:
    stripped = _copy(content)
    del stripped[P.SIGNATURE_RECORD]
    return stripped


def _config_edited(content: RecordDict) -> RecordDict:
    """The server's signature kept, one config value added by the relay."""
    edited = _copy(content)
    edited[P.CONFIG_RECORD]["relay"] = 1  # type: ignore[index]
    return edited


# -- replay ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_replayed_message_of_every_type_is_refused_without_state_change(
    fed: SignedFederation, kind: str
) -> None:
    # Prepare: the server's legitimate exchange reached the victim (secure
    # aggregation needs all three nodes)
    fed.exchange(kind, NODES if kind == SECAGG else (VICTIM,))
    first = fed.captured(kind)[0]
    before = fed.state()
    # Execute: the relay delivers the same signed message again
    reply = fed.send(first.content, kind, VICTIM)
    # Assert: refused as a replay; nothing changed; the node is not locked out
    assert reply.has_error() and "replayed" in reply.error.reason
    assert fed.state() == before
    assert fed.still_accepts()


def test_each_replayed_secure_aggregation_step_is_refused(
    fed: SignedFederation,
) -> None:
    # Prepare: a full secure session; the relay kept every step sent to the victim
    fed.exchange(SECAGG, NODES)
    steps = fed.captured(SECAGG)
    before = fed.state()
    # Execute: each step (advertise, share, mask, ..., unmask) delivered again
    replies = [fed.send(m.content, SECAGG, VICTIM) for m in steps]
    # Assert
    names = [str(m.content[P.CONFIG_RECORD][P.SECAGG_STEP_KEY]) for m in steps]
    assert names[0] == P.SECAGG_ADVERTISE and names[-1] == P.SECAGG_UNMASK
    assert all(r.has_error() and "replayed" in r.error.reason for r in replies)
    assert fed.state() == before


# -- forgery by a relay without the key ------------------------------------------------
@pytest.mark.parametrize("forge", [_bare_round, _unsigned, _config_edited])
@pytest.mark.parametrize("kind", KINDS)
def test_forged_or_unsigned_message_of_every_type_is_refused_without_state_change(
    fed: SignedFederation, kind: str, forge
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: every message of the kind the relay saw, re-sent without a valid
    # signature (every step for secure aggregation)
    fed.exchange(kind, NODES if kind == SECAGG else (VICTIM,))
    before = fed.state()
    # Execute
    replies = [fed.send(forge(m.content), kind, VICTIM) for m in fed.captured(kind)]
    # Assert
    assert replies and all(r.has_error() for r in replies)
    assert all("ignature" in r.error.reason for r in replies)
    assert fed.state() == before
    assert fed.still_accepts()


def test_forged_round_1e9_on_a_secure_step_does_not_lock_the_node_out(
    fed: SignedFederation,
) -> None:
    # Prepare: the relay's own key book for the share step, under a bare huge round
    fed.exchange("evaluate")
    book = ConfigRecord(
        {"ids": [str(VICTIM)], "mask-pks": [b"\x01" * 32], "enc-pks": [b"\x02" * 32]}
    )
    config = ConfigRecord(
        {
            P.SECAGG_STEP_KEY: P.SECAGG_SHARE,
            P.SECAGG_SESSION_KEY: "relay",
            P.SECAGG_THRESHOLD_KEY: 1,
            P.SECAGG_BITS_KEY: 62,
            P.SECAGG_SCALE_KEY: 1.0,
        }
    )
    content = RecordDict(
        {
            P.CONFIG_RECORD: config,
            P.SECAGG_RECORD: book,
            P.SIGNATURE_RECORD: ConfigRecord({P.SIGNATURE_ROUND_KEY: 10**9}),
        }
    )
    before = fed.state()
    # Execute
    reply = fed.send(content, SECAGG, VICTIM)
    # Assert: refused for its signature; every later legitimate message accepted
    assert reply.has_error() and "ignature" in reply.error.reason
    assert fed.state() == before
    assert fed.still_accepts() and fed.still_accepts()


def test_forged_advertise_without_adapter_starts_no_secure_session(
    fed: SignedFederation,
) -> None:
    # Prepare: step 0 of the relay's own protocol run (no adapter, so no array the
    # server would have signed), under a bare round
    config = ConfigRecord(
        {
            P.SECAGG_STEP_KEY: P.SECAGG_ADVERTISE,
            P.SECAGG_SESSION_KEY: "relay",
            P.SECAGG_THRESHOLD_KEY: 2,
            P.SECAGG_BITS_KEY: 62,
            P.SECAGG_SCALE_KEY: 2.0**16,
            P.STAGE_KEY: 0,
        }
    )
    content = RecordDict(
        {
            P.CONFIG_RECORD: config,
            P.SIGNATURE_RECORD: ConfigRecord({P.SIGNATURE_ROUND_KEY: 10**9}),
        }
    )
    # Execute
    reply = fed.send(content, SECAGG, VICTIM)
    # Assert: no statistics computed, no protocol secrets kept
    assert reply.has_error() and "ignature" in reply.error.reason
    assert fed.state() == {}


# -- tampering and redirection ---------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [("local-epochs", 3), (P.STAGE_KEY, 1), ("beta", 1e6), (P.GLOBAL_ROUND_KEY, 99)],
)
def test_train_config_changed_in_transit_is_refused(
    fed: SignedFederation, key: str, value: object
) -> None:
    # Prepare: the relay edits the victim's copy of the train config
    def tamper(node: int, msg: Message) -> bool:
        if node == VICTIM and msg.metadata.message_type == "train":
            msg.content[P.CONFIG_RECORD][key] = value  # type: ignore[index]
        return node != VICTIM

    fed.grid.drop = tamper
    # Execute
    (reply,) = fed.exchange("train")
    # Assert
    assert reply.has_error() and "Signature check failed" in reply.error.reason
    assert fed.state() == {}


@pytest.mark.parametrize("kind", KINDS)
def test_message_signed_for_one_node_is_refused_by_another(
    fed: SignedFederation, kind: str
) -> None:
    # Prepare: messages signed for the victim; the other node's state before
    fed.exchange(kind, NODES if kind == SECAGG else (VICTIM,))
    before = fed.state(OTHER)
    # Execute: the relay hands the victim's messages to the other node
    replies = [fed.send(m.content, kind, OTHER) for m in fed.captured(kind)]
    # Assert
    assert replies and all(
        r.has_error() and "Signature check failed" in r.error.reason for r in replies
    )
    assert fed.state(OTHER) == before
    assert fed.still_accepts(OTHER)


def test_message_redelivered_as_another_type_is_refused(fed: SignedFederation) -> None:
    # Prepare: a signed stage-end query (adapter and stage) for the victim
    fed.exchange(f"query.{P.SPECTRUM_ACTION}")
    (query,) = fed.captured(f"query.{P.SPECTRUM_ACTION}")
    before = fed.state()
    # Execute: the relay delivers it as the advertise step's type
    reply = fed.send(query.content, SECAGG, VICTIM)
    # Assert
    assert reply.has_error() and "Signature check failed" in reply.error.reason
    assert fed.state() == before


def test_several_messages_of_one_round_are_all_accepted_in_order(
    fed: SignedFederation,
) -> None:
    # Prepare: evaluate and every secure step in one server round, as a run
    # sends them at a stage end
    fed.strategy.begin_round(0, 1, None, {})
    privacy = dataclasses.replace(fed.cfg.privacy, secure_spectrum=True)
    secure = SecureSpectrumRound(
        fed.grid, privacy, f"{RUN_ID}/0/1", 60.0, fed.sign, skills=tuple(fed.skills)
    )
    # Execute
    evaluate = fed.strategy.configure_evaluate(1, fed.arrays, ConfigRecord(), fed.grid)
    replies = list(fed.grid.send_and_receive(evaluate))
    result = secure.run(fed.arrays, 0, 10**6)
    # Assert: several messages per node in the one round, all accepted in order
    assert not any(r.has_error() for r in replies)
    assert sorted(result.contributors) == list(NODES) and not result.dropped
