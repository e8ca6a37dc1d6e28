"""A server message's signature covers its whole content, run, type and node."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fed_asr import protocol as P
from fed_asr.security.canonical import encode_value
from fed_asr.security.signing import MessageHeader, SignatureError
from fed_asr.wire import content_signature, verify_content

KEY = Ed25519PrivateKey.generate()
HEADER = MessageHeader(run_id=7, round=3, sequence=5, message_type="train", dst_node=11)


def _content() -> RecordDict:
    return RecordDict(
        {
            P.ARRAYS_RECORD: ArrayRecord({"w": Array(np.ones(3, np.float32))}),
            P.memory_record("fisher"): ArrayRecord({"w": Array(np.full(3, 2.0))}),
            P.CONFIG_RECORD: ConfigRecord({P.STAGE_KEY: 0, "ids": ["1", "2"]}),
            "extra": MetricRecord({"beta": 0.5}),
        }
    )


def _signed() -> RecordDict:
    content = _content()
    content[P.SIGNATURE_RECORD] = ConfigRecord(content_signature(KEY, content, HEADER))
    return content


def _verify(
    content: RecordDict,
    run_id: int = 7,
    message_type: str = "train",
    node_id: int = 11,
    last: tuple[int, int] | None = None,
) -> tuple[int, int]:
    return verify_content(
        KEY.public_key(),
        content,
        run_id=run_id,
        message_type=message_type,
        node_id=node_id,
        last=last,
    )


def test_verify_content_accepts_signed_memory_and_refuses_a_forged_one() -> None:
    # Prepare
    content = _signed()
    forged = _signed()
    forged[P.memory_record("fisher")] = ArrayRecord({"w": Array(np.full(3, 1e6))})
    # Execute / Assert
    assert _verify(content) == (3, 5)
    with pytest.raises(SignatureError, match="Signature check failed"):
        _verify(forged)


def test_verify_content_refuses_a_record_added_after_signing() -> None:
    # Prepare: a relay adds a memory record the server never sent
    content = _signed()
    content[P.memory_record("previous")] = ArrayRecord({"w": Array(np.zeros(3))})
    # Execute / Assert
    with pytest.raises(SignatureError, match="Signature check failed"):
        _verify(content)


@pytest.mark.parametrize(
    ("record", "key", "value"),
    [
        (P.CONFIG_RECORD, P.STAGE_KEY, 1),
        (P.CONFIG_RECORD, P.STAGE_KEY, 0.0),  # same number, other type
        (P.CONFIG_RECORD, "ids", ["1", "3"]),
        (P.CONFIG_RECORD, "local-epochs", 3),
        ("extra", "beta", 1e6),
    ],
)
def test_verify_content_refuses_a_config_or_metric_value_changed_in_transit(
    record: str, key: str, value: object
) -> None:
    # Prepare
    content = _signed()
    content[record][key] = value  # type: ignore[index]
    # Execute / Assert
    with pytest.raises(SignatureError, match="Signature check failed"):
        _verify(content)


@pytest.mark.parametrize(
    "where",
    [{"run_id": 8}, {"message_type": "evaluate"}, {"node_id": 12}],
)
def test_verify_content_refuses_another_run_type_or_node(where: dict) -> None:  # type: ignore[type-arg]
    # Execute / Assert
    with pytest.raises(SignatureError, match="Signature check failed"):
        _verify(_signed(), **where)


def test_verify_content_refuses_a_position_not_newer_than_the_last() -> None:
    # Execute / Assert: same position (replay) and an older round refused
    assert _verify(_signed(), last=(3, 4)) == (3, 5)
    assert _verify(_signed(), last=(2, 99)) == (3, 5)
    for last in [(3, 5), (3, 6), (4, 0)]:
        with pytest.raises(SignatureError, match="replayed"):
            _verify(_signed(), last=last)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({P.SIGNATURE_ROUND_KEY: 1e9}, "must be an integer, got 1000000000.0"),
        ({"round": 10**9}, "unexpected fields"),
        ({P.SIGNATURE_VALUE_KEY: b"x"}, "must be 64 bytes"),
    ],
)
def test_verify_content_refuses_a_malformed_signature_record(
    fields: dict,
    match: str,  # type: ignore[type-arg]
) -> None:
    # Prepare: a relay edits the signature record
    content = _signed()
    signature = dict(content[P.SIGNATURE_RECORD])  # type: ignore[arg-type]
    content[P.SIGNATURE_RECORD] = ConfigRecord({**signature, **fields})
    # Execute / Assert
    with pytest.raises(SignatureError, match=match):
        _verify(content)


def test_encode_value_gives_distinct_bytes_to_each_type_and_list_split() -> None:
    # Prepare: values that look alike as text or bytes
    values: list[object] = [1, 1.0, True, "1", b"1", [1], ["1"], ["a", "b"], ["ab"]]
    # Execute
    encodings = [encode_value(v, "v") for v in values]
    # Assert
    assert len(set(encodings)) == len(values)
    with pytest.raises(TypeError, match="`x` is a dict"):
        encode_value({"a": 1}, "`x`")
