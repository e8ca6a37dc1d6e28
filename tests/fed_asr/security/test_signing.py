"""Tests of Ed25519 signatures over named arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fed_asr.security.signing import (
    SignatureError,
    SigningContext,
    canonical_digest,
    generate_signing_key,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    sign_arrays,
    verify_arrays,
)

CONTEXT = SigningContext(run_id="run-7", round=3, kind="adapter")


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "lora_A": rng.normal(size=(8, 16)).astype(np.float32),
        "lora_B": rng.normal(size=(16, 8)).astype(np.float32),
        "mean": rng.normal(size=(4, 54)),
    }


def test_verify_arrays_valid_signature_passes(arrays) -> None:
    # Prepare
    key = generate_signing_key()

    # Execute
    signature = sign_arrays(key, arrays, CONTEXT)

    # Assert: verification does not raise, also with a reordered dict
    assert len(signature) == 64
    verify_arrays(key.public_key(), dict(reversed(arrays.items())), CONTEXT, signature)


def test_verify_arrays_tampered_byte_refused(arrays) -> None:
    # Prepare
    key = generate_signing_key()
    signature = sign_arrays(key, arrays, CONTEXT)
    tampered = {k: v.copy() for k, v in arrays.items()}
    tampered["lora_B"].view(np.uint8)[5] ^= 0x01

    # Execute / Assert
    with pytest.raises(SignatureError, match="'adapter' of run 'run-7', round 3"):
        verify_arrays(key.public_key(), tampered, CONTEXT, signature)


@pytest.mark.parametrize(
    "context",
    [
        SigningContext("run-7", 4, "adapter"),
        SigningContext("run-8", 3, "adapter"),
        SigningContext("run-7", 3, "spectrum"),
    ],
)
def test_verify_arrays_other_context_refused(arrays, context: SigningContext) -> None:
    # Prepare
    key = generate_signing_key()
    signature = sign_arrays(key, arrays, CONTEXT)

    # Execute / Assert
    with pytest.raises(SignatureError, match="Signature check failed"):
        verify_arrays(key.public_key(), arrays, context, signature)


def test_verify_arrays_wrong_key_refused(arrays) -> None:
    # Prepare
    signature = sign_arrays(generate_signing_key(), arrays, CONTEXT)

    # Execute / Assert
    with pytest.raises(SignatureError, match="signed by another key"):
        verify_arrays(generate_signing_key().public_key(), arrays, CONTEXT, signature)


def test_canonical_digest_depends_on_name_dtype_and_shape(arrays) -> None:
    # Prepare
    base = canonical_digest(arrays, CONTEXT)
    renamed = {("lora_C" if k == "lora_A" else k): v for k, v in arrays.items()}
    recast = dict(arrays, mean=arrays["mean"].astype(np.float32))
    reshaped = dict(arrays, lora_A=arrays["lora_A"].reshape(16, 8))
    big_endian = dict(arrays, mean=arrays["mean"].astype(">f8"))

    # Execute
    digests = [canonical_digest(a, CONTEXT) for a in (renamed, recast, reshaped)]

    # Assert
    assert len({base, *digests}) == 4
    assert canonical_digest(big_endian, CONTEXT) == base  # same values, same bytes


def test_canonical_digest_torch_and_numpy_agree(arrays) -> None:
    # Prepare
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}

    # Execute / Assert
    assert canonical_digest(tensors, CONTEXT) == canonical_digest(arrays, CONTEXT)


def test_load_keys_pem_roundtrip_signs_and_verifies(tmp_path: Path, arrays) -> None:
    # Prepare
    key = generate_signing_key()
    save_private_key(key, tmp_path / "signing.key", password=b"secret")
    save_public_key(key.public_key(), tmp_path / "signing.pub")

    # Execute
    loaded = load_private_key(tmp_path / "signing.key", password=b"secret")
    public = load_public_key(tmp_path / "signing.pub")

    # Assert
    verify_arrays(public, arrays, CONTEXT, sign_arrays(loaded, arrays, CONTEXT))
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")


def test_load_public_key_not_a_key_raises(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "junk.pub").write_text("not a key")

    # Execute / Assert
    with pytest.raises(SignatureError, match="Cannot read a public key from"):
        load_public_key(tmp_path / "junk.pub")
