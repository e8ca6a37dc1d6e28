"""Tests of authenticated secure aggregation: site identities, key checks, the
consistency check, client-owned parameters and the fixed-point bound."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fed_asr.security.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    public_key_problem,
)
from fed_asr.security.site_identity import SiteIdentity

SESSION = b"run-1/0/1"
P25519 = 2**255 - 19
# u-coordinates of the points of order 1, 2, 4 and 8 on Curve25519 and its twist
SMALL_ORDER = {
    "zero": 0,
    "one": 1,
    "order-8-a": 325606250916557431795983626356110631294008115727848805560023387167927233504,  # noqa: E501
    "order-8-b": 39382357235489614581723060781553021112529911719440698176882885853963445705823,  # noqa: E501
    "p-1": P25519 - 1,
}


def identities(n: int) -> list[SiteIdentity]:
    """Identities of ``n`` sites sharing one pinned list (fixed keys: deterministic)."""
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(n)]
    pinned = {f"site-{i}": k.public_key() for i, k in enumerate(keys)}
    return [SiteIdentity(f"site-{i}", k, pinned) for i, k in enumerate(keys)]


def group(
    n: int = 4, threshold: int = 3, signed: bool = True
) -> tuple[SecAggServer, dict[int, SecAggClient]]:
    """A server and ``n`` clients (ids 10, 20, ...) with site identities."""
    config = SecAggConfig(threshold=threshold)
    ids = identities(n)
    sites = ids[0].sites if signed else None
    clients = {
        10 * (i + 1): SecAggClient(
            10 * (i + 1), config, SESSION, ids[i] if signed else None
        )
        for i in range(n)
    }
    return SecAggServer(config, SESSION, sites), clients


def masked_round(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    inputs: Mapping[int, np.ndarray],
) -> UnmaskRequest:
    """Rounds 0-2 with every client; returns the server's unmask request."""
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    return server.collect_masked_inputs(
        {c: clients[c].mask_input(inputs[c], inbox[c]) for c in inbox}
    )


def inputs_of(clients: Mapping[int, SecAggClient]) -> dict[int, np.ndarray]:
    return {c: np.array([float(c), -0.5, 3.25]) for c in clients}


def test_signed_protocol_sum_matches_and_state_survives_serialisation() -> None:
    # Prepare
    server, clients = group()
    inputs = inputs_of(clients)
    request = masked_round(server, clients, inputs)

    # Execute: every client is reloaded from its bytes between the rounds
    reloaded = {
        c: SecAggClient.from_bytes(v.to_bytes(), v.identity) for c, v in clients.items()
    }
    signatures = server.collect_confirmations(
        {c: reloaded[c].confirm(request) for c in request.survivors}
    )
    again = {
        c: SecAggClient.from_bytes(v.to_bytes(), v.identity)
        for c, v in reloaded.items()
    }
    result = server.unmask(
        {c: again[c].unmask(request, signatures) for c in signatures}
    )

    # Assert
    np.testing.assert_allclose(result.vector, sum(inputs.values()), atol=1e-6)
    assert all(len(s) == 64 for s in signatures.values())


@pytest.mark.parametrize("name", sorted(SMALL_ORDER))
@pytest.mark.parametrize("top_bit", [False, True])
def test_public_key_problem_refuses_small_order_points(
    name: str, top_bit: bool
) -> None:
    # Prepare
    raw = (SMALL_ORDER[name] | (1 << 255 if top_bit else 0)).to_bytes(32, "little")

    # Execute
    problem = public_key_problem(raw)

    # Assert: the top bit set is non-canonical; otherwise small order
    assert problem is not None
    assert ("non-canonical" if top_bit else "low-order") in problem


def test_public_key_problem_accepts_a_real_key_and_refuses_p_and_short() -> None:
    # Prepare
    client = SecAggClient(1, SecAggConfig(threshold=2))

    # Execute / Assert
    assert public_key_problem(client.advertise().mask_public_key) is None
    assert "non-canonical" in str(public_key_problem(P25519.to_bytes(32, "little")))
    assert "of 31 bytes" in str(public_key_problem(bytes(31)))


def test_server_drops_a_zero_key_advertiser_and_the_round_completes() -> None:
    # Prepare: client 40 advertises an all-zero mask key (its signature is valid)
    server, clients = group(signed=False)
    adverts = {c: v.advertise() for c, v in clients.items()}
    adverts[40] = replace(adverts[40], mask_public_key=bytes(32))
    honest = {c: v for c, v in clients.items() if c != 40}
    inputs = inputs_of(clients)

    # Execute
    book = server.collect_advertisements(adverts)
    inbox = server.route_shares({c: honest[c].share_keys(book) for c in book})
    request = server.collect_masked_inputs(
        {c: honest[c].mask_input(inputs[c], inbox[c]) for c in inbox}
    )
    signatures = server.collect_confirmations(
        {c: honest[c].confirm(request) for c in request.survivors}
    )
    result = server.unmask(
        {c: honest[c].unmask(request, signatures) for c in signatures}
    )

    # Assert
    assert sorted(book) == [10, 20, 30]
    assert "low-order" in server.refused[40]
    np.testing.assert_allclose(result.vector, sum(inputs[c] for c in honest), atol=1e-6)


def test_client_refuses_a_book_with_a_low_order_key_naming_the_node() -> None:
    # Prepare: the server relays client 30's advertisement with a zero key
    _, clients = group(signed=False)
    book = {c: v.advertise() for c, v in clients.items()}
    book[30] = replace(book[30], encryption_public_key=bytes(32))

    # Execute / Assert
    with pytest.raises(SecAggError, match="node 30 refused: .*low-order"):
        clients[10].share_keys(book)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("substitute", "not signed by site 'site-1'"),
        ("unpinned", "'site-9' is not in the pinned site list"),
        ("replayed", "not signed by site 'site-1' for this session"),
        ("unsigned", "not signed"),
    ],
)
def test_client_refuses_an_unauthenticated_key_book_entry(
    change: str, reason: str
) -> None:
    # Prepare: the entry of node 20 (site-1) is tampered with
    server, clients = group()
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    entry = book[20]
    if change == "substitute":
        fake = SecAggClient(20, SecAggConfig(threshold=3)).advertise()
        entry = replace(entry, encryption_public_key=fake.encryption_public_key)
    elif change == "unpinned":
        entry = replace(entry, site="site-9")
    elif change == "replayed":
        other = SecAggClient(
            20, SecAggConfig(threshold=3), b"old", clients[20].identity
        )
        entry = other.advertise()
    else:
        entry = replace(entry, signature=b"")
    book[20] = entry

    # Execute / Assert: nothing is released
    with pytest.raises(SecAggError, match=f"node 20 refused: .*{reason}"):
        clients[10].share_keys(book)


def test_one_site_cannot_advertise_as_two_clients() -> None:
    # Prepare: site-0 runs two clients in one session
    server, clients = group(n=4)
    twin = SecAggClient(99, SecAggConfig(threshold=3), SESSION, clients[10].identity)
    adverts = {c: v.advertise() for c, v in clients.items()} | {99: twin.advertise()}

    # Execute
    book = server.collect_advertisements(adverts)

    # Assert
    assert sorted(book) == [20, 30, 40]
    assert "site 'site-0' advertises as several clients" in server.refused[99]


def test_unmask_needs_a_majority_of_pinned_sites_to_confirm_the_set() -> None:
    # Prepare: 5 pinned sites, t = 2; the server shows client 10 the set {10, 20, 30}
    # and forwards only two signatures over it
    server, clients = group(n=5, threshold=2)
    request = masked_round(server, clients, inputs_of(clients))
    fake = UnmaskRequest(survivors=(10, 20), dropped=(30, 40, 50))
    signatures = {c: clients[c].confirm(fake) for c in (10, 20)}

    # Execute / Assert: 2 >= t but 3 are needed (a majority of the 5 sites)
    assert request.dropped == ()
    with pytest.raises(SecAggError, match="only 2 survivors confirmed .* 3 needed"):
        clients[10].unmask(fake, signatures)


def test_unmask_refuses_a_signature_over_another_survivor_set() -> None:
    # Prepare: client 20 was shown another survivor set than client 10
    server, clients = group()
    masked_round(server, clients, inputs_of(clients))
    seen_by_10 = UnmaskRequest(survivors=(10, 20, 30), dropped=(40,))
    seen_by_20 = UnmaskRequest(survivors=(10, 20, 40), dropped=(30,))
    signatures = {
        10: clients[10].confirm(seen_by_10),
        20: clients[20].confirm(seen_by_20),
    }
    signatures[30] = clients[30].confirm(seen_by_10)

    # Execute / Assert
    with pytest.raises(SecAggError, match="signature of node 20 .* different survivor"):
        clients[10].unmask(seen_by_10, signatures)


def test_unmask_request_must_be_the_confirmed_one() -> None:
    # Prepare
    server, clients = group()
    request = masked_round(server, clients, inputs_of(clients))
    signatures = server.collect_confirmations(
        {c: clients[c].confirm(request) for c in request.survivors}
    )

    # Execute / Assert: after confirming all four alive, 40 is claimed dropped
    with pytest.raises(SecAggError, match="differs from the survivor set"):
        clients[10].unmask(UnmaskRequest((10, 20, 30), (40,)), signatures)


def test_server_drops_an_invalid_confirmation() -> None:
    # Prepare
    server, clients = group()
    request = masked_round(server, clients, inputs_of(clients))
    confirmations = {c: clients[c].confirm(request) for c in request.survivors}
    confirmations[40] = bytes(64)

    # Execute
    kept = server.collect_confirmations(confirmations)

    # Assert
    assert sorted(kept) == [10, 20, 30]
    assert "signature is invalid" in server.refused[40]


def test_for_session_only_raises_the_threshold_and_keeps_the_encoding() -> None:
    # Prepare
    own = SecAggConfig(threshold=3, bits=62, scale=2.0**24)

    # Execute / Assert
    assert own.for_session(5, 62, 2.0**24).threshold == 5
    with pytest.raises(SecAggError, match="threshold 2, below this node's minimum 3"):
        own.for_session(2, 62, 2.0**24)
    with pytest.raises(SecAggError, match="bits=16"):
        own.for_session(3, 16, 2.0**24)


@pytest.mark.parametrize(("bits", "n"), [(16, 2), (16, 3), (32, 5), (62, 10), (64, 2)])
def test_input_bound_sum_of_n_values_at_the_bound_decodes_exactly(
    bits: int, n: int
) -> None:
    # Prepare: scale 1, every client sends +bound in entry 0 and -bound in entry 1
    config = SecAggConfig(threshold=2, bits=bits, scale=1.0)
    bound = config.input_bound(n)
    ids = list(range(1, n + 1))
    server = SecAggServer(config, SESSION)
    clients = {c: SecAggClient(c, config, SESSION) for c in ids}
    values = np.array([bound, -bound])

    # Execute
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    request = server.collect_masked_inputs(
        {c: clients[c].mask_input(values, inbox[c]) for c in inbox}
    )
    signatures = server.collect_confirmations(
        {c: clients[c].confirm(request) for c in request.survivors}
    )
    result = server.unmask(
        {c: clients[c].unmask(request, signatures) for c in signatures}
    )

    # Assert: no wrap-around at the edge
    assert bound * n < 2.0 ** (bits - 1)
    np.testing.assert_array_equal(result.vector, values * n)
