"""Which key advertisements and survivor sets a SecAgg participant may trust.

- **Public keys.** An X25519 public key must be 32 bytes, canonical (``u < p``, top
  bit clear) and not of small order. A small-order point makes every shared secret
  with it all-zero (``cryptography`` then raises), so one such advertiser would abort
  every round; with a canonical check two encodings of one point cannot pass as two
  distinct keys.
- **Advertisements.** With site identities, a client signs
  ``(session, client id, site, mask key, encryption key)`` with its identity key;
  everyone checks the signature against the pinned list, and every site appears at
  most once per key book.
- **Survivor sets** (Bonawitz et al., CCS 2017, round *ConsistencyCheck*). Before
  unmasking, each survivor signs ``(session, survivors, dropped)``; a client releases
  shares only after valid signatures over the same pair from
  ``max(t, floor(N/2) + 1)`` survivors, ``N`` being the number of pinned sites. Two
  different survivor sets can then never both be confirmed by honest sites.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from fed_asr.security.secagg.encoding import AdvertiseKeys, SecAggError, id_bytes
from fed_asr.security.site_identity import verify_site_signature

PinnedSites = Mapping[str, Ed25519PublicKey]  # site name -> public identity key

_FIELD_PRIME = 2**255 - 19
# Any clamped scalar (a multiple of 8) maps a point of order dividing 8 (curve) or 4
# (twist) to the identity, so X25519 with it fails exactly on the small-order keys.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
_ADVERT_DOMAIN = b"fed-asr/secagg/advertise/v1"
_SURVIVORS_DOMAIN = b"fed-asr/secagg/survivors/v1"


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def public_key_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a usable X25519 public key, or None if it is."""
    if len(raw) != 32:
        return f"an X25519 public key of {len(raw)} bytes (32 expected)"
    if int.from_bytes(raw, "little") >= _FIELD_PRIME:
        return "a non-canonical X25519 public key"
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return "a low-order X25519 public key (all-zero shared secret)"
    return None


def advert_message(session: bytes, advert: AdvertiseKeys) -> bytes:
    """The bytes a client signs when it advertises its keys."""
    return (
        _ADVERT_DOMAIN
        + _field(session)
        + id_bytes(advert.client_id)
        + _field(advert.site.encode())
        + _field(advert.mask_public_key)
        + _field(advert.encryption_public_key)
    )


def survivors_message(
    session: bytes, survivors: Iterable[int], dropped: Iterable[int]
) -> bytes:
    """The bytes a survivor signs in the consistency check."""
    alive, gone = sorted(survivors), sorted(dropped)
    return (
        _SURVIVORS_DOMAIN
        + _field(session)
        + _field(b"".join(id_bytes(c) for c in alive))
        + _field(b"".join(id_bytes(c) for c in gone))
    )


def advert_problem(
    cid: int,
    advert: AdvertiseKeys,
    session: bytes,
    sites: PinnedSites | None = None,
) -> str | None:
    """Why the advertisement of ``cid`` must be refused, or None.

    Without ``sites`` only the keys are checked; with the pinned list, the site must
    be in it and the signature valid.
    """
    if advert.client_id != cid:
        return f"it carries client id {advert.client_id}"
    if advert.mask_public_key == advert.encryption_public_key:
        return "it uses one key for masks and share encryption"
    for key in (advert.mask_public_key, advert.encryption_public_key):
        problem = public_key_problem(key)
        if problem is not None:
            return f"it advertises {problem}"
    if sites is None:
        return None
    if advert.site not in sites:
        return f"its site {advert.site!r} is not in the pinned site list"
    message = advert_message(session, advert)
    if not verify_site_signature(sites, advert.site, message, advert.signature):
        return (
            f"its keys are not signed by site {advert.site!r} for this session "
            "(substituted or forged keys)"
        )
    return None


def duplicate_advertisers(book: Mapping[int, AdvertiseKeys]) -> dict[int, str]:
    """Advertisers that share a public key or a site with another; with a reason."""
    key_owners: dict[bytes, list[int]] = {}
    site_owners: dict[str, list[int]] = {}
    for cid, advert in book.items():
        for key in (advert.mask_public_key, advert.encryption_public_key):
            key_owners.setdefault(key, []).append(cid)
        if advert.site:
            site_owners.setdefault(advert.site, []).append(cid)
    found: dict[int, str] = {}
    for owners in key_owners.values():
        for cid in owners if len(owners) > 1 else ():
            found[cid] = f"its public key is also advertised by {sorted(owners)}"
    for site, owners in site_owners.items():
        for cid in owners if len(owners) > 1 else ():
            found[cid] = f"site {site!r} advertises as several clients {sorted(owners)}"
    return found


def check_key_book(
    book: Mapping[int, AdvertiseKeys],
    threshold: int,
    session: bytes,
    sites: PinnedSites | None = None,
) -> None:
    """Raise ``SecAggError`` naming the node unless every entry can be trusted.

    A client calls this on the key book the server broadcasts: with the pinned list
    ``sites``, every key must be signed by its site.
    """
    if len(book) < threshold:
        raise SecAggError(
            f"Only {len(book)} clients advertised keys; the threshold is {threshold}."
        )
    for cid in sorted(book):
        problem = advert_problem(cid, book[cid], session, sites)
        if problem is not None:
            raise SecAggError(f"Key book entry of node {cid} refused: {problem}.")
    duplicates = duplicate_advertisers(book)
    if duplicates:
        cid = min(duplicates)
        raise SecAggError(f"Key book entry of node {cid} refused: {duplicates[cid]}.")


def consistency_quorum(threshold: int, sites: PinnedSites) -> int:
    """Survivor signatures needed: ``max(t, floor(N/2) + 1)`` for N pinned sites."""
    return max(threshold, len(sites) // 2 + 1)


def check_confirmations(
    client_id: int,
    book: Mapping[int, AdvertiseKeys],
    session: bytes,
    survivors: Iterable[int],
    dropped: Iterable[int],
    signatures: Mapping[int, bytes],
    threshold: int,
    sites: PinnedSites,
) -> None:
    """Raise ``SecAggError`` unless ``quorum`` survivors signed this survivor set.

    Every signature must come from a survivor and verify against its pinned site; one
    that does not means the server showed another set to that signer (or forged it).
    """
    alive = set(survivors)
    quorum = consistency_quorum(threshold, sites)
    message = survivors_message(session, alive, dropped)
    for signer in sorted(signatures):
        if signer not in alive:
            raise SecAggError(
                f"Client {client_id}: a survivor-set signature from node {signer}, "
                "which is not a survivor; refusing to reveal shares."
            )
        site = book[signer].site
        if not verify_site_signature(sites, site, message, signatures[signer]):
            raise SecAggError(
                f"Client {client_id}: the signature of node {signer} (site {site!r}) "
                "does not cover the survivor set this client confirmed: the server "
                "showed different survivor sets; refusing to reveal shares."
            )
    if len(signatures) < quorum:
        raise SecAggError(
            f"Client {client_id}: only {len(signatures)} survivors confirmed the "
            f"survivor set {sorted(alive)}; {quorum} needed (the threshold or a "
            f"majority of the {len(sites)} pinned sites); refusing to reveal "
            "shares."
        )
