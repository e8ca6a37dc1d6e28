"""A malicious server lying to secure aggregation: keys, survivor sets, sessions."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Message

from fed_asr import protocol as P
from fed_asr.security.secagg import (
    ArrayLayout,
    decode_fixed_point,
    pairwise_mask,
    prg_mask,
    share_points,
    unflatten_arrays,
)
from fed_asr.security.secagg.encoding import derive_key, id_bytes, modulus_mask
from fed_asr.security.shamir import reconstruct_bytes
from fed_asr.wire import record_arrays
from tests.adversarial.secagg_helpers import (
    SESSION,
    _task_identity,
    federation,
    recorder,
    step_of,
)

__all__ = ["_task_identity", "federation"]  # fixtures shared via secagg_helpers

SHARE = 48  # bytes of one encoded Shamir share of a 32-byte secret
CONFIRM_STEP = "confirm"  # the consistency-check step (absent before it existed)


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
