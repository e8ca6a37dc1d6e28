"""The server's signing key (``security.sign``)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fed_asr.config import SecurityConfig
from fed_asr.security.signing import load_private_key


def server_signing_key(security: SecurityConfig) -> Ed25519PrivateKey | None:
    """The server's signing key when ``security.sign`` is on.

    The PEM may be encrypted; its password is read from the environment variable
    ``FED_ASR_SIGNING_KEY_PASSWORD``.

    Raises
    ------
    ValueError
        ``security.sign=true`` without ``security.signing_key``.
    """
    if not security.sign:
        return None
    if not security.signing_key:
        raise ValueError(
            "`security.sign=true` needs `security.signing_key` (the PEM written by "
            "`fed-asr-credentials`, e.g. certificates/signing.key)."
        )
    password = os.environ.get("FED_ASR_SIGNING_KEY_PASSWORD")
    return load_private_key(
        Path(security.signing_key).expanduser(),
        password.encode() if password else None,
    )
