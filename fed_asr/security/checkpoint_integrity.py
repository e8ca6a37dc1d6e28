"""SHA-256 manifests of checkpoint directories.

``write_manifest(dir)`` records the digest and size of every file under ``dir`` in
``dir/MANIFEST.sha256.json`` (optionally signed with the server's Ed25519 key);
``verify_manifest(dir)`` refuses a checkpoint whose files were altered, removed or
added.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fed_asr.security.signing import SignatureError

MANIFEST_NAME = "MANIFEST.sha256.json"
SIGNATURE_NAME = "MANIFEST.sha256.json.sig"
_FORMAT = "fed-asr-manifest-v1"
_DOMAIN = b"fed-asr/checkpoint-manifest/v1"


class IntegrityError(RuntimeError):
    """Raised when a checkpoint does not match its manifest."""


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_files(directory: Path) -> list[str]:
    skip = {MANIFEST_NAME, SIGNATURE_NAME}
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() not in skip
    )


def write_manifest(
    directory: str | Path, signing_key: Ed25519PrivateKey | None = None
) -> Path:
    """Hash every file of a checkpoint directory into its manifest.

    Parameters
    ----------
    directory : str | Path
        The checkpoint directory.
    signing_key : Ed25519PrivateKey | None
        If given, also write a detached signature of the manifest.

    Returns
    -------
    Path
        Path of the manifest.

    Raises
    ------
    IntegrityError
        If ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IntegrityError(f"Checkpoint directory `{directory}` does not exist.")
    files = {
        name: {
            "sha256": file_sha256(directory / name),
            "size": (directory / name).stat().st_size,
        }
        for name in _checkpoint_files(directory)
    }
    payload = json.dumps({"format": _FORMAT, "files": files}, indent=2, sort_keys=True)
    manifest = directory / MANIFEST_NAME
    manifest.write_text(payload + "\n", encoding="utf-8")
    signature = directory / SIGNATURE_NAME
    if signing_key is not None:
        signature.write_bytes(signing_key.sign(_DOMAIN + manifest.read_bytes()))
    elif signature.exists():
        signature.unlink()  # a stale signature would no longer match
    return manifest


def verify_manifest(
    directory: str | Path,
    public_key: Ed25519PublicKey | None = None,
    allow_extra: bool = False,
) -> None:
    """Check a checkpoint directory against its manifest.

    Parameters
    ----------
    directory : str | Path
        The checkpoint directory.
    public_key : Ed25519PublicKey | None
        If given, the manifest's detached signature must verify with it.
    allow_extra : bool
        Accept files that are not listed in the manifest.

    Raises
    ------
    IntegrityError
        Naming the file, if the manifest is missing or malformed, a file is missing,
        has another size or digest, or an unlisted file is present.
    SignatureError
        If ``public_key`` is given and the manifest signature is missing or invalid.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise IntegrityError(f"Checkpoint `{directory}` has no `{MANIFEST_NAME}`.")
    raw = manifest.read_bytes()
    if public_key is not None:
        signature = directory / SIGNATURE_NAME
        if not signature.is_file():
            raise SignatureError(f"Checkpoint `{directory}` has no `{SIGNATURE_NAME}`.")
        try:
            public_key.verify(signature.read_bytes(), _DOMAIN + raw)
        except InvalidSignature as err:
            raise SignatureError(
                f"The manifest signature of checkpoint `{directory}` does not verify."
            ) from err
    try:
        content = json.loads(raw)
        files = content["files"]
        if content.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {content.get('format')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"Manifest `{manifest}` is malformed: {err}") from err

    root = directory.resolve()
    for name, entry in sorted(files.items()):
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise IntegrityError(f"Manifest entry `{name}` escapes the checkpoint.")
        if not isinstance(entry, dict) or not {"sha256", "size"} <= set(entry):
            raise IntegrityError(f"Manifest entry `{name}` lacks `sha256` or `size`.")
        path = root / pure
        if not path.is_file():
            raise IntegrityError(f"Checkpoint file `{name}` is missing from `{root}`.")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(
                f"Checkpoint file `{name}` has {size} bytes, the manifest of "
                f"`{root}` says {entry['size']}: it was modified."
            )
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"Checkpoint file `{name}` has SHA-256 {digest}, the manifest of "
                f"`{root}` says {entry['sha256']}: it was modified."
            )
    if not allow_extra:
        extra = sorted(set(_checkpoint_files(directory)) - set(files))
        if extra:
            raise IntegrityError(
                f"Checkpoint `{directory}` holds files not in its manifest: {extra}."
            )
