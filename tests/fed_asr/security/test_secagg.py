"""Tests of the secure-aggregation protocol and its fixed-point encoding."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import pytest

from fed_asr.config import PrivacyConfig
from fed_asr.security.secagg import (
    ArrayLayout,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    SecAggServer,
    UnmaskRequest,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
    threshold_from_fraction,
    unflatten_arrays,
)

SESSION = b"run-1/stage-0"
IDS = (17, 3, 2**63 + 5, 42, 8)  # arbitrary node ids, unsorted


def make_stats(rng: np.random.Generator, s: int = 4, d: int = 54, m: int = 8) -> dict:
    """Per-skill statistics of one client, shaped like SkillStats.to_arrays()."""
    count = rng.integers(0, 200, size=s).astype(np.float64)
    desc = rng.normal(size=(s, d))
    return {
        "count": count,
        "sum": desc * count[:, None],
        "sumsq": desc**2 * count[:, None],
        "angular_sum": rng.dirichlet(np.ones(m), size=s) * count[:, None],
    }


def run_protocol(
    inputs: Mapping[int, Mapping[str, np.ndarray]],
    threshold: int,
    drop_before_masking: Collection[int] = (),
    drop_before_unmask: Collection[int] = (),
) -> SecAggResult:
    """Drive all rounds; clients in the drop sets vanish after round 1 / round 2."""
    config = SecAggConfig(threshold=threshold)
    server = SecAggServer(config, SESSION)
    clients = {cid: SecAggClient(cid, config, SESSION) for cid in inputs}
    book = server.collect_advertisements({c: clients[c].advertise() for c in clients})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    masked = {
        c: clients[c].mask_input(inputs[c], inbox[c])
        for c in inbox
        if c not in drop_before_masking
    }
    request = server.collect_masked_inputs(masked)
    signatures = server.collect_confirmations(
        {c: clients[c].confirm(request) for c in request.survivors}
    )
    responses = {
        c: clients[c].unmask(request, signatures)
        for c in signatures
        if c not in drop_before_unmask
    }
    return server.unmask(responses)


def share_round(
    server: SecAggServer, clients: Mapping[int, SecAggClient]
) -> dict[int, dict[int, bytes]]:
    """Rounds 0 and 1: every client advertises, then its key shares are routed."""
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    return server.route_shares({c: v.share_keys(book) for c, v in clients.items()})


def keyed_group(
    ids: Collection[int] = (1, 2, 3), session: bytes = SESSION
) -> tuple[SecAggConfig, dict[int, SecAggClient], dict[int, dict[int, bytes]]]:
    """Config (t = 2), clients ``ids`` of ``session`` and their routed share inbox."""
    config = SecAggConfig(threshold=2)
    server = SecAggServer(config, session)
    clients = {cid: SecAggClient(cid, config, session) for cid in ids}
    return config, clients, share_round(server, clients)


def plain_sum(inputs: Mapping[int, Mapping[str, np.ndarray]], ids: Collection[int]):
    return {k: sum(inputs[c][k] for c in ids) for k in next(iter(inputs.values()))}


@pytest.fixture
def inputs() -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {cid: make_stats(rng) for cid in IDS}


def test_secagg_all_clients_survive_sum_matches_plain_sum(inputs) -> None:
    # Prepare
    expected = plain_sum(inputs, IDS)

    # Execute
    result = run_protocol(inputs, threshold=3)

    # Assert
    assert result.contributors == tuple(sorted(IDS))
    assert result.arrays is not None and set(result.arrays) == set(expected)
    for name, value in expected.items():
        assert result.arrays[name].shape == value.shape
        np.testing.assert_allclose(result.arrays[name], value, rtol=0, atol=5 / 2**24)


def test_secagg_masked_vector_looks_uniform() -> None:
    # Prepare: a very structured input (constant) of 8192 values
    config, clients, inbox = keyed_group()
    n = 8192
    values = np.full(n, 0.5) + np.linspace(0.0, 1.0, n)
    encoded = encode_fixed_point(values, config.scale, config.bits, 1e6)

    # Execute
    masked = clients[1].mask_input(values, inbox[1]).vector

    # Assert
    bits = (masked[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)  # (n, 64)
    bit_means = bits.mean(axis=0)
    assert np.all(np.abs(bit_means[:62] - 0.5) < 0.05), bit_means[:62]
    assert np.all(bit_means[62:] == 0)  # values live modulo 2^62
    corr = np.corrcoef(masked.astype(np.float64), encoded.astype(np.float64))[0, 1]
    assert abs(corr) < 0.05
    byte_counts = np.bincount(
        masked.view(np.uint8).reshape(n, 8)[:, :7].ravel(), None, 256
    )
    assert byte_counts.min() > 0.6 * byte_counts.mean()
    assert np.unique(masked).size == n


def test_secagg_client_drops_after_masking_input_still_included(inputs) -> None:
    # Prepare: client 42 sends its masked input but never answers the unmask request
    expected = plain_sum(inputs, IDS)

    # Execute
    result = run_protocol(inputs, threshold=3, drop_before_unmask={42})

    # Assert
    assert 42 in result.contributors
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name], value, rtol=0, atol=5 / 2**24)


def test_secagg_client_drops_before_masking_excluded_from_sum(inputs) -> None:
    # Prepare: client 3 shared its keys, then vanished before sending a masked input
    survivors = [c for c in IDS if c != 3]
    expected = plain_sum(inputs, survivors)

    # Execute
    result = run_protocol(inputs, threshold=3, drop_before_masking={3})

    # Assert
    assert result.contributors == tuple(sorted(survivors))
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name], value, rtol=0, atol=4 / 2**24)


def test_secagg_both_kinds_of_dropout_sum_of_included_clients(inputs) -> None:
    # Prepare
    included = [c for c in IDS if c != 17]
    expected = plain_sum(inputs, included)

    # Execute
    result = run_protocol(
        inputs, threshold=3, drop_before_masking={17}, drop_before_unmask={8}
    )

    # Assert
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name], value, rtol=0, atol=4 / 2**24)


def test_secagg_fewer_survivors_than_threshold_raises(inputs) -> None:
    # Execute / Assert: 2 masked inputs with t = 3
    with pytest.raises(
        SecAggError, match="Only 2 masked inputs arrived; the threshold"
    ):
        run_protocol(inputs, threshold=3, drop_before_masking={17, 3, 42})


def test_secagg_fewer_unmask_responses_than_threshold_raises(inputs) -> None:
    # Execute / Assert: 5 masked inputs but only 2 answer the unmask request
    with pytest.raises(SecAggError, match="Only 2 clients answered"):
        run_protocol(inputs, threshold=3, drop_before_unmask={17, 3, 42})


def test_secagg_tampered_ciphertext_refused(inputs) -> None:
    # Prepare
    _, clients, inbox = keyed_group()
    blob = bytearray(inbox[2][1])
    blob[20] ^= 0x01
    inbox[2][1] = bytes(blob)

    # Execute / Assert
    with pytest.raises(SecAggError, match="from client 1 failed authentication"):
        clients[2].mask_input(inputs[17], inbox[2])


def test_secagg_misrouted_ciphertext_refused(inputs) -> None:
    # Prepare: the server hands client 2 the ciphertext client 1 made for client 3
    _, clients, inbox = keyed_group()
    inbox[2][1] = inbox[3][1]

    # Execute / Assert
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[2].mask_input(inputs[17], inbox[2])


def test_secagg_client_listed_as_dropped_refuses_to_unmask(inputs) -> None:
    # Prepare
    _, clients, inbox = keyed_group()
    clients[1].mask_input(inputs[17], inbox[1])

    # Execute / Assert: revealing 1's key share and seed share would unmask it
    with pytest.raises(SecAggError, match="listed as dropped"):
        clients[1].confirm(UnmaskRequest(survivors=(2, 3), dropped=(1,)))


def test_secagg_round_called_out_of_order_raises() -> None:
    # Prepare
    client = SecAggClient(1, SecAggConfig(threshold=2))

    # Execute / Assert
    with pytest.raises(SecAggError, match="`share_keys` called at stage 0"):
        client.share_keys({})


def test_encode_fixed_point_out_of_range_names_array_and_index() -> None:
    # Prepare
    arrays = {"count": np.zeros(4), "sumsq": np.zeros((4, 3))}
    arrays["sumsq"][2, 1] = 1e12
    vector, layout = flatten_arrays(arrays)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"sumsq\[2, 1\] = 1000000000000.0 cannot"):
        encode_fixed_point(vector, 2.0**24, 62, bound=1e9, layout=layout)


def test_mask_input_non_finite_value_raises(inputs) -> None:
    # Prepare
    _, clients, inbox = keyed_group((1, 2), session=b"")
    bad = dict(inputs[17], count=np.array([1.0, np.nan, 0.0, 2.0]))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"count\[1\] = nan"):
        clients[1].mask_input(bad, inbox[1])


@pytest.mark.parametrize("bits", [32, 62, 64])
def test_decode_fixed_point_sum_of_encodings_roundtrips(bits: int) -> None:
    # Prepare
    scale = 2.0**12
    values = np.array([[-3.25, 7.5, 0.0], [1.0, -1.0, 2.5]])
    mask = np.uint64((1 << bits) - 1)

    # Execute
    encoded = [encode_fixed_point(v, scale, bits, bound=100.0) for v in values]
    decoded = decode_fixed_point((encoded[0] + encoded[1]) & mask, scale, bits)

    # Assert
    np.testing.assert_array_equal(decoded, values.sum(axis=0))


def test_unflatten_arrays_roundtrips_with_json_layout() -> None:
    # Prepare
    arrays = {"b": np.arange(6.0).reshape(2, 3), "a": np.array([1.5])}

    # Execute
    vector, layout = flatten_arrays(arrays)
    restored = unflatten_arrays(vector, ArrayLayout.from_json(layout.to_json()))

    # Assert
    assert vector.tolist() == [1.5, 0, 1, 2, 3, 4, 5]
    for name, value in arrays.items():
        np.testing.assert_array_equal(restored[name], value)


def test_secagg_config_invalid_values_raise() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`threshold` must be at least 2"):
        SecAggConfig(threshold=1)
    with pytest.raises(ValueError, match="`bits` must lie in"):
        SecAggConfig(threshold=2, bits=70)
    with pytest.raises(ValueError, match="`max_abs` = 1e\\+30 is too large"):
        SecAggConfig(threshold=2, max_abs=1e30).input_bound(4)


def test_threshold_from_fraction_rounds_up_within_bounds() -> None:
    # Execute / Assert
    assert threshold_from_fraction(5, 0.6) == 3
    assert threshold_from_fraction(10, 0.6) == 6
    assert threshold_from_fraction(2, 0.1) == 2
    config = SecAggConfig.from_privacy_config(PrivacyConfig(), num_clients=7)
    assert (config.threshold, config.bits, config.scale) == (5, 62, 2.0**24)
    with pytest.raises(ValueError, match="`secagg_threshold` must lie in"):
        threshold_from_fraction(5, 1.5)


def test_secagg_ciphertext_from_other_session_refused(inputs) -> None:
    # Prepare: client 2 runs session B, its peers session A
    config = SecAggConfig(threshold=2)
    server = SecAggServer(config, b"A")
    clients = {1: SecAggClient(1, config, b"A"), 2: SecAggClient(2, config, b"B")}
    inbox = share_round(server, clients)

    # Execute / Assert
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[2].mask_input(inputs[17], inbox[2])
