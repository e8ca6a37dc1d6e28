"""Shamir secret sharing over the prime field GF(2^127 - 1).

A secret integer ``s < P`` is the constant term of a random polynomial of degree
``threshold - 1``; participant ``x`` (a non-zero field element) receives ``f(x)``. Any
``threshold`` shares recover ``s`` by Lagrange interpolation at 0; fewer reveal nothing
about it (information-theoretic secrecy). Byte strings longer than the field (keys and
seeds of 32 bytes) are split into 15-byte chunks, each shared with its own polynomial
at the same points.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**127 - 1
"""The Mersenne prime modulus of the field."""

CHUNK_BYTES = 15
"""Bytes per field element when sharing byte strings (120 bits < 127)."""

ELEMENT_BYTES = 16
"""Bytes of one encoded field element (big-endian)."""


class ShamirError(ValueError):
    """Raised when shares are malformed or too few to reconstruct a secret."""


def _check_points(xs: Sequence[int], threshold: int) -> None:
    if threshold < 1:
        raise ShamirError(f"`threshold` must be at least 1, got {threshold}.")
    if len(xs) < threshold:
        raise ShamirError(
            f"`threshold` ({threshold}) exceeds the number of share points ({len(xs)})."
        )
    if len(set(xs)) != len(xs):
        raise ShamirError(f"Share points must be distinct, got {sorted(xs)}.")
    for x in xs:
        if not 0 < x < PRIME:
            raise ShamirError(f"Share point must lie in [1, 2^127 - 2], got {x}.")


def split_secret(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Share an integer secret among the points ``xs``.

    Parameters
    ----------
    secret : int
        The secret, in ``[0, PRIME)``.
    xs : Sequence[int]
        Distinct non-zero share points, one per recipient.
    threshold : int
        Number of shares needed to reconstruct.

    Returns
    -------
    dict[int, int]
        Share ``f(x)`` for each point ``x``.

    Raises
    ------
    ShamirError
        If the secret is out of range, the points are invalid or too few.
    """
    if not 0 <= secret < PRIME:
        raise ShamirError(f"`secret` must lie in [0, 2^127 - 1), got {secret}.")
    _check_points(xs, threshold)
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        value = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            value = (value * x + coefficient) % PRIME
        shares[x] = value
    return shares


def reconstruct_secret(shares: Mapping[int, int], threshold: int) -> int:
    """Recover a secret from at least ``threshold`` shares by Lagrange interpolation.

    Parameters
    ----------
    shares : Mapping[int, int]
        Share value per share point.
    threshold : int
        The threshold the secret was shared with; the first ``threshold`` points (in
        sorted order) are used.

    Returns
    -------
    int
        The secret ``f(0)``.

    Raises
    ------
    ShamirError
        If fewer than ``threshold`` shares are given or a point is invalid.
    """
    points = sorted(shares)
    _check_points(points, threshold)
    points = points[:threshold]
    secret = 0
    for i in points:
        numerator, denominator = 1, 1
        for j in points:
            if j != i:
                numerator = numerator * (-j) % PRIME
                denominator = denominator * (i - j) % PRIME
        lagrange = numerator * pow(denominator, -1, PRIME) % PRIME
        secret = (secret + (shares[i] % PRIME) * lagrange) % PRIME
    return secret


def split_bytes(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Share a byte string; each share is an opaque byte string of fixed length.

    Parameters
    ----------
    secret : bytes
        The secret (any length, e.g. a 32-byte key).
    xs : Sequence[int]
        Distinct non-zero share points.
    threshold : int
        Number of shares needed to reconstruct.

    Returns
    -------
    dict[int, bytes]
        Encoded share per point: ``ceil(len / 15)`` field elements of 16 bytes each.
    """
    chunks = [
        int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
        for i in range(0, len(secret), CHUNK_BYTES)
    ]
    per_chunk = [split_secret(chunk, xs, threshold) for chunk in chunks]
    return {
        x: b"".join(shares[x].to_bytes(ELEMENT_BYTES, "big") for shares in per_chunk)
        for x in xs
    }


def reconstruct_bytes(
    shares: Mapping[int, bytes], threshold: int, length: int
) -> bytes:
    """Recover a byte string of ``length`` bytes shared with :func:`split_bytes`.

    Raises
    ------
    ShamirError
        If the shares have the wrong size or are too few.
    """
    n_chunks = -(-length // CHUNK_BYTES)
    expected = n_chunks * ELEMENT_BYTES
    for x, share in shares.items():
        if len(share) != expected:
            raise ShamirError(
                f"Share at point {x} has {len(share)} bytes, expected {expected} "
                f"for a secret of {length} bytes."
            )
    out = bytearray()
    for c in range(n_chunks):
        elements = {
            x: int.from_bytes(share[c * ELEMENT_BYTES : (c + 1) * ELEMENT_BYTES], "big")
            for x, share in shares.items()
        }
        chunk_len = min(CHUNK_BYTES, length - c * CHUNK_BYTES)
        value = reconstruct_secret(elements, threshold)
        if value >= 256**chunk_len:
            raise ShamirError(
                f"Reconstructed chunk {c} does not fit in {chunk_len} bytes: the "
                "shares are inconsistent."
            )
        out += value.to_bytes(chunk_len, "big")
    return bytes(out)
