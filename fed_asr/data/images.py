"""Image loading with a per-process cache, image file digests, an object's box."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

# Bound in entries, not bytes: all 5,000 easy-VQA images (64x64 RGB, 12 kB each) fit
# in about 60 MB, so a run never re-decodes them. Large real images cost more per entry;
# call `clear_image_cache()` between stages if memory is tight.
IMAGE_CACHE_SIZE = 8192


def image_file_digest(path: str) -> str:
    """SHA-256 of an image file's bytes, cached per process while the file is unchanged.

    Cache keys of prepared bases hash what the images hold, not where they are: the
    same data under another venv, home or data folder gives the same key.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message names it).
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path!r} does not exist.") from None
    return _file_digest(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=65536)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_image(path: str) -> Image.Image:
    """Load an image as RGB, cached per process.

    The same ``PIL.Image.Image`` object is returned for repeated calls with the same
    path: treat it as read-only (copy it before drawing on it).

    Parameters
    ----------
    path : str
        Path of the image file.

    Returns
    -------
    PIL.Image.Image
        The image in mode ``"RGB"``, fully loaded (no open file handle).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file exists but is not a readable image.
    """
    return _load_image_cached(os.fspath(path))


@lru_cache(maxsize=IMAGE_CACHE_SIZE)
def _load_image_cached(path: str) -> Image.Image:
    """Read and convert one image; failures are not cached by ``lru_cache``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Cannot read image {path!r}: {err}") from err


def clear_image_cache() -> None:
    """Drop every cached image (e.g. after files changed on disk)."""
    _load_image_cached.cache_clear()
    _foreground_box_cached.cache_clear()


def foreground_box(
    path: str, *, tolerance: int = 30
) -> tuple[float, float, float, float] | None:
    """Normalised box of the pixels that differ from a plain background.

    The background colour is the top-left pixel; a pixel is foreground when the sum of
    its absolute RGB differences from it exceeds ``tolerance`` (anti-aliased edges
    fainter than that stay background). Meant for images of one object on a uniform
    background (easy-VQA), where the box is the object's.

    Parameters
    ----------
    path : str
        Path of the image file (read through ``load_image``'s cache).
    tolerance : int
        Summed RGB difference (0..765) above which a pixel is foreground.

    Returns
    -------
    tuple[float, float, float, float] | None
        ``(x0, y0, x1, y1)`` in [0, 1] (half-open pixel box divided by the image
        size, as ``VQASample.region``), or ``None`` when no pixel is foreground.
    """
    return _foreground_box_cached(os.fspath(path), tolerance)


@lru_cache(maxsize=IMAGE_CACHE_SIZE)
def _foreground_box_cached(
    path: str, tolerance: int
) -> tuple[float, float, float, float] | None:
    pixels = np.asarray(load_image(path), dtype=np.int32)  # (H, W, 3)
    height, width = pixels.shape[:2]
    differs = np.abs(pixels - pixels[0, 0]).sum(axis=-1) > tolerance
    rows, cols = np.nonzero(differs)
    if rows.size == 0:
        return None
    return (
        float(cols.min()) / width,
        float(rows.min()) / height,
        float(cols.max() + 1) / width,
        float(rows.max() + 1) / height,
    )
