"""Client side of secure aggregation: the four rounds of one participant."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fed_asr.security.secagg.authentication import (
    advert_message,
    check_confirmations,
    check_key_book,
    survivors_message,
)
from fed_asr.security.secagg.encoding import (
    SEED_BYTES,
    AdvertiseKeys,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    UnmaskRequest,
    UnmaskResponse,
    check_client_id,
    derive_key,
    encode_fixed_point,
    flatten_arrays,
    id_bytes,
    modulus_mask,
    pairwise_mask,
    prg_mask,
    raw_private,
    raw_public,
    share_points,
)
from fed_asr.security.shamir import CHUNK_BYTES, ELEMENT_BYTES, split_bytes
from fed_asr.security.site_identity import SiteIdentity

_SHARE_BYTES = (
    -(-SEED_BYTES // CHUNK_BYTES) * ELEMENT_BYTES
)  # one encoded 32-byte share
_NONCE_BYTES = 12


class SecAggClient:
    """One client's side of the protocol; call the five rounds in order.

    Parameters
    ----------
    client_id : int
        Unique id in [0, 2^64) (e.g. the Flower node id).
    config : SecAggConfig
        Shared protocol parameters.
    session : bytes
        Identifier of this aggregation (e.g. ``b"<run-id>/<round>"``); bound into every
        key derivation and ciphertext so nothing carries over between sessions.
    identity : SiteIdentity | None
        This site's identity key and the pinned site list. With it, the client signs
        its keys and its survivor set and trusts only peers whose keys and survivor
        sets are signed by pinned sites; without it, the server is trusted to relay
        keys honestly (``docs/security.md``).
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        session: bytes = b"",
        identity: SiteIdentity | None = None,
    ) -> None:
        check_client_id(client_id)
        self.client_id = client_id
        self.config = config
        self.session = session
        self.identity = identity
        self._mask_key = X25519PrivateKey.generate()
        self._enc_key = X25519PrivateKey.generate()
        self._seed = os.urandom(SEED_BYTES)
        self._stage = 0
        self._book: dict[int, AdvertiseKeys] = {}
        self._points: dict[int, int] = {}
        self._seed_shares: dict[int, bytes] = {}  # owner -> share held by this client
        self._key_shares: dict[int, bytes] = {}
        self._peers: tuple[int, ...] = ()  # U2 without self
        self._confirmed: UnmaskRequest | None = None  # survivor set this client signed

    def to_bytes(self) -> bytes:
        """Serialise the client's secret state (to keep it in the node's own state).

        The bytes hold private keys, the self-mask seed and received shares: keep them
        on the node (Flower's ``context.state``), never put them in a reply. The
        identity key is not included: pass it again to :meth:`from_bytes`.
        """
        confirmed = self._confirmed
        state = {
            "client_id": self.client_id,
            "config": [
                self.config.threshold,
                self.config.bits,
                self.config.scale,
                self.config.max_abs,
            ],
            "session": self.session.hex(),
            "mask_key": raw_private(self._mask_key).hex(),
            "enc_key": raw_private(self._enc_key).hex(),
            "seed": self._seed.hex(),
            "stage": self._stage,
            "book": [
                [
                    a.client_id,
                    a.mask_public_key.hex(),
                    a.encryption_public_key.hex(),
                    a.site,
                    a.signature.hex(),
                ]
                for a in self._book.values()
            ],
            "seed_shares": {str(k): v.hex() for k, v in self._seed_shares.items()},
            "key_shares": {str(k): v.hex() for k, v in self._key_shares.items()},
            "peers": list(self._peers),
            "confirmed": (
                None
                if confirmed is None
                else [list(confirmed.survivors), list(confirmed.dropped)]
            ),
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(
        cls, data: bytes, identity: SiteIdentity | None = None
    ) -> SecAggClient:
        """Inverse of :meth:`to_bytes`, with this site's ``identity`` (if any)."""
        state = json.loads(data.decode())
        threshold, bits, scale, max_abs = state["config"]
        client = cls(
            int(state["client_id"]),
            SecAggConfig(int(threshold), int(bits), float(scale), max_abs),
            bytes.fromhex(state["session"]),
            identity,
        )
        client._mask_key = X25519PrivateKey.from_private_bytes(
            bytes.fromhex(state["mask_key"])
        )
        client._enc_key = X25519PrivateKey.from_private_bytes(
            bytes.fromhex(state["enc_key"])
        )
        client._seed = bytes.fromhex(state["seed"])
        client._stage = int(state["stage"])
        client._book = {
            int(cid): AdvertiseKeys(
                int(cid), bytes.fromhex(m), bytes.fromhex(e), site, bytes.fromhex(sig)
            )
            for cid, m, e, site, sig in state["book"]
        }
        client._points = share_points(list(client._book)) if client._book else {}
        client._seed_shares = {
            int(k): bytes.fromhex(v) for k, v in state["seed_shares"].items()
        }
        client._key_shares = {
            int(k): bytes.fromhex(v) for k, v in state["key_shares"].items()
        }
        client._peers = tuple(int(p) for p in state["peers"])
        if state["confirmed"] is not None:
            survivors, dropped = state["confirmed"]
            client._confirmed = UnmaskRequest(tuple(survivors), tuple(dropped))
        return client

    def _advance(self, expected: int, name: str) -> None:
        if self._stage != expected:
            raise SecAggError(
                f"Client {self.client_id}: `{name}` called at stage {self._stage}, "
                f"expected stage {expected}."
            )
        self._stage += 1

    def _aad(self, sender: int, recipient: int) -> bytes:
        return b"share" + self.session + id_bytes(sender) + id_bytes(recipient)

    def _share_key(self, peer: int) -> AESGCM:
        peer_pub = X25519PublicKey.from_public_bytes(
            self._book[peer].encryption_public_key
        )
        shared = self._enc_key.exchange(peer_pub)
        return AESGCM(
            derive_key(shared, b"share-key", self.session, self.client_id, peer)
        )

    def _own_advert(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            self.client_id,
            raw_public(self._mask_key),
            raw_public(self._enc_key),
            self.identity.name if self.identity is not None else "",
        )

    def advertise(self) -> AdvertiseKeys:
        """Round 0: the public keys to send (signed when the site has an identity)."""
        self._advance(0, "advertise")
        advert = self._own_advert()
        if self.identity is None:
            return advert
        signature = self.identity.sign(advert_message(self.session, advert))
        return AdvertiseKeys(
            advert.client_id,
            advert.mask_public_key,
            advert.encryption_public_key,
            advert.site,
            signature,
        )

    def share_keys(self, public_keys: Mapping[int, AdvertiseKeys]) -> dict[int, bytes]:
        """Round 1: encrypted Shamir shares of the self-mask seed and mask key.

        Parameters
        ----------
        public_keys : Mapping[int, AdvertiseKeys]
            Every advertising client's keys, as broadcast by the server.

        Returns
        -------
        dict[int, bytes]
            Ciphertext per recipient id (all other advertising clients).

        Raises
        ------
        SecAggError
            If the key book is too small, misses or alters this client's keys, or
            holds an entry that cannot be trusted (invalid or low-order key, with a
            site identity: unsigned, substituted or of an unpinned site); the message
            names the node. Nothing is released then.
        """
        self._advance(1, "share_keys")
        own = public_keys.get(self.client_id)
        if own is None or replace(own, signature=b"") != self._own_advert():
            raise SecAggError(
                f"Client {self.client_id}: the key book lacks or alters its own keys."
            )
        sites = self.identity.sites if self.identity is not None else None
        check_key_book(public_keys, self.config.threshold, self.session, sites)
        self._book = dict(public_keys)
        self._points = share_points(list(public_keys))
        xs = list(self._points.values())
        seed_shares = split_bytes(self._seed, xs, self.config.threshold)
        key_shares = split_bytes(raw_private(self._mask_key), xs, self.config.threshold)
        out = {}
        for peer, x in self._points.items():
            if peer == self.client_id:
                self._seed_shares[peer] = seed_shares[x]
                self._key_shares[peer] = key_shares[x]
                continue
            plaintext = (
                id_bytes(self.client_id)
                + id_bytes(peer)
                + seed_shares[x]
                + key_shares[x]
            )
            nonce = os.urandom(_NONCE_BYTES)
            aad = self._aad(self.client_id, peer)
            out[peer] = nonce + self._share_key(peer).encrypt(nonce, plaintext, aad)
        return out

    def mask_input(
        self,
        data: Mapping[str, np.ndarray] | np.ndarray,
        ciphertexts: Mapping[int, bytes],
    ) -> MaskedInput:
        """Round 2: decrypt the received shares and mask the fixed-point input.

        Parameters
        ----------
        data : Mapping[str, np.ndarray] | np.ndarray
            A dict of float arrays (flattened with :func:`flatten_arrays`) or a 1-D
            float vector.
        ciphertexts : Mapping[int, bytes]
            Ciphertexts addressed to this client, by sender id. The senders are the
            clients that completed round 1.

        Returns
        -------
        MaskedInput
            The masked uint64 vector to send.

        Raises
        ------
        SecAggError
            If a ciphertext fails authentication or too few peers remain.
        ValueError
            If an input value is not finite or outside the encodable range.
        """
        self._advance(2, "mask_input")
        if len(ciphertexts) + 1 < self.config.threshold:
            raise SecAggError(
                f"Client {self.client_id}: shares arrived from {len(ciphertexts)} "
                f"peers; {self.config.threshold - 1} needed to meet the threshold."
            )
        for sender, blob in ciphertexts.items():
            if sender not in self._book or sender == self.client_id:
                raise SecAggError(f"Ciphertext from unknown sender {sender}; refused.")
            nonce, body = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
            try:
                plaintext = self._share_key(sender).decrypt(
                    nonce, body, self._aad(sender, self.client_id)
                )
            except InvalidTag as err:
                raise SecAggError(
                    f"Client {self.client_id}: the share ciphertext from client "
                    f"{sender} failed authentication (tampered or misrouted); refused."
                ) from err
            if (
                plaintext[:16] != id_bytes(sender) + id_bytes(self.client_id)
                or len(plaintext) != 16 + 2 * _SHARE_BYTES
            ):
                raise SecAggError(f"Share from client {sender} is malformed; refused.")
            self._seed_shares[sender] = plaintext[16 : 16 + _SHARE_BYTES]
            self._key_shares[sender] = plaintext[16 + _SHARE_BYTES :]
        self._peers = tuple(sorted(ciphertexts))

        if isinstance(data, np.ndarray):
            vector, layout = np.asarray(data, dtype=np.float64).reshape(-1), None
        else:
            vector, layout = flatten_arrays(data)
        bits = self.config.bits
        bound = self.config.input_bound(len(self._book))
        masked = encode_fixed_point(vector, self.config.scale, bits, bound, layout)
        masked = masked + prg_mask(self._seed, vector.size, bits)
        for peer in self._peers:
            masked = masked + pairwise_mask(
                self._mask_key,
                self._book[peer].mask_public_key,
                self.client_id,
                peer,
                self.session,
                vector.size,
                bits,
            )
        return MaskedInput(self.client_id, masked & modulus_mask(bits), layout)

    def confirm(self, request: UnmaskRequest) -> bytes:
        """Round 3 (consistency check): sign the survivor set the server announces.

        Returns
        -------
        bytes
            This site's signature of ``(session, survivors, dropped)``; empty without
            a site identity.

        Raises
        ------
        SecAggError
            If the request is inconsistent with this client's view, names this client
            as dropped, or has fewer survivors than the threshold.
        """
        self._advance(3, "confirm")
        survivors, dropped = set(request.survivors), set(request.dropped)
        group = set(self._peers) | {self.client_id}
        if survivors & dropped or survivors | dropped != group:
            raise SecAggError(
                f"Client {self.client_id}: survivors {sorted(survivors)} and dropped "
                f"{sorted(dropped)} must partition the round-1 group {sorted(group)}."
            )
        if self.client_id not in survivors:
            raise SecAggError(
                f"Client {self.client_id} is listed as dropped; refusing."
            )
        if len(survivors) < self.config.threshold:
            raise SecAggError(
                f"Only {len(survivors)} survivors; the threshold is "
                f"{self.config.threshold}. Refusing to reveal shares."
            )
        self._confirmed = UnmaskRequest(
            tuple(sorted(survivors)), tuple(sorted(dropped))
        )
        if self.identity is None:
            return b""
        return self.identity.sign(survivors_message(self.session, survivors, dropped))

    def unmask(
        self, request: UnmaskRequest, signatures: Mapping[int, bytes] | None = None
    ) -> UnmaskResponse:
        """Round 4: reveal seed shares of survivors and mask-key shares of the dropped.

        Parameters
        ----------
        request : UnmaskRequest
            Must be the survivor set this client confirmed.
        signatures : Mapping[int, bytes] | None
            The survivors' signatures of that set, as forwarded by the server (checked
            with a site identity: at least ``max(t, floor(N/2) + 1)`` valid ones).

        Raises
        ------
        SecAggError
            If the request differs from the confirmed set, or (with a site identity) a
            signature is invalid or too few survivors signed; nothing is revealed.
        """
        self._advance(4, "unmask")
        confirmed = self._confirmed
        asked = UnmaskRequest(
            tuple(sorted(request.survivors)), tuple(sorted(request.dropped))
        )
        if confirmed is None or asked != confirmed:
            raise SecAggError(
                f"Client {self.client_id}: the unmask request differs from the "
                "survivor set this client confirmed; refusing to reveal shares."
            )
        if self.identity is not None:
            check_confirmations(
                self.client_id,
                self._book,
                self.session,
                confirmed.survivors,
                confirmed.dropped,
                signatures or {},
                self.config.threshold,
                self.identity.sites,
            )
        return UnmaskResponse(
            self.client_id,
            seed_shares={u: self._seed_shares[u] for u in confirmed.survivors},
            mask_key_shares={v: self._key_shares[v] for v in confirmed.dropped},
        )
