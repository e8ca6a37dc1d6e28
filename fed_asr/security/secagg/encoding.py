"""Parameters, fixed-point encoding, masks and messages shared by both SecAgg sides.

A float vector is encoded as ``round(x * scale) mod 2^bits`` (uint64); masks are
ChaCha20 keystreams reduced modulo ``2^bits``; pairwise mask seeds come from X25519 +
HKDF bound to the session. The round messages are plain frozen dataclasses.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fed_asr.config import PrivacyConfig

SEED_BYTES = 32


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

    def max_level(self, num_participants: int) -> int:
        """Largest ``|round(x * scale)|`` per client whose sum cannot wrap.

        The sum of ``num_participants`` such encodings stays in
        ``[-2^(bits-1), 2^(bits-1))``, the range :func:`decode_fixed_point` reads.
        """
        return ((1 << (self.bits - 1)) - 1) // num_participants

    def input_bound(self, num_participants: int) -> float:
        """Largest ``|x|`` a client may contribute when ``num_participants`` take part.

        ``bound * scale`` never exceeds :meth:`max_level` (rounded down in floating
        point), so the sum of in-range inputs cannot wrap.

        Raises
        ------
        ValueError
            If ``max_abs`` is set but above that bound, or no value fits.
        """
        level = self.max_level(num_participants)
        if level < 1:
            raise ValueError(
                f"`bits` = {self.bits} cannot hold the sum of {num_participants} "
                "participants."
            )
        limit = level / self.scale
        while limit * self.scale > level:  # exact int/float comparison
            limit = math.nextafter(limit, 0.0)
        if self.max_abs is None:
            return limit
        if self.max_abs > limit:
            raise ValueError(
                f"`max_abs` = {self.max_abs} is too large for {num_participants} "
                f"participants with bits={self.bits} and scale={self.scale}: the sum "
                f"could overflow; use at most {limit:.6g}."
            )
        return self.max_abs

    def for_session(self, threshold: int, bits: int, scale: float) -> SecAggConfig:
        """This client's parameters for a session whose server asks for these.

        The server may raise the threshold above this (the client's own minimum),
        never lower it, and must use the client's own ``bits`` and ``scale``.

        Raises
        ------
        SecAggError
            If the server asks for a lower threshold or other encoding parameters.
        """
        if threshold < self.threshold:
            raise SecAggError(
                f"The server asks for secure-aggregation threshold {threshold}, below "
                f"this node's minimum {self.threshold} (`privacy.secagg_threshold`); "
                "refusing: the threshold may only be raised."
            )
        if bits != self.bits or scale != self.scale:
            raise SecAggError(
                f"The server asks for bits={bits}, scale={scale}; this node is "
                f"configured with `privacy.secagg_bits`={self.bits}, "
                f"`privacy.secagg_scale`={self.scale}; refusing."
            )
        return SecAggConfig(threshold, self.bits, self.scale, self.max_abs)


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


def modulus_mask(bits: int) -> np.uint64:
    """Bit mask ``2^bits - 1`` that reduces a uint64 modulo ``2^bits``."""
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
        If a value is not finite, ``|x| > bound`` or ``round(x * scale)`` falls
        outside the signed ``bits``-bit range (named via ``layout`` if given).
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.rint(values * scale)
    half = float(1 << (bits - 1))
    fits = np.abs(scaled) < half  # False for NaN and inf
    bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > bound) | ~fits)
    if bad.size:
        i = int(bad[0])
        where = layout.locate(i) if layout is not None else f"index {i}"
        raise ValueError(
            f"Input value {where} = {float(values[i])!r} cannot be encoded: secure "
            f"aggregation needs finite values with |x| <= {bound:.6g} (bits={bits}, "
            f"scale={scale}); clip the input, lower `scale` or raise `bits`."
        )
    return scaled.astype(np.int64).view(np.uint64) & modulus_mask(bits)


def decode_fixed_point(encoded: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_fixed_point` for a (summed) uint64 vector."""
    u = np.asarray(encoded, dtype=np.uint64) & modulus_mask(bits)
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
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & modulus_mask(bits)


# ---------------------------------------------------------------------- key helpers
def id_bytes(client_id: int) -> bytes:
    """Big-endian 8-byte encoding of a client id."""
    return struct.pack(">Q", client_id)


def check_client_id(client_id: int) -> None:
    """Raise ``ValueError`` unless ``client_id`` fits in 64 unsigned bits."""
    if not 0 <= client_id < 2**64:
        raise ValueError(f"`client_id` must lie in [0, 2^64), got {client_id}.")


def raw_private(key: X25519PrivateKey) -> bytes:
    """Raw 32 bytes of an X25519 private key."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def raw_public(key: X25519PrivateKey) -> bytes:
    """Raw 32 bytes of the public half of an X25519 private key."""
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def derive_key(secret: bytes, label: bytes, session: bytes, a: int, b: int) -> bytes:
    """HKDF-SHA256 key for the unordered pair ``(a, b)``, bound to ``session``."""
    low, high = sorted((a, b))
    info = b"fed-asr/secagg/v1/" + label + struct.pack(">I", len(session)) + session
    return HKDF(hashes.SHA256(), SEED_BYTES, salt=None, info=info).derive(
        secret + id_bytes(low) + id_bytes(high)
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
    mask = prg_mask(derive_key(shared, b"mask", session, own_id, peer_id), length, bits)
    return mask if own_id < peer_id else (np.uint64(0) - mask) & modulus_mask(bits)


def share_points(participants: Mapping[int, object] | list[int]) -> dict[int, int]:
    """Shamir point of each participant: its rank among the sorted ids, plus one."""
    return {cid: rank + 1 for rank, cid in enumerate(sorted(participants))}


# ------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0: a client's two X25519 public keys (raw 32 bytes each), signed."""

    client_id: int
    mask_public_key: bytes
    encryption_public_key: bytes
    site: str = ""  # pinned site name; empty without site identities
    signature: bytes = b""  # the site's signature of the above, bound to the session


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
