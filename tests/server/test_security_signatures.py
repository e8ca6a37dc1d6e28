"""Signatures on real Flower messages (ClientApps in process) and on checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message
from security_helpers import Federation, _task_identity, federation

from fed_asr import protocol as P
from fed_asr.security.checkpoint_integrity import IntegrityError
from fed_asr.security.signing import (
    SignatureError,
    generate_signing_key,
    save_public_key,
)
from fed_asr.wire import record_arrays as record_to_numpy
from server.checkpoint import ADAPTER, Checkpoint, Checkpointer
from server.records import numpy_record
from server.strategy import FedASR

__all__ = ["_task_identity", "federation"]  # fixtures shared via security_helpers


# -- signatures -----------------------------------------------------------------------
def _signed_federation(federation, tmp_path: Path):  # type: ignore[no-untyped-def]
    key = generate_signing_key()
    public = tmp_path / "signing.pub"
    save_public_key(key.public_key(), public)
    fed = federation(node_config={P.NODE_VERIFY_KEY: str(public)})
    return fed, fed.strategy(signing_key=key)


def _evaluate(fed: Federation, strategy: FedASR, round_: int) -> list[Message]:
    strategy.begin_round(0, round_, None, {})  # the signed round is the global one
    messages = strategy.configure_evaluate(1, fed.arrays, ConfigRecord(), fed.grid)
    return list(fed.grid.send_and_receive(messages))


def test_signed_messages_verify_and_a_tampered_adapter_is_refused(
    federation, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    fed, strategy = _signed_federation(federation, tmp_path)
    honest = _evaluate(fed, strategy, 1)

    def tamper(node: int, msg: Message) -> bool:
        if node == 1002:
            arrays = record_to_numpy(msg.content.array_records[P.ARRAYS_RECORD])
            name = sorted(arrays)[0]
            arrays[name] = arrays[name] + 1e-3
            msg.content[P.ARRAYS_RECORD] = numpy_record(arrays)
        return False

    fed.grid.drop = tamper
    # Execute
    replies = _evaluate(fed, strategy, 2)
    # Assert: honest nodes accept, the tampered copy is refused with a clear reason
    assert not any(m.has_error() for m in honest)
    errors = {m.metadata.src_node_id: m for m in replies if m.has_error()}
    assert list(errors) == [1002]
    assert "Signature check failed" in errors[1002].error.reason


def test_unsigned_or_replayed_message_is_refused_by_a_verifying_node(
    federation, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    fed, strategy = _signed_federation(federation, tmp_path)
    _evaluate(fed, strategy, 3)
    # Execute: an older round (replay), then a message without signature
    replayed = _evaluate(fed, strategy, 2)
    strategy.signing_key = None
    unsigned = _evaluate(fed, strategy, 4)
    # Assert
    assert all(m.has_error() and "replayed" in m.error.reason for m in replayed)
    assert all(m.has_error() and "signature" in m.error.reason for m in unsigned)


# -- checkpoint integrity -----------------------------------------------------------
def test_resume_refuses_a_tampered_checkpoint(tmp_path: Path) -> None:
    # Prepare
    key = generate_signing_key()
    checkpointer = Checkpointer(tmp_path / "ckpt", signing_key=key)
    adapter = {"w": torch.arange(6, dtype=torch.float32)}
    folder = checkpointer.save(Checkpoint(3, adapter, None, {"rounds": []}))
    assert checkpointer.load_latest() is not None
    # Execute: change one byte of the adapter file
    data = bytearray((folder / ADAPTER).read_bytes())
    data[-1] ^= 1
    (folder / ADAPTER).write_bytes(bytes(data))
    # Assert
    with pytest.raises(IntegrityError, match=ADAPTER):
        checkpointer.load_latest()


def test_resume_refuses_a_manifest_rewritten_without_the_key(tmp_path: Path) -> None:
    # Prepare: an attacker edits the adapter and rewrites an unsigned manifest
    from fed_asr.security.checkpoint_integrity import write_manifest

    key = generate_signing_key()
    checkpointer = Checkpointer(tmp_path / "ckpt", signing_key=key)
    folder = checkpointer.save(
        Checkpoint(1, {"w": torch.zeros(2)}, None, {"rounds": []})
    )
    (folder / ADAPTER).write_bytes((folder / ADAPTER).read_bytes()[:-1] + b"\x01")
    write_manifest(folder, generate_signing_key())
    # Execute / Assert
    with pytest.raises(SignatureError):
        checkpointer.load_latest()
