"""Signatures cover every ArrayRecord of a server message (memory included)."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord

from fed_asr import protocol as P
from fed_asr.security.signing import SignatureError
from fed_asr.wire import content_signatures, verify_content


def _records() -> dict[str, ArrayRecord]:
    return {
        P.ARRAYS_RECORD: ArrayRecord({"w": Array(np.ones(3, np.float32))}),
        P.memory_record("fisher"): ArrayRecord({"w": Array(np.full(3, 2.0))}),
    }


def test_verify_content_accepts_signed_memory_and_refuses_a_forged_one() -> None:
    # Prepare
    key = Ed25519PrivateKey.generate()
    records = _records()
    signatures = content_signatures(key, records, 7, 3, "train")
    forged = dict(records)
    forged[P.memory_record("fisher")] = ArrayRecord({"w": Array(np.full(3, 1e6))})
    # Execute / Assert
    assert verify_content(key.public_key(), records, signatures, 7, "train", 0) == 3
    with pytest.raises(SignatureError):
        verify_content(key.public_key(), forged, signatures, 7, "train", 0)


def test_verify_content_refuses_a_record_added_after_signing() -> None:
    # Prepare: a relay adds a memory record the server never sent
    key = Ed25519PrivateKey.generate()
    records = _records()
    signatures = content_signatures(key, records, 7, 3, "train")
    records[P.memory_record("previous")] = ArrayRecord({"w": Array(np.zeros(3))})
    # Execute / Assert
    with pytest.raises(SignatureError, match="is not signed"):
        verify_content(key.public_key(), records, signatures, 7, "train", 0)
