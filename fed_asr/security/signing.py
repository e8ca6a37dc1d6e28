"""Ed25519 signatures over named arrays (global adapter, global skill spectrum).

The signed message is ``DOMAIN || SHA-256(canonical encoding)``. The canonical encoding
is the context (run id, round, kind) followed by every array in sorted-name order as
length-prefixed name, dtype string, shape and raw little-endian C-order bytes, so any
change of a value, name, dtype, shape or context breaks the signature.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DOMAIN = b"fed-asr/signed-arrays/v1"


class SignatureError(ValueError):
    """Raised when a signature does not verify or a key cannot be used."""


@dataclass(frozen=True)
class SigningContext:
    """What a signature is about, bound into the signed bytes.

    Parameters
    ----------
    run_id : str
        Identifier of the run.
    round : int
        Server round the arrays belong to.
    kind : str
        What is signed, e.g. ``"adapter"`` or ``"spectrum"``.
    """

    run_id: str
    round: int
    kind: str

    def to_bytes(self) -> bytes:
        """Unambiguous encoding of the context."""
        return (
            _field(self.run_id.encode())
            + struct.pack(">q", self.round)
            + _field(self.kind.encode())
        )


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _as_numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # torch tensors (bfloat16 has no NumPy dtype: view it as its raw 16-bit pattern)
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        return tensor.numpy()
    raise TypeError(
        f"Array `{name}` must be a numpy.ndarray or torch.Tensor, got "
        f"{type(value).__name__}."
    )


def canonical_digest(arrays: Mapping[str, object], context: SigningContext) -> bytes:
    """SHA-256 of the canonical encoding of ``arrays`` under ``context``.

    Parameters
    ----------
    arrays : Mapping[str, object]
        Named ``numpy.ndarray`` (or ``torch.Tensor``) values.
    context : SigningContext
        Run, round and kind.

    Returns
    -------
    bytes
        32-byte digest.
    """
    h = hashlib.sha256()
    h.update(_field(context.to_bytes()))
    h.update(struct.pack(">Q", len(arrays)))
    for name in sorted(arrays):
        array = _as_numpy(name, arrays[name])
        if array.dtype.hasobject:
            raise TypeError(f"Array `{name}` has object dtype; it cannot be signed.")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        h.update(_field(name.encode()))
        h.update(_field(little.dtype.str.encode()))
        h.update(struct.pack(">Q", little.ndim))
        h.update(struct.pack(f">{little.ndim}Q", *little.shape))
        data = np.ascontiguousarray(little).tobytes()
        h.update(_field(data))
    return h.digest()


def sign_arrays(
    private_key: Ed25519PrivateKey,
    arrays: Mapping[str, object],
    context: SigningContext,
) -> bytes:
    """Sign ``arrays`` under ``context``; returns the 64-byte Ed25519 signature."""
    return private_key.sign(DOMAIN + canonical_digest(arrays, context))


def verify_arrays(
    public_key: Ed25519PublicKey,
    arrays: Mapping[str, object],
    context: SigningContext,
    signature: bytes,
) -> None:
    """Check a signature made by :func:`sign_arrays`.

    Raises
    ------
    SignatureError
        If the arrays, the context or the key do not match the signature.
    """
    try:
        public_key.verify(signature, DOMAIN + canonical_digest(arrays, context))
    except InvalidSignature as err:
        raise SignatureError(
            f"Signature check failed for {context.kind!r} of run {context.run_id!r}, "
            f"round {context.round} ({len(arrays)} arrays): the arrays or context were "
            "altered, or they were signed by another key. Refusing them."
        ) from err


# --------------------------------------------------------------------------- keys
def generate_signing_key() -> Ed25519PrivateKey:
    """Generate a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted if ``password`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def save_private_key(
    key: Ed25519PrivateKey, path: str | Path, password: bytes | None = None
) -> None:
    """Write a private key as PEM, readable by the owner only."""
    path = Path(path)
    path.write_bytes(private_key_pem(key, password))
    path.chmod(0o600)


def save_public_key(key: Ed25519PublicKey, path: str | Path) -> None:
    """Write a public key as PEM."""
    Path(path).write_bytes(public_key_pem(key))


def load_private_key(
    path: str | Path, password: bytes | None = None
) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from PEM.

    Raises
    ------
    SignatureError
        If the file holds no Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"Cannot read a private key from `{path}`: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"`{path}` holds a {type(key).__name__}, expected an Ed25519 private key."
        )
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key from PEM.

    Raises
    ------
    SignatureError
        If the file holds no Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as err:
        raise SignatureError(f"Cannot read a public key from `{path}`: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"`{path}` holds a {type(key).__name__}, expected an Ed25519 public key."
        )
    return key
