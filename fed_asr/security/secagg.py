"""Secure aggregation of float arrays (SecAgg, Bonawitz et al., CCS 2017), in rounds.

The server learns only the sum of the surviving clients' inputs. A driver (e.g. a Flower
ServerApp) moves the messages; the classes below hold the per-round state::

    server = SecAggServer(config, session)               # one object per aggregation
    clients = {cid: SecAggClient(cid, config, session) for cid in ids}
    book = server.collect_advertisements({c: clients[c].advertise() for c in ids})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    request = server.collect_masked_inputs(
        {c: clients[c].mask_input(arrays[c], inbox[c]) for c in inbox}
    )
    result = server.unmask({c: clients[c].unmask(request) for c in request.survivors})
    result.arrays  # dict name -> summed float64 array

Round 0 (advertise): two X25519 key pairs per client, one for mask agreement and one for
share encryption. Round 1 (share): a self-mask seed ``b_i`` and the mask private key are
Shamir-shared (threshold ``t``) and each share is encrypted with AES-GCM for its
recipient under a key from X25519 + HKDF. Round 2 (masked input): fixed-point encoding
modulo ``2^bits`` plus pairwise masks (ChaCha20 keystreams, ``+`` towards larger ids,
``-`` towards smaller) plus the self mask. Round 3 (unmask): survivors reveal shares of
the survivors' ``b`` and of the dropped clients' mask keys; the server removes all
masks.
See ``docs/security.md`` for the threat model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fed_asr.config import PrivacyConfig
from fed_asr.security.shamir import (
    CHUNK_BYTES,
    ELEMENT_BYTES,
    reconstruct_bytes,
    split_bytes,
)

SEED_BYTES = 32
_SHARE_BYTES = (
    -(-SEED_BYTES // CHUNK_BYTES) * ELEMENT_BYTES
)  # one encoded 32-byte share
_NONCE_BYTES = 12


class SecAggError(RuntimeError):
    """Raised when the protocol cannot proceed: too few clients, bad or forged data."""


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SecAggConfig:
    """Parameters shared by the server and every client of one aggregation.

    Parameters
    ----------
    threshold : int
        Shares needed to reconstruct a secret; also the minimum number of clients that
        must survive every round. At least 2.
    bits : int
        Inputs are summed modulo ``2^bits`` (16..64).
    scale : float
        Fixed-point scale: a float ``x`` is encoded as ``round(x * scale)``.
    max_abs : float | None
        Bound on ``|x|`` of one client's input. ``None`` uses the largest bound for
        which the sum of all participants cannot overflow.
    """

    threshold: int
    bits: int = 62
    scale: float = 2.0**24
    max_abs: float | None = None

    def __post_init__(self) -> None:
        """Check the parameters."""
        if self.threshold < 2:
            raise ValueError(f"`threshold` must be at least 2, got {self.threshold}.")
        if not 16 <= self.bits <= 64:
            raise ValueError(f"`bits` must lie in [16, 64], got {self.bits}.")
        if not self.scale > 0:
            raise ValueError(f"`scale` must be positive, got {self.scale}.")
        if self.max_abs is not None and not self.max_abs > 0:
            raise ValueError(f"`max_abs` must be positive, got {self.max_abs}.")

    @classmethod
    def from_privacy_config(cls, cfg: PrivacyConfig, num_clients: int) -> SecAggConfig:
        """Build from ``privacy.secagg_*`` settings for ``num_clients`` participants."""
        return cls(
            threshold=threshold_from_fraction(num_clients, cfg.secagg_threshold),
            bits=cfg.secagg_bits,
            scale=cfg.secagg_scale,
        )

    def input_bound(self, num_participants: int) -> float:
        """Largest ``|x|`` a client may contribute when ``num_participants`` take part.

        Raises
        ------
        ValueError
            If ``max_abs`` is set but ``num_participants * max_abs * scale`` overflows.
        """
        limit = 2.0 ** (self.bits - 1) / (self.scale * num_participants)
        if self.max_abs is None:
            return limit
        if self.max_abs >= limit:
            raise ValueError(
                f"`max_abs` = {self.max_abs} is too large for {num_participants} "
                f"participants with bits={self.bits} and scale={self.scale}: the sum "
                f"could overflow; use at most {limit:.6g}."
            )
        return self.max_abs


def threshold_from_fraction(num_clients: int, fraction: float) -> int:
    """Threshold ``max(2, ceil(fraction * num_clients))``, at most ``num_clients``.

    Raises
    ------
    ValueError
        If ``fraction`` is outside (0, 1] or fewer than 2 clients take part.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`secagg_threshold` must lie in (0, 1], got {fraction}.")
    if num_clients < 2:
        raise ValueError(
            f"Secure aggregation needs at least 2 clients, got {num_clients}."
        )
    return min(num_clients, max(2, math.ceil(fraction * num_clients - 1e-9)))


# ----------------------------------------------------------------- flatten / encoding
@dataclass(frozen=True)
class ArrayLayout:
    """Names and shapes of a dict of arrays flattened into one vector (sorted names)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        """Total number of elements."""
        return sum(math.prod(shape) for _, shape in self.entries)

    def locate(self, flat_index: int) -> str:
        """Human-readable ``name[i, j]`` of a position in the flat vector."""
        offset = 0
        for name, shape in self.entries:
            n = math.prod(shape)
            if flat_index < offset + n:
                index = np.unravel_index(flat_index - offset, shape)
                return f"{name}[{', '.join(str(int(i)) for i in index)}]"
            offset += n
        raise IndexError(f"Flat index {flat_index} is outside the layout.")

    def to_json(self) -> str:
        """Serialise for transport."""
        return json.dumps([[name, list(shape)] for name, shape in self.entries])

    @classmethod
    def from_json(cls, text: str) -> ArrayLayout:
        """Inverse of :meth:`to_json`."""
        return cls(tuple((name, tuple(shape)) for name, shape in json.loads(text)))


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ArrayLayout]:
    """Concatenate a dict of arrays (sorted by name) into one float64 vector."""
    if not arrays:
        raise ValueError("`arrays` must not be empty.")
    names = sorted(arrays)
    layout = ArrayLayout(tuple((n, tuple(np.shape(arrays[n]))) for n in names))
    vector = np.concatenate(
        [np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names]
    )  # (sum of sizes,)
    return vector, layout


def unflatten_arrays(vector: np.ndarray, layout: ArrayLayout) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays."""
    if vector.shape != (layout.size,):
        raise ValueError(
            f"`vector` must have shape ({layout.size},) for this layout, "
            f"got {vector.shape}."
        )
    out, offset = {}, 0
    for name, shape in layout.entries:
        n = math.prod(shape)
        out[name] = vector[offset : offset + n].reshape(shape).copy()
        offset += n
    return out


def _modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def encode_fixed_point(
    values: np.ndarray,
    scale: float,
    bits: int,
    bound: float,
    layout: ArrayLayout | None = None,
) -> np.ndarray:
    """Encode floats as ``round(x * scale) mod 2^bits`` (uint64).

    Raises
    ------
    ValueError
        If a value is not finite or ``|x| > bound`` (named via ``layout`` if given).
    """
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > bound))
    if bad.size:
        i = int(bad[0])
        where = layout.locate(i) if layout is not None else f"index {i}"
        raise ValueError(
            f"Input value {where} = {float(values[i])!r} cannot be encoded: secure "
            f"aggregation needs finite values with |x| <= {bound:.6g} (bits={bits}, "
            f"scale={scale}); clip the input, lower `scale` or raise `bits`."
        )
    scaled = np.rint(values * scale).astype(np.int64)
    return scaled.view(np.uint64) & _modulus_mask(bits)


def decode_fixed_point(encoded: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_fixed_point` for a (summed) uint64 vector."""
    u = np.asarray(encoded, dtype=np.uint64) & _modulus_mask(bits)
    if bits == 64:
        signed = u.view(np.int64)
    else:
        signed = u.astype(np.int64)
        signed[signed >= (1 << (bits - 1))] -= 1 << bits
    return signed.astype(np.float64) / scale


def prg_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Uniform vector modulo ``2^bits`` from a ChaCha20 keystream keyed by ``seed``."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & _modulus_mask(bits)


# ---------------------------------------------------------------------- key helpers
def _id_bytes(client_id: int) -> bytes:
    return struct.pack(">Q", client_id)


def _check_id(client_id: int) -> None:
    if not 0 <= client_id < 2**64:
        raise ValueError(f"`client_id` must lie in [0, 2^64), got {client_id}.")


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _derive(secret: bytes, label: bytes, session: bytes, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    info = b"fed-asr/secagg/v1/" + label + struct.pack(">I", len(session)) + session
    return HKDF(hashes.SHA256(), SEED_BYTES, salt=None, info=info).derive(
        secret + _id_bytes(low) + _id_bytes(high)
    )


def pairwise_mask(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    own_id: int,
    peer_id: int,
    session: bytes,
    length: int,
    bits: int,
) -> np.ndarray:
    """Signed pairwise mask of ``own_id`` towards ``peer_id`` (``+`` if own < peer)."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    mask = prg_mask(_derive(shared, b"mask", session, own_id, peer_id), length, bits)
    return mask if own_id < peer_id else (np.uint64(0) - mask) & _modulus_mask(bits)


def share_points(participants: Mapping[int, object] | list[int]) -> dict[int, int]:
    """Shamir point of each participant: its rank among the sorted ids, plus one."""
    return {cid: rank + 1 for rank, cid in enumerate(sorted(participants))}


# ------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0: a client's two X25519 public keys (raw 32 bytes each)."""

    client_id: int
    mask_public_key: bytes
    encryption_public_key: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Round 2: a client's masked vector (uint64, values < 2^bits) and its layout."""

    client_id: int
    vector: np.ndarray
    layout: ArrayLayout | None = None


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3 request: clients whose masked input arrived and those that dropped."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3 reply: shares of survivors' self-mask seeds and dropped clients' keys."""

    client_id: int
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    mask_key_shares: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class SecAggResult:
    """Unmasked sum of the contributors' inputs."""

    vector: np.ndarray
    arrays: dict[str, np.ndarray] | None
    contributors: tuple[int, ...]


def _check_key_book(book: Mapping[int, AdvertiseKeys], threshold: int) -> None:
    if len(book) < threshold:
        raise SecAggError(
            f"Only {len(book)} clients advertised keys; the threshold is {threshold}."
        )
    keys = []
    for cid, advert in book.items():
        if advert.client_id != cid:
            raise SecAggError(f"Key entry {cid} carries client id {advert.client_id}.")
        for key in (advert.mask_public_key, advert.encryption_public_key):
            if len(key) != 32:
                raise SecAggError(
                    f"Client {cid} sent a public key of {len(key)} bytes."
                )
            keys.append(key)
    if len(set(keys)) != len(keys):
        raise SecAggError("Two advertised public keys are identical; aborting.")


# --------------------------------------------------------------------------- client
class SecAggClient:
    """One client's side of the protocol; call the four rounds in order.

    Parameters
    ----------
    client_id : int
        Unique id in [0, 2^64) (e.g. the Flower node id).
    config : SecAggConfig
        Shared protocol parameters.
    session : bytes
        Identifier of this aggregation (e.g. ``b"<run-id>/<round>"``); bound into every
        key derivation and ciphertext so nothing carries over between sessions.
    """

    def __init__(
        self, client_id: int, config: SecAggConfig, session: bytes = b""
    ) -> None:
        _check_id(client_id)
        self.client_id = client_id
        self.config = config
        self.session = session
        self._mask_key = X25519PrivateKey.generate()
        self._enc_key = X25519PrivateKey.generate()
        self._seed = os.urandom(SEED_BYTES)
        self._stage = 0
        self._book: dict[int, AdvertiseKeys] = {}
        self._points: dict[int, int] = {}
        self._seed_shares: dict[int, bytes] = {}  # owner -> share held by this client
        self._key_shares: dict[int, bytes] = {}
        self._peers: tuple[int, ...] = ()  # U2 without self

    def to_bytes(self) -> bytes:
        """Serialise the client's secret state (to keep it in the node's own state).

        The bytes hold private keys, the self-mask seed and received shares: keep them
        on the node (Flower's ``context.state``), never put them in a reply.
        """
        state = {
            "client_id": self.client_id,
            "config": [
                self.config.threshold,
                self.config.bits,
                self.config.scale,
                self.config.max_abs,
            ],
            "session": self.session.hex(),
            "mask_key": _raw_private(self._mask_key).hex(),
            "enc_key": _raw_private(self._enc_key).hex(),
            "seed": self._seed.hex(),
            "stage": self._stage,
            "book": [
                [a.client_id, a.mask_public_key.hex(), a.encryption_public_key.hex()]
                for a in self._book.values()
            ],
            "seed_shares": {str(k): v.hex() for k, v in self._seed_shares.items()},
            "key_shares": {str(k): v.hex() for k, v in self._key_shares.items()},
            "peers": list(self._peers),
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        """Inverse of :meth:`to_bytes`."""
        state = json.loads(data.decode())
        threshold, bits, scale, max_abs = state["config"]
        client = cls(
            int(state["client_id"]),
            SecAggConfig(int(threshold), int(bits), float(scale), max_abs),
            bytes.fromhex(state["session"]),
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
            int(cid): AdvertiseKeys(int(cid), bytes.fromhex(m), bytes.fromhex(e))
            for cid, m, e in state["book"]
        }
        client._points = share_points(list(client._book)) if client._book else {}
        client._seed_shares = {
            int(k): bytes.fromhex(v) for k, v in state["seed_shares"].items()
        }
        client._key_shares = {
            int(k): bytes.fromhex(v) for k, v in state["key_shares"].items()
        }
        client._peers = tuple(int(p) for p in state["peers"])
        return client

    def _advance(self, expected: int, name: str) -> None:
        if self._stage != expected:
            raise SecAggError(
                f"Client {self.client_id}: `{name}` called at stage {self._stage}, "
                f"expected stage {expected}."
            )
        self._stage += 1

    def _aad(self, sender: int, recipient: int) -> bytes:
        return b"share" + self.session + _id_bytes(sender) + _id_bytes(recipient)

    def _share_key(self, peer: int) -> AESGCM:
        peer_pub = X25519PublicKey.from_public_bytes(
            self._book[peer].encryption_public_key
        )
        shared = self._enc_key.exchange(peer_pub)
        return AESGCM(_derive(shared, b"share-key", self.session, self.client_id, peer))

    def advertise(self) -> AdvertiseKeys:
        """Round 0: the public keys to send to the server."""
        self._advance(0, "advertise")
        return AdvertiseKeys(
            self.client_id, _raw_public(self._mask_key), _raw_public(self._enc_key)
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
            If the key book is too small, malformed or misses this client's keys.
        """
        self._advance(1, "share_keys")
        _check_key_book(public_keys, self.config.threshold)
        own = public_keys.get(self.client_id)
        if own is None or own != AdvertiseKeys(
            self.client_id, _raw_public(self._mask_key), _raw_public(self._enc_key)
        ):
            raise SecAggError(
                f"Client {self.client_id}: the key book lacks or alters its own keys."
            )
        self._book = dict(public_keys)
        self._points = share_points(list(public_keys))
        xs = list(self._points.values())
        seed_shares = split_bytes(self._seed, xs, self.config.threshold)
        key_shares = split_bytes(
            _raw_private(self._mask_key), xs, self.config.threshold
        )
        out = {}
        for peer, x in self._points.items():
            if peer == self.client_id:
                self._seed_shares[peer] = seed_shares[x]
                self._key_shares[peer] = key_shares[x]
                continue
            plaintext = (
                _id_bytes(self.client_id)
                + _id_bytes(peer)
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
                plaintext[:16] != _id_bytes(sender) + _id_bytes(self.client_id)
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
        return MaskedInput(self.client_id, masked & _modulus_mask(bits), layout)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: reveal seed shares of survivors and mask-key shares of the dropped.

        Raises
        ------
        SecAggError
            If the request is inconsistent with this client's view, names this client
            as dropped, or has fewer survivors than the threshold.
        """
        self._advance(3, "unmask")
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
        return UnmaskResponse(
            self.client_id,
            seed_shares={u: self._seed_shares[u] for u in sorted(survivors)},
            mask_key_shares={v: self._key_shares[v] for v in sorted(dropped)},
        )


# --------------------------------------------------------------------------- server
class SecAggServer:
    """Server side: routes messages between rounds and removes the masks.

    Parameters
    ----------
    config : SecAggConfig
        Shared protocol parameters.
    session : bytes
        The same session identifier the clients use.
    """

    def __init__(self, config: SecAggConfig, session: bytes = b"") -> None:
        self.config = config
        self.session = session
        self._book: dict[int, AdvertiseKeys] = {}
        self._group: tuple[int, ...] = ()  # U2: completed round 1
        self._inputs: dict[int, MaskedInput] = {}
        self._request: UnmaskRequest | None = None

    def collect_advertisements(
        self, adverts: Mapping[int, AdvertiseKeys]
    ) -> dict[int, AdvertiseKeys]:
        """Round 0: check the advertised keys; returns the key book to broadcast."""
        _check_key_book(adverts, self.config.threshold)
        self._book = dict(adverts)
        return dict(self._book)

    def route_shares(
        self, shares: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Round 1: route ciphertexts; returns each sender's inbox, keyed by recipient.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` clients sent shares, or a sender is unknown or
            omitted a recipient.
        """
        for sender, outbox in shares.items():
            if sender not in self._book:
                raise SecAggError(
                    f"Shares from client {sender}, which did not advertise."
                )
            missing = set(self._book) - set(outbox) - {sender}
            if missing:
                raise SecAggError(
                    f"Client {sender} sent no share for {sorted(missing)}."
                )
        if len(shares) < self.config.threshold:
            raise SecAggError(
                f"Only {len(shares)} clients sent shares; the threshold is "
                f"{self.config.threshold}."
            )
        self._group = tuple(sorted(shares))
        return {
            recipient: {s: shares[s][recipient] for s in self._group if s != recipient}
            for recipient in self._group
        }

    def collect_masked_inputs(self, inputs: Mapping[int, MaskedInput]) -> UnmaskRequest:
        """Round 2: keep the masked vectors; returns the request to send to survivors.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` inputs arrived, a sender is not in the round-1
            group, or the vectors disagree in size, layout or range.
        """
        if len(inputs) < self.config.threshold:
            raise SecAggError(
                f"Only {len(inputs)} masked inputs arrived; the threshold is "
                f"{self.config.threshold}. Cannot aggregate."
            )
        first = next(iter(inputs.values()))
        limit = np.uint64((1 << self.config.bits) - 1)
        for cid, item in inputs.items():
            if cid not in self._group or item.client_id != cid:
                raise SecAggError(f"Masked input from client {cid} is not expected.")
            if (
                item.vector.dtype != np.uint64
                or item.vector.shape != first.vector.shape
            ):
                raise SecAggError(
                    f"Masked input of client {cid} has dtype {item.vector.dtype} and "
                    f"shape {item.vector.shape}; expected uint64 {first.vector.shape}."
                )
            if item.layout != first.layout:
                raise SecAggError(f"Masked input of client {cid} has another layout.")
            if item.vector.size and item.vector.max() > limit:
                raise SecAggError(f"Masked input of client {cid} exceeds 2^bits.")
        self._inputs = dict(inputs)
        survivors = tuple(sorted(inputs))
        dropped = tuple(c for c in self._group if c not in inputs)
        self._request = UnmaskRequest(survivors, dropped)
        return self._request

    def unmask(self, responses: Mapping[int, UnmaskResponse]) -> SecAggResult:
        """Round 3: reconstruct the secrets and return the sum of the survivors' inputs.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` responses arrived, one is malformed, or a
            reconstructed mask key does not match its advertised public key.
        """
        if self._request is None:
            raise SecAggError("`unmask` called before `collect_masked_inputs`.")
        request, t, bits = self._request, self.config.threshold, self.config.bits
        if len(responses) < t:
            raise SecAggError(
                f"Only {len(responses)} clients answered the unmask request; "
                f"{t} shares are needed to reconstruct each secret."
            )
        points = share_points(list(self._book))
        for cid, resp in responses.items():
            if cid not in request.survivors or resp.client_id != cid:
                raise SecAggError(f"Unmask response from client {cid} is not expected.")
            if set(resp.seed_shares) != set(request.survivors) or set(
                resp.mask_key_shares
            ) != set(request.dropped):
                raise SecAggError(f"Unmask response of client {cid} is incomplete.")

        length = next(iter(self._inputs.values())).vector.size
        total = np.zeros(length, dtype=np.uint64)
        for item in self._inputs.values():
            total = total + item.vector
        for u in request.survivors:
            shares = {points[c]: r.seed_shares[u] for c, r in responses.items()}
            seed = reconstruct_bytes(shares, t, SEED_BYTES)
            total = total - prg_mask(seed, length, bits)
        for v in request.dropped:
            shares = {points[c]: r.mask_key_shares[v] for c, r in responses.items()}
            key = X25519PrivateKey.from_private_bytes(
                reconstruct_bytes(shares, t, SEED_BYTES)
            )
            if _raw_public(key) != self._book[v].mask_public_key:
                raise SecAggError(
                    f"Reconstructed mask key of dropped client {v} does not match its "
                    "advertised public key: inconsistent shares."
                )
            for u in request.survivors:
                # Client u added its mask towards v; the same mask from v's side is its
                # negation, so adding v's view cancels u's term.
                total = total + pairwise_mask(
                    key, self._book[u].mask_public_key, v, u, self.session, length, bits
                )
        vector = decode_fixed_point(total, self.config.scale, bits)
        layout = next(iter(self._inputs.values())).layout
        arrays = unflatten_arrays(vector, layout) if layout is not None else None
        return SecAggResult(vector, arrays, request.survivors)
