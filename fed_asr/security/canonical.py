"""Canonical, typed byte encoding of the values a signature covers.

Every value is written as a one-byte type tag followed by its length-prefixed payload,
so no two different values (of the same or of different types) share an encoding:

=========  ===  ============================================================
type       tag  payload
=========  ===  ============================================================
bool       ``?``  one byte, 0 or 1
int        ``i``  length-prefixed big-endian two's complement (any size)
float      ``f``  8 bytes, IEEE 754 binary64 big-endian (bit pattern kept)
str        ``s``  length-prefixed UTF-8
bytes      ``y``  length-prefixed raw bytes
list       ``l``  8-byte element count, then each element encoded
mapping    ``m``  8-byte entry count, then per key in sorted order the
                  length-prefixed UTF-8 key and the encoded value
=========  ===  ============================================================

Lengths and counts are unsigned 64-bit big-endian. Arrays are written as their name,
dtype string, shape and raw little-endian C-order bytes, in sorted-name order. The
writers stream into a hash (anything with ``update(bytes)``), so large adapters are
never copied into one buffer. This module never imports Flower.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Protocol

import numpy as np


class Sink(Protocol):
    """Where encoded bytes go (``hashlib`` objects qualify)."""

    def update(self, data: bytes, /) -> None:
        """Append ``data``."""


def field(data: bytes) -> bytes:
    """``data`` prefixed with its length (8 bytes, big-endian)."""
    return struct.pack(">Q", len(data)) + data


def _int_bytes(value: int) -> bytes:
    length = (value + (value < 0)).bit_length() // 8 + 1
    return value.to_bytes(length, "big", signed=True)


def encode_value(value: object, where: str) -> bytes:
    """Typed canonical encoding of one ConfigRecord / MetricRecord value.

    Parameters
    ----------
    value : object
        A bool, int, float, str or bytes, or a list of them.
    where : str
        Names the value in the error message (record and key).

    Returns
    -------
    bytes
        Tag and length-prefixed payload.

    Raises
    ------
    TypeError
        The value is of another type.
    """
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"?" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"i" + field(_int_bytes(value))
    if isinstance(value, float):
        return b"f" + struct.pack(">d", value)
    if isinstance(value, str):
        return b"s" + field(value.encode("utf-8"))
    if isinstance(value, bytes | bytearray):
        return b"y" + field(bytes(value))
    if isinstance(value, list | tuple):
        items = b"".join(
            encode_value(item, f"{where}[{i}]") for i, item in enumerate(value)
        )
        return b"l" + struct.pack(">Q", len(value)) + items
    raise TypeError(
        f"{where} is a {type(value).__name__}; only bool, int, float, str, bytes and "
        "lists of them can be signed."
    )


def write_values(sink: Sink, values: Mapping[str, object], where: str) -> None:
    """Write a mapping of values (a ConfigRecord or MetricRecord), keys sorted."""
    sink.update(b"m" + struct.pack(">Q", len(values)))
    for key in sorted(values):
        sink.update(field(key.encode("utf-8")))
        sink.update(encode_value(values[key], f"{where}, key `{key}`"))


def as_numpy(name: str, value: object) -> np.ndarray:
    """``value`` as a NumPy array (torch tensors too; bfloat16 as raw 16-bit)."""
    if isinstance(value, np.ndarray):
        return value
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


def write_arrays(sink: Sink, arrays: Mapping[str, object]) -> None:
    """Write named arrays in sorted-name order: name, dtype, shape, raw bytes."""
    sink.update(struct.pack(">Q", len(arrays)))
    for name in sorted(arrays):
        array = as_numpy(name, arrays[name])
        if array.dtype.hasobject:
            raise TypeError(f"Array `{name}` has object dtype; it cannot be signed.")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        sink.update(field(name.encode()))
        sink.update(field(little.dtype.str.encode()))
        sink.update(struct.pack(">Q", little.ndim))
        sink.update(struct.pack(f">{little.ndim}Q", *little.shape))
        sink.update(field(np.ascontiguousarray(little).tobytes()))
