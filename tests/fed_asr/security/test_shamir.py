"""Tests of Shamir secret sharing over GF(2^127 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from fed_asr.security.shamir import (
    PRIME,
    ShamirError,
    reconstruct_bytes,
    reconstruct_secret,
    split_bytes,
    split_secret,
)


def test_reconstruct_secret_any_threshold_subset_recovers_secret() -> None:
    # Prepare
    secret = PRIME - 5
    shares = split_secret(secret, [1, 2, 3, 4, 5], threshold=3)

    # Execute
    recovered = [
        reconstruct_secret({x: shares[x] for x in subset}, threshold=3)
        for subset in itertools.combinations(shares, 3)
    ]

    # Assert
    assert recovered == [secret] * 10


def test_reconstruct_secret_fewer_than_threshold_raises() -> None:
    # Prepare
    shares = split_secret(42, [1, 2, 3], threshold=3)

    # Execute / Assert
    with pytest.raises(ShamirError, match="exceeds the number of share points"):
        reconstruct_secret({1: shares[1], 2: shares[2]}, threshold=3)


def test_reconstruct_secret_below_threshold_shares_do_not_determine_secret() -> None:
    # Prepare: with t=2, one share is consistent with any secret; two random sharings
    # of different secrets give unrelated single shares.
    a = split_secret(1, [1, 2], threshold=2)
    b = split_secret(1, [1, 2], threshold=2)

    # Assert: the share at a point is randomised (equal with prob. 2^-127)
    assert a[1] != b[1]


def test_split_secret_invalid_points_raise() -> None:
    # Execute / Assert
    with pytest.raises(ShamirError, match="distinct"):
        split_secret(1, [1, 1, 2], threshold=2)
    with pytest.raises(ShamirError, match="Share point"):
        split_secret(1, [0, 1], threshold=2)
    with pytest.raises(ShamirError, match="secret"):
        split_secret(PRIME, [1, 2], threshold=2)


def test_reconstruct_bytes_key_of_32_bytes_roundtrips() -> None:
    # Prepare
    secret = b"\xff" * 16 + os.urandom(16)
    shares = split_bytes(secret, [3, 7, 9, 11], threshold=2)

    # Execute
    recovered = reconstruct_bytes({7: shares[7], 11: shares[11]}, 2, len(secret))

    # Assert
    assert recovered == secret


def test_reconstruct_bytes_wrong_share_size_raises() -> None:
    # Prepare
    shares = split_bytes(b"k" * 32, [1, 2], threshold=2)

    # Execute / Assert
    with pytest.raises(ShamirError, match="expected 48"):
        reconstruct_bytes({1: shares[1], 2: shares[2][:-1]}, 2, 32)
