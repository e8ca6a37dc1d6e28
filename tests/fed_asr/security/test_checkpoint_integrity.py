"""Tests of checkpoint manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_asr.security.checkpoint_integrity import (
    MANIFEST_NAME,
    IntegrityError,
    verify_manifest,
    write_manifest,
)
from fed_asr.security.signing import SignatureError, generate_signing_key


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    root = tmp_path / "round-3"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (root / "spectrum.safetensors").write_bytes(b"\x00" * 100)
    (root / "config.yaml").write_text("seed: 0\n")
    return root


def test_verify_manifest_untouched_checkpoint_passes(checkpoint: Path) -> None:
    # Execute
    manifest = write_manifest(checkpoint)
    verify_manifest(checkpoint)

    # Assert
    files = json.loads(manifest.read_text())["files"]
    assert sorted(files) == [
        "adapter/adapter_model.safetensors",
        "config.yaml",
        "spectrum.safetensors",
    ]


def test_verify_manifest_tampered_file_names_it(checkpoint: Path) -> None:
    # Prepare: same size, one byte changed
    write_manifest(checkpoint)
    path = checkpoint / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(
        IntegrityError, match="`adapter/adapter_model.safetensors` has SHA"
    ):
        verify_manifest(checkpoint)


def test_verify_manifest_missing_file_names_it(checkpoint: Path) -> None:
    # Prepare
    write_manifest(checkpoint)
    (checkpoint / "spectrum.safetensors").unlink()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="`spectrum.safetensors` is missing"):
        verify_manifest(checkpoint)


def test_verify_manifest_extra_file_refused_unless_allowed(checkpoint: Path) -> None:
    # Prepare
    write_manifest(checkpoint)
    (checkpoint / "extra.bin").write_bytes(b"x")

    # Execute / Assert
    with pytest.raises(IntegrityError, match=r"not in its manifest: \['extra.bin'\]"):
        verify_manifest(checkpoint)
    verify_manifest(checkpoint, allow_extra=True)


def test_verify_manifest_without_manifest_raises(checkpoint: Path) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match=f"has no `{MANIFEST_NAME}`"):
        verify_manifest(checkpoint)


def test_verify_manifest_escaping_entry_refused(checkpoint: Path) -> None:
    # Prepare
    manifest = write_manifest(checkpoint)
    content = json.loads(manifest.read_text())
    content["files"]["../outside"] = {"sha256": "0" * 64, "size": 0}
    manifest.write_text(json.dumps(content))

    # Execute / Assert
    with pytest.raises(IntegrityError, match="`../outside` escapes"):
        verify_manifest(checkpoint)


def test_verify_manifest_signed_manifest_edit_refused(checkpoint: Path) -> None:
    # Prepare: an attacker edits a file and rewrites the manifest without the key
    key = generate_signing_key()
    write_manifest(checkpoint, signing_key=key)
    verify_manifest(checkpoint, public_key=key.public_key())
    signature = (checkpoint / f"{MANIFEST_NAME}.sig").read_bytes()
    (checkpoint / "config.yaml").write_text("seed: 1\n")
    write_manifest(checkpoint)
    (checkpoint / f"{MANIFEST_NAME}.sig").write_bytes(signature)

    # Execute / Assert
    with pytest.raises(SignatureError, match="manifest signature"):
        verify_manifest(checkpoint, public_key=key.public_key())
