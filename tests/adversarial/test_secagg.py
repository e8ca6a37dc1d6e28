"""A malicious server against secure aggregation, through the real ClientApps.

Every attack runs the real ``SecureSpectrumRound`` over the in-process
``LoopbackGrid`` (protobuf on the wire, one ``Context`` per node). The server's lies
are hooks on the grid that rewrite one node's copy of a message or one reply; what
the attacker then holds is fed to the same reconstruction the honest server uses.
Each test fails on a main without site identities, the consistency check,
client-owned thresholds and the strict fixed-point bound: there the attack works.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import make_client_app
from clients.secure import stage_statistics
from clients.site import site_from_context
from clients.testing import LoopbackGrid
from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig, compose_config
from fed_asr.models import adapter_state, load_adapter_state
from fed_asr.security.dp import calibrate_stats_noise, max_skills_per_sample
from fed_asr.security.secagg import (
    ArrayLayout,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
    pairwise_mask,
    prg_mask,
    share_points,
    unflatten_arrays,
)
from fed_asr.security.secagg.encoding import derive_key, id_bytes, modulus_mask
from fed_asr.security.shamir import reconstruct_bytes
from fed_asr.wire import record_arrays
from server.secure_spectrum import SecureSpectrumRound

SESSION = "7/0/1"
SHARE = 48  # bytes of one encoded Shamir share of a 32-byte secret
CONFIRM_STEP = "confirm"  # the consistency-check step (absent before it existed)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def write_site_identities(folder: Path, count: int) -> list[dict[str, str]]:
    """Identity keys and the pinned list (docs/security.md format); node configs."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = {}
    configs = []
    for i in range(count):
        key = Ed25519PrivateKey.from_private_bytes(bytes([i + 7]) * 32)
        path = folder / f"site-{i}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        sites[f"site-{i}"] = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode()
        )
        configs.append({"identity-key": str(path)})
    pinned = folder / "site-keys.json"
    pinned.write_text(json.dumps({"format": "fed-asr/site-keys/v1", "sites": sites}))
    return [{**c, "site-keys": str(pinned)} for c in configs]


class Federation:
    """``n`` ClientApps with site identities over a loopback grid (ids 1000...)."""

    def __init__(self, overrides: list[str], n: int, keys: Path) -> None:
        self.cfg: ExperimentConfig = compose_config("config", overrides)
        self.run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        self.n = n
        identities = write_site_identities(keys, n)
        self.nodes = {1000 + p: p for p in range(n)}
        contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={
                    P.NODE_PARTITION_ID: p,
                    P.NODE_NUM_PARTITIONS: n,
                    **identities[p],
                },
                state=RecordDict(),
                run_config=self.run_config,
            )
            for node, p in self.nodes.items()
        }
        app = make_client_app()
        self.grid = LoopbackGrid({node: app for node in self.nodes}, contexts)
        site = self.site(0)
        self.arrays = ArrayRecord(torch_state_dict=adapter_state(site.model))

    def site(self, partition: int):  # type: ignore[no-untyped-def]
        return site_from_context(
            self.run_config,
            {P.NODE_PARTITION_ID: partition, P.NODE_NUM_PARTITIONS: self.n},
        )

    def stats(self, node: int) -> dict[str, np.ndarray]:
        """A node's true (clipped, un-noised) statistics of stage 0."""
        site = self.site(self.nodes[node])
        load_adapter_state(site.model, self.arrays.to_torch_state_dict())
        return stage_statistics(site, 0).to_arrays()

    def run(self, session: str = SESSION, **privacy: object):  # type: ignore[no-untyped-def]
        """The server's secure round of stage 0, ``privacy`` overriding the run's."""
        round_ = SecureSpectrumRound(
            self.grid,
            dataclasses.replace(self.cfg.privacy, **privacy),  # type: ignore[arg-type]
            session,
            60.0,
            skills=tuple(self.site(0).stream.skills),
        )
        return round_.run(self.arrays, 0, 10**6)


@pytest.fixture
def federation(run_overrides, tmp_path):  # type: ignore[no-untyped-def]
    def make(n: int = 3, **extra: object) -> Federation:
        overrides = run_overrides(
            "adv",
            **{"federation.num_clients": n, "privacy.secure_spectrum": "true", **extra},
        )
        return Federation(overrides, n, tmp_path / "keys")

    return make


def step_of(msg: Message) -> str:
    config = msg.content.config_records.get(P.CONFIG_RECORD, ConfigRecord())
    return str(config.get(P.SECAGG_STEP_KEY, ""))


def recorder(store: dict[tuple[str, int], Message]) -> Callable:
    """An ``on_reply`` hook that keeps every reply by (step, node)."""

    def hook(node: int, msg: Message, reply: Message) -> Message:
        store[(step_of(msg), node)] = reply
        return reply

    return hook


# -- key substitution ------------------------------------------------------------------
def test_key_substitution_by_the_server_is_refused_before_any_share_leaves(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the server shows the victim a key book whose other entries carry keys
    # the server made, to decrypt the victim's shares of its seed and mask key
    fed = federation()
    victim = 1000
    others = [n for n in fed.nodes if n != victim]
    fake = {
        key: {n: X25519PrivateKey.generate() for n in others}
        for key in ("mask-pks", "enc-pks")
    }
    replies: dict[tuple[str, int], Message] = {}

    def substitute(node: int, msg: Message) -> bool:
        if node == victim and step_of(msg) == P.SECAGG_SHARE:
            book = msg.content.config_records[P.SECAGG_RECORD]
            ids = [int(i) for i in book["ids"]]  # type: ignore[union-attr]
            for key, keys in fake.items():
                book[key] = [
                    keys[i].public_key().public_bytes_raw() if i in keys else pk
                    for i, pk in zip(ids, book[key], strict=True)  # type: ignore[arg-type]
                ]
        return False

    fed.grid.drop = substitute
    fed.grid.on_reply = recorder(replies)

    # Execute
    result = fed.run()

    # Assert: the victim refused, naming a substituted node; the attacker decrypts
    # nothing; the round completed without the victim
    reply = replies[(P.SECAGG_SHARE, victim)]
    recovered = _decrypt_mask_key(reply, replies, victim, fake["enc-pks"], 2)
    assert recovered is None, "the server recovered the victim's mask key"
    assert reply.has_error()
    assert "refused" in reply.error.reason and "1001" in reply.error.reason
    assert sorted(result.contributors) == [1001, 1002]


def _decrypt_mask_key(
    reply: Message,
    replies: dict[tuple[str, int], Message],
    victim: int,
    fake: dict[int, X25519PrivateKey],
    threshold: int,
) -> bytes | None:
    """What the server learns: the victim's mask private key, if its shares decrypt."""
    if reply.has_error():
        return None
    record = reply.content.config_records[P.SECAGG_RECORD]
    outbox = dict(
        zip(
            (int(r) for r in record["recipients"]),  # type: ignore[union-attr]
            (bytes(c) for c in record["ciphertexts"]),  # type: ignore[union-attr]
            strict=True,
        )
    )
    advert = replies[(P.SECAGG_ADVERTISE, victim)].content.config_records
    victim_enc = X25519PublicKey.from_public_bytes(
        bytes(advert[P.SECAGG_RECORD]["enc-pk"])  # type: ignore[arg-type]
    )
    points = share_points(sorted([victim, *fake]))
    key_shares = {}
    for peer, blob in outbox.items():
        secret = fake[peer].exchange(victim_enc)
        aes = AESGCM(derive_key(secret, b"share-key", SESSION.encode(), victim, peer))
        aad = b"share" + SESSION.encode() + id_bytes(victim) + id_bytes(peer)
        plain = aes.decrypt(blob[:12], blob[12:], aad)
        key_shares[points[peer]] = plain[16 + SHARE :]
    key = reconstruct_bytes(key_shares, threshold, 32)
    mask_pk = bytes(advert[P.SECAGG_RECORD]["mask-pk"])  # type: ignore[arg-type]
    public = X25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    return key if public == mask_pk else None


# -- lying about dropouts ------------------------------------------------------------
def test_different_survivor_sets_for_different_clients_are_caught(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 5 sites, threshold 2. The server tells {1000, 1001, 1004} that all
    # three survived and {1002, 1003} that 1004 dropped, to collect both the shares
    # of 1004's self-mask seed (from the first group) and of its mask key (from the
    # second), and forwards to each group only its own group's signatures
    fed = federation(n=5, **{"privacy.secagg_threshold": 0.4})
    victim = 1004
    first, second = (1000, 1001, 1004), (1002, 1003)
    replies: dict[tuple[str, int], Message] = {}

    def lie(node: int, msg: Message) -> bool:
        if step_of(msg) in (CONFIRM_STEP, P.SECAGG_UNMASK):
            own, other = (first, second) if node in first else (second, first)
            payload = msg.content.config_records[P.SECAGG_RECORD]
            payload["survivors"] = [str(s) for s in own]
            payload["dropped"] = [str(d) for d in other]
            if "signers" in payload:
                signed = zip(payload["signers"], payload["signatures"], strict=True)  # type: ignore[arg-type]
                pairs = [(s, sig) for s, sig in signed if int(s) in own]
                payload["signers"] = [s for s, _ in pairs]
                payload["signatures"] = [sig for _, sig in pairs]
        return False

    fed.grid.drop = lie
    fed.grid.on_reply = recorder(replies)

    # Execute
    fed.run()

    # Assert: the minority group refuses; the server cannot unmask the victim
    leaked = _unmask_victim(replies, victim, sorted(fed.nodes), threshold=2)
    if leaked is not None:
        truth = fed.stats(victim)
        exact = all(np.allclose(leaked[k], truth[k], atol=1e-5) for k in truth)
        pytest.fail(f"the server unmasked node {victim}'s input (exact: {exact})")
    for node in second:
        reply = replies[(P.SECAGG_UNMASK, node)]
        assert reply.has_error() and "confirmed the survivor set" in reply.error.reason


def _unmask_victim(
    replies: dict[tuple[str, int], Message],
    victim: int,
    ids: list[int],
    threshold: int,
) -> dict[str, np.ndarray] | None:
    """The victim's input, from its masked vector and any t shares of b and s_sk."""
    seed_shares, key_shares = {}, {}
    points = share_points(ids)
    for node in ids:
        reply = replies.get((P.SECAGG_UNMASK, node))
        if reply is None or reply.has_error():
            continue
        record = reply.content.config_records[P.SECAGG_RECORD]
        seeds = dict(zip(record["seed-owners"], record["seed-shares"], strict=True))  # type: ignore[arg-type]
        keys = dict(zip(record["key-owners"], record["key-shares"], strict=True))  # type: ignore[arg-type]
        if str(victim) in seeds:
            seed_shares[points[node]] = bytes(seeds[str(victim)])  # type: ignore[arg-type]
        if str(victim) in keys:
            key_shares[points[node]] = bytes(keys[str(victim)])  # type: ignore[arg-type]
    if len(seed_shares) < threshold or len(key_shares) < threshold:
        return None
    seed = reconstruct_bytes(seed_shares, threshold, 32)
    mask_key = X25519PrivateKey.from_private_bytes(
        reconstruct_bytes(key_shares, threshold, 32)
    )
    masked = replies[(P.SECAGG_MASK, victim)].content
    vector = record_arrays(masked.array_records[P.SECAGG_MASKED_RECORD])["vector"]
    layout = ArrayLayout.from_json(
        str(masked.config_records[P.SECAGG_RECORD]["layout"])
    )
    bits, scale = 62, 2.0**24
    value = vector - prg_mask(seed, vector.size, bits)
    for peer in ids:
        if peer == victim:
            continue
        advert = replies[(P.SECAGG_ADVERTISE, peer)].content.config_records
        peer_pk = bytes(advert[P.SECAGG_RECORD]["mask-pk"])  # type: ignore[arg-type]
        value = value - pairwise_mask(
            mask_key, peer_pk, victim, peer, SESSION.encode(), vector.size, bits
        )
    decoded = decode_fixed_point(value & modulus_mask(bits), scale, bits)
    return unflatten_arrays(decoded, layout)


def test_a_second_session_for_the_same_stage_is_refused(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a first, honest round; then the server runs the same stage again and
    # claims node 1002 dropped before masking: the difference would be its input
    fed = federation()
    first = fed.run()
    fed.grid.drop = lambda node, msg: node == 1002 and step_of(msg) == P.SECAGG_MASK

    # Execute
    second = fed.run(session="7/0/2")

    # Assert: nothing leaves the nodes a second time for stage 0
    assert first.arrays is not None
    if second.arrays is not None:
        leaked = first.arrays["sum"] - second.arrays["sum"]
        exact = np.allclose(leaked, fed.stats(1002)["sum"], atol=1e-5)
        pytest.fail(f"the server obtained node 1002's sums by difference ({exact=})")
    refusals = [d for d in second.dropped if d["step"] == P.SECAGG_ADVERTISE]
    assert len(refusals) == 3
    assert all("already sent its masked statistics" in d["reason"] for d in refusals)


# -- invalid keys --------------------------------------------------------------------
def test_zero_key_advertiser_is_dropped_and_the_round_completes(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: node 1002 advertises an all-zero X25519 mask key and otherwise
    # follows the protocol (it is shown its real key back, so it goes on)
    fed = federation()
    expected = {k: fed.stats(1000)[k] + fed.stats(1001)[k] for k in fed.stats(1000)}
    real: dict[str, bytes] = {}

    def zero_key(node: int, msg: Message, reply: Message) -> Message:
        if node == 1002 and step_of(msg) == P.SECAGG_ADVERTISE:
            keys = reply.content.config_records[P.SECAGG_RECORD]
            real["mask-pk"] = bytes(keys["mask-pk"])  # type: ignore[arg-type]
            keys["mask-pk"] = bytes(32)
        return reply

    def own_key_back(node: int, msg: Message) -> bool:
        if node == 1002 and step_of(msg) == P.SECAGG_SHARE:
            book = msg.content.config_records[P.SECAGG_RECORD]
            ids = [int(i) for i in book["ids"]]  # type: ignore[union-attr]
            book["mask-pks"] = [
                real["mask-pk"] if i == 1002 else pk
                for i, pk in zip(ids, book["mask-pks"], strict=True)  # type: ignore[arg-type]
            ]
        return False

    fed.grid.on_reply = zero_key
    fed.grid.drop = own_key_back

    # Execute
    result = fed.run()

    # Assert: the round completed with the two others; 1002 is named and why
    assert result.arrays is not None, result.dropped
    assert sorted(result.contributors) == [1000, 1001]
    (dropped,) = [d for d in result.dropped if d["node"] == 1002]
    assert dropped["step"] == P.SECAGG_ADVERTISE and "low-order" in dropped["reason"]
    for key, value in expected.items():
        np.testing.assert_allclose(result.arrays[key], value, rtol=0, atol=1e-6)


# -- thresholds and the DP noise share -------------------------------------------------
def test_server_threshold_below_the_node_minimum_is_refused(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the sites require t = ceil(0.9 * 3) = 3; the server asks for 2
    fed = federation(**{"privacy.secagg_threshold": 0.9})

    # Execute
    result = fed.run(secagg_threshold=0.5)

    # Assert: every node refused at the first step, nothing was aggregated
    assert result.arrays is None
    refusals = [d for d in result.dropped if d["step"] == P.SECAGG_ADVERTISE]
    assert sorted(d["node"] for d in refusals) == sorted(fed.nodes)
    assert all("below this node's minimum 3" in d["reason"] for d in refusals)


def test_dp_noise_share_comes_from_the_node_own_threshold(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the sites' own minimum is t = ceil(0.6 * 3) = 2; the server asks for
    # t = 3, which would shrink each node's noise share to sigma^2 / 3
    fed = federation(
        **{"privacy.dp": "true", "privacy.dp_seed": 3, "privacy.dp_clip": 10.0}
    )
    clean = {k: sum(fed.stats(n)[k] for n in fed.nodes) for k in ("sum",)}
    m = max_skills_per_sample(
        fed.cfg.regularizer.tau_skill, len(fed.site(0).stream.skills)
    )
    sigma = calibrate_stats_noise(fed.cfg.privacy, m).stds["sum"]

    # Execute
    result = fed.run(secagg_threshold=1.0)

    # Assert: three shares of sigma^2 / 2 each: the sum's noise has std sqrt(3/2) sigma
    assert result.arrays is not None and sorted(result.contributors) == sorted(
        fed.nodes
    )
    z = ((result.arrays["sum"] - clean["sum"]) / sigma).ravel()
    assert z.size > 100
    assert abs(float(z.std()) - np.sqrt(1.5)) < 0.12, float(z.std())


# -- fixed-point range -----------------------------------------------------------------
def test_fixed_point_values_at_the_bound_cannot_wrap_with_16_bits() -> None:
    # Prepare: two clients, bits = 16, scale = 1: the sum must stay below 2^15
    config = SecAggConfig(threshold=2, bits=16, scale=1.0)
    server = SecAggServer(config, b"edge")
    clients = {c: SecAggClient(c, config, b"edge") for c in (1, 2)}
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    bound = config.input_bound(2)
    encoded = encode_fixed_point(np.array([bound, -bound]), 1.0, 16, bound)

    # Execute
    summed = decode_fixed_point((encoded + encoded) & modulus_mask(16), 1.0, 16)

    # Assert: in range sums exactly; 16384 (whose sum 32768 wraps to -32768) refused
    np.testing.assert_array_equal(summed, [2 * bound, -2 * bound])
    with pytest.raises(ValueError, match=r"index 0 = 16384.0 cannot be encoded"):
        clients[1].mask_input(np.array([16384.0]), inbox[1])
    vector, _ = flatten_arrays({"count": np.array([bound])})
    assert clients[2].mask_input(vector, inbox[2]).vector.shape == (1,)


def test_site_with_another_skill_order_refuses_the_secure_round(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the server names the rows in another order than the sites' skills
    fed = federation()
    skills = tuple(fed.site(0).stream.skills)
    round_ = SecureSpectrumRound(
        fed.grid, fed.cfg.privacy, SESSION, 60.0, skills=skills[::-1]
    )
    # Execute
    result = round_.run(fed.arrays, 0, 10**6)
    # Assert: no site takes part, so nothing is summed into wrong rows
    assert result.arrays is None and not result.contributors
    reasons = " ".join(d["reason"] for d in result.dropped)
    assert "skill rows" in reasons
