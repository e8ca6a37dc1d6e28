"""Long-term site identity keys and the pinned list of the federation's sites.

Each site holds an Ed25519 *identity key* (``site-<i>.key``). The federation's sites
and their public identity keys are listed in one *pinned list*, a JSON file
(``site-keys.json``)::

    {"format": "fed-asr/site-keys/v1",
     "sites": {"site-0": "-----BEGIN PUBLIC KEY-----\\n...", "site-1": "..."}}

The list is distributed out of band, over the same trusted channel as ``ca.crt``
(compare :func:`site_keys_fingerprint` by phone or in person). A site finds its own
name in the list by its public key. Secure aggregation signs every key advertisement
and every survivor set with the identity key and checks its peers' signatures
against this list (``docs/security.md`` section 1), so a server cannot substitute
keys or invent sites.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SITE_KEYS_FORMAT = "fed-asr/site-keys/v1"


class SiteIdentityError(ValueError):
    """Raised when an identity key or a pinned site list cannot be used."""


def public_key_pem(key: Ed25519PublicKey) -> str:
    """PEM (SubjectPublicKeyInfo) text of an Ed25519 public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def site_keys_text(keys: Mapping[str, Ed25519PublicKey]) -> str:
    """The pinned-list JSON of ``keys`` (site name -> public key), sorted by name."""
    sites = {name: public_key_pem(keys[name]) for name in sorted(keys)}
    return json.dumps({"format": SITE_KEYS_FORMAT, "sites": sites}, indent=2) + "\n"


def load_site_keys(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """Read a pinned site list.

    Raises
    ------
    SiteIdentityError
        If the file is missing or malformed, an entry is not an Ed25519 public key,
        or two sites share a key; the message names the file and the entry.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SiteIdentityError(f"Cannot read the site list `{path}`: {err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SiteIdentityError(f"`{path}` is not a JSON site list: {err}") from err
    if not isinstance(data, dict) or data.get("format") != SITE_KEYS_FORMAT:
        raise SiteIdentityError(
            f'`{path}` must be a JSON object with "format": "{SITE_KEYS_FORMAT}".'
        )
    sites = data.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise SiteIdentityError(f'`{path}`: "sites" must be a non-empty object.')
    keys: dict[str, Ed25519PublicKey] = {}
    owners: dict[bytes, str] = {}
    for name, pem in sites.items():
        if not name or not isinstance(pem, str):
            raise SiteIdentityError(
                f"`{path}`: site {name!r} needs a non-empty name and a PEM string."
            )
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except ValueError as err:
            raise SiteIdentityError(f"`{path}`: site {name!r}: {err}") from err
        if not isinstance(key, Ed25519PublicKey):
            raise SiteIdentityError(
                f"`{path}`: site {name!r} holds a {type(key).__name__}, expected an "
                "Ed25519 public key."
            )
        raw = _raw(key)
        if raw in owners:
            raise SiteIdentityError(
                f"`{path}`: sites {owners[raw]!r} and {name!r} share one public key."
            )
        owners[raw] = name
        keys[name] = key
    return keys


def site_keys_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of the canonical text of a pinned list, to compare out of band."""
    text = site_keys_text(load_site_keys(path))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SiteIdentity:
    """This site's name and identity key, and every pinned site's public key.

    Attributes
    ----------
    name : str
        This site's entry in the pinned list.
    private_key : Ed25519PrivateKey
        This site's identity key (never leaves the site).
    sites : Mapping[str, Ed25519PublicKey]
        The pinned list, this site included.
    """

    name: str
    private_key: Ed25519PrivateKey
    sites: Mapping[str, Ed25519PublicKey]

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` by this site."""
        return self.private_key.sign(message)

    def verify(self, site: str, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is ``site``'s valid signature of ``message``."""
        return verify_site_signature(self.sites, site, message, signature)


def verify_site_signature(
    sites: Mapping[str, Ed25519PublicKey], site: str, message: bytes, signature: bytes
) -> bool:
    """True iff ``site`` is pinned in ``sites`` and signed ``message``."""
    key = sites.get(site)
    if key is None:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def load_site_identity(
    identity_key: str | Path, site_keys: str | Path, password: bytes | None = None
) -> SiteIdentity:
    """Load this site's identity key and the pinned list, and find this site in it.

    Parameters
    ----------
    identity_key : str | Path
        PEM (PKCS#8) Ed25519 private key of this site.
    site_keys : str | Path
        The pinned site list (JSON).
    password : bytes | None
        Password of an encrypted identity key.

    Raises
    ------
    SiteIdentityError
        If either file cannot be used, or the identity key is not in the list.
    """
    identity_key = Path(identity_key)
    try:
        key = serialization.load_pem_private_key(identity_key.read_bytes(), password)
    except OSError as err:
        raise SiteIdentityError(
            f"Cannot read the identity key `{identity_key}`: {err}"
        ) from err
    except (ValueError, TypeError) as err:
        raise SiteIdentityError(
            f"`{identity_key}` is not a PEM private key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SiteIdentityError(
            f"`{identity_key}` holds a {type(key).__name__}, expected an Ed25519 "
            "identity key."
        )
    sites = load_site_keys(site_keys)
    own = _raw(key.public_key())
    names = [name for name, public in sites.items() if _raw(public) == own]
    if not names:
        raise SiteIdentityError(
            f"The identity key `{identity_key}` is not in the site list `{site_keys}`."
        )
    return SiteIdentity(names[0], key, sites)
