"""Checks of untrusted manifest input: text encoding, image paths, image files.

A manifest folder comes from a data owner, not from this code: every line is decoded
on its own so that a bad byte is reported with its file and line, every image path
must stay inside the folder (symlinks resolved), and every image is decoded once at
load so that a corrupt file stops the run before training, not in the middle of it.
Errors are ``ValueError`` with a one-line message starting ``<file>:<line>:``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

_UTF8_BOM = b"\xef\xbb\xbf"


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file (a leading BOM is dropped).

    Raises
    ------
    ValueError
        ``"<file>:<line>: not valid UTF-8 ..."`` at the first undecodable line.
    """
    raw = path.read_bytes()
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                f"column {err.start + 1}); manifests must be UTF-8 text."
            ) from None
        yield number, text


def confined_image_path(base: Path, value: str, where: str) -> Path:
    """The image file ``value`` names, which must lie inside the folder ``base``.

    Absolute paths, ``..`` escapes and symlinks that resolve outside ``base`` are
    refused: a manifest may only point at its own data.

    Raises
    ------
    ValueError
        ``"<where>: image ... is outside the manifest folder ..."``.
    FileNotFoundError
        ``"<where>: image ... not found ..."``.
    """
    if (
        PurePosixPath(value).is_absolute()
        or PureWindowsPath(value).is_absolute()
        or PureWindowsPath(value).drive
    ):
        raise ValueError(
            f"{where}: image {value!r} is an absolute path; image paths must be "
            f"relative to the manifest folder {str(base)!r}."
        )
    root = base.resolve()
    image = base / value
    resolved = image.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{where}: image {value!r} resolves to {str(resolved)!r}, outside the "
            f"manifest folder {str(root)!r}; image paths must stay inside it."
        )
    if not resolved.is_file():
        raise FileNotFoundError(
            f"{where}: image {value!r} not found (looked for {str(image)!r})."
        )
    return image


def check_image(path: Path, where: str) -> None:
    """Decode ``path`` fully once (cached per file version).

    Raises
    ------
    ValueError
        ``"<where>: image ... is not a readable image (...)"``.
    """
    stat = path.stat()
    reason = _image_problem(os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if reason is not None:
        raise ValueError(
            f"{where}: image {str(path)!r} is not a readable image ({reason})."
        )


@lru_cache(maxsize=1 << 16)
def _image_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why ``path`` cannot be decoded, or None; ``size``/``mtime_ns`` key the cache."""
    try:
        with Image.open(path) as image:
            image.verify()  # container structure and checksums
        with Image.open(path) as image:
            image.load()  # the pixel data itself (truncation)
            if image.width < 1 or image.height < 1:
                return f"empty image {image.width}x{image.height}"
    except Exception as err:  # PIL raises many types for corrupt data
        text = " ".join(str(err).split()) or type(err).__name__
        return f"{type(err).__name__}: {text}"
    return None
